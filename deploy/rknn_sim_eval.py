"""Greedy decoding in the RKNN simulator: the worker behind inference.backends' `rknn-sim` backend.

Runs INSIDE the RKNN venv. The simulator only runs a model built in the same process, so this builds encoder and
decoder once for one precision (with the options DIST/rknn/rknn_report.json records, so the simulated model is the
converted one), then answers decode requests, one JSON line each way:

    stdin:  {"sources": [[student ids], ...], "directions": [0, 1, ...]}
    stdout: {"hypotheses": [[student ids], ...], "checks": [{"fp32": [...], "argmax": [...], "cosines": {...}}, ...]}
            first line: {"ready": true, "build_seconds": s}
    any failure: {"error": "one line"}, then exit 2

Every sentence is also checked against fp32 onnxruntime (DIST/onnx), which is what qualifies a precision
(deploy/__main__.py): `fp32` is onnxruntime's greedy path (its eos included when reached); `argmax` is the
simulator's argmax at each step of that same path, teacher-forced (step t+1 is fed fp32's token t), so one early
disagreement counts once instead of derailing every later step; `cosines` holds, per graph and output, the cosine of
the simulator's output to onnxruntime's on the very same inputs, one per call along that path. The hypothesis is the
simulator's own greedy output: fp32's path when every forced step agreed (the same inputs give the same outputs, so
free decoding would retrace it), else a free greedy decode.

The decoding loop is deploy.contract's `step_argmaxes`, the one every backend runs. Toolkit logs:
DIST/rknn/<precision>/sim/. From the repository root:

    printf '%s\\n' '{"sources": [[5, 6, 7]], "directions": [0]}' | \\
        .venv-rknn/bin/python -m deploy.rknn_sim_eval --dist DIST --precision w8a8
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Sequence

import numpy as np
from tqdm import tqdm

from deploy import contract
from deploy import convert_rknn as cr
from deploy.onnx_step_model import OnnxStepModel


class SimulatorStepModel:
    """contract.StepModel over convert_rknn.SimulatedModel."""

    def __init__(self, model: cr.SimulatedModel) -> None:
        self.model = model

    def run_encoder(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.model.run("encoder", feeds)

    def run_decoder(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.model.run("decoder", feeds)


@dataclass
class CosineProbe:
    """A StepModel that runs the simulator and, on the very same inputs, fp32 onnxruntime, and keeps the cosine of
    every output of every call; it returns the simulator's outputs, so the state carried is the simulator's own."""

    simulated: SimulatorStepModel
    reference: OnnxStepModel
    cosines: dict[str, dict[str, list[float]]] = field(default_factory=lambda: {"encoder": {}, "decoder": {}})

    def _compare(self, graph: str, got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, value in got.items():
            self.cosines[graph].setdefault(name, []).append(round(cr.cosine(value, want[name]), 6))
        return got

    def run_encoder(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._compare("encoder", self.simulated.run_encoder(feeds), self.reference.run_encoder(feeds))

    def run_decoder(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._compare("decoder", self.simulated.run_decoder(feeds), self.reference.run_decoder(feeds))


@dataclass
class CheckingDecoder:
    """Greedy decoding in the simulator, each sentence checked against fp32 onnxruntime (module docstring)."""

    simulated: SimulatorStepModel
    reference: OnnxStepModel
    tables: contract.EmbedTables
    meta: contract.DeployMeta
    progress: bool = False

    def sentence(self, source: Sequence[int], direction: int) -> tuple[list[int], dict[str, Any]]:
        args = (self.tables, self.meta, source, direction)
        fp32 = contract.step_argmaxes(self.reference, *args)
        probe = CosineProbe(self.simulated, self.reference)
        forced = contract.step_argmaxes(probe, *args, forced=fp32)
        hypothesis = contract.without_eos(fp32, self.meta) if forced == fp32 else contract.greedy(self.simulated, *args)
        return hypothesis, {"fp32": fp32, "argmax": forced, "cosines": probe.cosines}

    def decode(self, sources: Sequence[Sequence[int]], directions: Sequence[int]) -> dict[str, list]:
        # disable=None: a bar only when stderr is a terminal, so logs and captured output stay clean.
        pairs = tqdm(list(zip(sources, directions)), desc="rknn-sim", unit="sent",
                     disable=None if self.progress else True, leave=False)
        results = [self.sentence(source, direction) for source, direction in pairs]
        return {"hypotheses": [h for h, _ in results], "checks": [c for _, c in results]}


def build_options(dist: contract.Dist, precision: str) -> cr.BuildOptions:
    """The converter's options for this DIST (target, algorithm), else the defaults."""
    if not dist.rknn_report.is_file():
        return cr.BuildOptions(precision)
    report = json.loads(dist.rknn_report.read_text())
    return cr.BuildOptions(precision, report["target"], report["quant_algorithm"])


def protocol_stream() -> IO[str]:
    """A private copy of stdout for replies; fd 1 then points at stderr, so whatever else prints (the toolkit,
    libraries) cannot corrupt the JSON lines the parent reads."""
    stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return stream


def reply(stream: IO[str], message: dict[str, Any]) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


def serve(args: argparse.Namespace, stream: IO[str]) -> None:
    dist = contract.Dist(args.dist.resolve())
    meta, tables = contract.DeployMeta.load(dist.meta), contract.EmbedTables.load(dist.embed)
    opts = build_options(dist, args.precision)
    calib = dist.calib if opts.quantized else None
    with cr.SimulatedModel(dist.onnx, opts, calib, dist.rknn / args.precision / "sim") as model:
        build_seconds = sum(g.build_seconds for g in model.graphs.values())
        reply(stream, {"ready": True, "build_seconds": round(build_seconds, 3)})
        decoder = CheckingDecoder(SimulatorStepModel(model), OnnxStepModel(dist.onnx), tables, meta, args.progress)
        for line in sys.stdin:
            request = json.loads(line)
            reply(stream, decoder.decode(request["sources"], request["directions"]))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dist", type=Path, required=True,
                        help="deploy output folder: onnx/ (graphs, embed.bin, meta.json, calib.npz) and rknn/")
    parser.add_argument("--precision", required=True, help=f"one of {', '.join(cr.PRECISIONS)}")
    parser.add_argument("--progress", action="store_true", help="show a progress bar per request on stderr")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stream = protocol_stream()
    try:
        serve(args, stream)
    except (cr.ConvertError, contract.ContractError, KeyError, ValueError) as exc:
        reply(stream, {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__})
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
