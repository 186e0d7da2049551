"""The exported graphs of a DIST folder in onnxruntime, as a deploy.contract.StepModel.

The one onnxruntime runner of encoder.onnx / decoder.onnx: the export's parity check and calibration rows
(deploy/export_onnx.py), the simulator's fp32 reference (deploy/rknn_sim_eval.py, in the RKNN venv), the host cost
(deploy/host_cost.py) and the onnx / onnx-int8 backends (inference/backends.py) all decode through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploy.contract import ContractError, Feeds


class OnnxStepModel:
    """encoder.onnx + decoder.onnx in onnxruntime (CPU); threads=0 keeps onnxruntime's default (all cores).

    One thread by default: batch-1 steps this small gain nothing from more, and a pool's spinning threads
    starve everything else on a loaded host.
    """

    def __init__(self, folder: Path, threads: int = 1) -> None:
        # Imported here, not at the top: a torch-only Translator imports inference.backends, and so this module,
        # without ever running a graph.
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        sessions = []
        for name in ("encoder", "decoder"):
            path = folder / f"{name}.onnx"
            if not path.is_file():
                raise ContractError(f"{path} not found; export the model first (python -m deploy.export_onnx)")
            sessions.append(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
        self.encoder, self.decoder = sessions

    def run_encoder(self, feeds: Feeds) -> Feeds:
        return run_session(self.encoder, feeds)

    def run_decoder(self, feeds: Feeds) -> Feeds:
        return run_session(self.decoder, feeds)


def run_session(session: Any, feeds: Feeds) -> Feeds:
    """One onnxruntime call on the graph's own inputs; its outputs by name."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {i.name: feeds[i.name] for i in session.get_inputs()})))
