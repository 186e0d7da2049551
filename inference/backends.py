"""Greedy decoding of a deployed student (a DIST folder) with onnxruntime or the RKNN simulator.

The folder's format and the greedy loop are deploy/contract.py's, the onnxruntime step model
deploy/onnx_step_model.py's; this module picks a backend by name and wraps it as a `Decoder`: `LoopDecoder` runs the
contract's loop over onnxruntime in this process (onnx: fp32 DIST/onnx, onnx-int8: DIST/onnx-int8), `RknnSimDecoder`
asks a worker in the RKNN venv (deploy/rknn_sim_eval.py) to run it in the simulator.
"""

from __future__ import annotations

import json
import logging
import subprocess
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

from tqdm import tqdm

from deploy.contract import DeployMeta, Dist, EmbedTables, StepModel, default_precision, greedy
from deploy.onnx_step_model import OnnxStepModel

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("torch", "onnx", "onnx-int8", "rknn-sim")


class BackendError(RuntimeError):
    """A deployed model cannot be loaded or run; the message says what to do."""


class Decoder(Protocol):
    """Whole sentences in, greedy hypotheses out (student ids without bos/eos)."""

    def decode(self, sources: Sequence[Sequence[int]], directions: Sequence[int]) -> list[list[int]]: ...

    def close(self) -> None: ...


@dataclass
class LoopDecoder:
    """The greedy loop over any StepModel, one sentence at a time (batch 1, as on the board)."""

    model: StepModel
    tables: EmbedTables
    meta: DeployMeta
    progress: bool = False

    def decode(self, sources: Sequence[Sequence[int]], directions: Sequence[int]) -> list[list[int]]:
        # disable=None: a bar only when stderr is a terminal, so logs and captured output stay clean.
        pairs = tqdm(list(zip(sources, directions)), desc="greedy", unit="sent",
                     disable=None if self.progress else True, leave=False)
        return [greedy(self.model, self.tables, self.meta, source, direction) for source, direction in pairs]

    def close(self) -> None:
        """Nothing to release: the onnxruntime sessions go with this object."""


def default_rknn_python() -> Path:
    return REPO / ".venv-rknn" / "bin" / "python"


class RknnSimDecoder:
    """Decodes in the RKNN simulator through a worker process in the RKNN venv (deploy/rknn_sim_eval.py).

    The simulator only runs a model built in the same process, so the worker builds once for one precision and
    then answers requests over a pipe, one JSON line each way, until this object is closed or collected. The worker
    also checks every sentence against fp32 onnxruntime (deploy/rknn_sim_eval.py); `take_checks` hands those
    records over (deploy.contract.fidelity sums them up).
    """

    def __init__(self, dist: Path, precision: str, python: Path | None = None, progress: bool = False) -> None:
        python = python or default_rknn_python()
        if not python.is_file():
            raise BackendError(f"{python} not found; create the RKNN venv with `bash deploy/setup_rknn_env.sh`")
        # Run as a module from the repository root, like every entry point, so its `deploy.` imports resolve;
        # hence the absolute paths.
        command = [str(python.absolute()), "-m", "deploy.rknn_sim_eval", "--dist", str(Path(dist).absolute()),
                   "--precision", precision] + (["--progress"] if progress else [])
        log.info("rknn-sim %s: building in the simulator (%s)", precision, python)
        # stderr is inherited: the worker's progress bars and any toolkit trouble show up where the user looks.
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        self._finalizer = weakref.finalize(self, _stop_worker, self.proc)
        self.build_seconds = float(self._reply()["build_seconds"])
        self.checks: list[dict[str, Any]] = []

    def _reply(self) -> dict[str, Any]:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            raise BackendError(f"rknn-sim worker exited with code {self.proc.wait()}; its messages are above")
        reply = json.loads(line)
        if "error" in reply:
            raise BackendError(f"rknn-sim: {reply['error']}")
        return reply

    def decode(self, sources: Sequence[Sequence[int]], directions: Sequence[int]) -> list[list[int]]:
        assert self.proc.stdin is not None
        request = {"sources": [list(s) for s in sources], "directions": list(directions)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self._reply()
        self.checks += answer["checks"]
        return answer["hypotheses"]

    def take_checks(self) -> list[dict[str, Any]]:
        """The per-sentence checks of every decode since the last call."""
        checks, self.checks = self.checks, []
        return checks

    def close(self) -> None:
        self._finalizer()


def _stop_worker(proc: subprocess.Popen) -> None:
    """Closing stdin ends the worker's request loop; it then releases the simulator and exits."""
    if proc.stdin:
        proc.stdin.close()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def check_backend(text: str) -> str:
    """'torch', 'onnx', 'onnx-int8', 'rknn-sim' or 'rknn-sim:PRECISION'; raises BackendError otherwise."""
    name, _, precision = text.partition(":")
    if name not in BACKENDS or (precision and name != "rknn-sim"):
        raise BackendError(f"unknown backend {text!r}; choose from {', '.join(BACKENDS)} (or rknn-sim:PRECISION)")
    return text


def open_decoder(folder: Path, backend: str, threads: int = 1, progress: bool = False) -> Decoder:
    """A Decoder for a DIST folder and a backend other than torch."""
    name, _, precision = check_backend(backend).partition(":")
    dist = Dist(Path(folder))
    if name == "rknn-sim":
        return RknnSimDecoder(dist.root, precision or default_precision(dist), progress=progress)
    if name not in ("onnx", "onnx-int8"):
        raise BackendError(f"{backend} does not run from a DIST folder; give a student folder for torch")
    meta, tables = DeployMeta.load(dist.meta), EmbedTables.load(dist.embed)
    return LoopDecoder(OnnxStepModel(dist.graphs(name), threads), tables, meta, progress)
