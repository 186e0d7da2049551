"""Greedy decoding in the RKNN simulator: the worker behind inference.backends' `rknn-sim` backend.

Runs INSIDE the RKNN venv. The simulator only runs a model built in the same process, so this builds encoder and
decoder once for one precision (with the options DIST/rknn/rknn_report.json records, so the simulated model is the
converted one), then answers decode requests, one JSON line each way:

    stdin:  {"sources": [[student ids], ...], "directions": [0, 1, ...]}
    stdout: {"hypotheses": [[student ids], ...]}         first line: {"ready": true, "build_seconds": s}
    any failure: {"error": "one line"}, then exit 2

The decoding loop is inference/backends.py's `greedy`, loaded by file path (the inference package imports torch and
transformers, which this venv does not have). Toolkit logs: DIST/rknn/<precision>/sim/.

    printf '%s\\n' '{"sources": [[5, 6, 7]], "directions": [0]}' | \\
        .venv-rknn/bin/python deploy/rknn_sim_eval.py --dist DIST --precision w8a8
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import IO, Any, Sequence

import numpy as np

import convert_rknn as cr  # this file's folder is sys.path[0] when run as a script

REPO = Path(__file__).resolve().parents[1]


def load_backends() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rk_backends", REPO / "inference" / "backends.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


bk = load_backends()


class SimulatorStepModel:
    """backends.StepModel over convert_rknn.SimulatedModel."""

    def __init__(self, model: cr.SimulatedModel) -> None:
        self.model = model

    def run_encoder(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.model.run("encoder", feeds)

    def run_decoder(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.model.run("decoder", feeds)


def build_options(dist: bk.Dist, precision: str) -> cr.BuildOptions:
    """The converter's options for this DIST (target, algorithm, hybrid threshold), else the defaults."""
    if not dist.rknn_report.is_file():
        return cr.BuildOptions(precision)
    report = json.loads(dist.rknn_report.read_text())
    return cr.BuildOptions(precision, report["target"], report["quant_algorithm"], report["hybrid_cos_thresh"])


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
    dist = bk.Dist(args.dist.resolve())
    meta, tables = bk.DeployMeta.load(dist.meta), bk.EmbedTables.load(dist.embed)
    opts = build_options(dist, args.precision)
    calib = dist.calib if opts.quantized else None
    with cr.SimulatedModel(dist.onnx, opts, calib, dist.rknn / args.precision / "sim") as model:
        build_seconds = sum(g.build_seconds for g in model.graphs.values())
        reply(stream, {"ready": True, "build_seconds": round(build_seconds, 3)})
        decoder = bk.LoopDecoder(SimulatorStepModel(model), tables, meta, progress=args.progress)
        for line in sys.stdin:
            request = json.loads(line)
            reply(stream, {"hypotheses": decoder.decode(request["sources"], request["directions"])})


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
    except (cr.ConvertError, bk.BackendError, KeyError, ValueError) as exc:
        reply(stream, {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__})
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
