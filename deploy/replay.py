"""Recordings of the Python greedy loop for the board runner's replay backend and its test runtime.

`rk_translate --backend replay RECORDING - ...` replays one sentence's recording (deploy/runtime/recording.h has the
format), and deploy/runtime/test/fake_rknnrt.c, the project's stand-in for the board's librknnrt.so, serves one
through the RKNN C API with each tensor in the type and layout its fake model file names (write_fake_model). A
recording is made by running deploy.contract.greedy over a contract.Recorder: on onnxruntime for real exported
graphs (QuantizedIO rounds every graph input and output to the types the board's model has, exactly as the runner
converts them), or on RandomStepModel where only the shapes matter (host benchmarks, fuzzing).

Numpy only, like deploy/contract.py.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from deploy.contract import DeployMeta, Feeds, Sentence, StepModel, contract_io

RECORDING_MAGIC = b"RKRPL2\0\0"
FAKE_MODEL_MAGIC = b"RKFAKE2\0"

# rknn_tensor_type and rknn_tensor_qnt_type values (deploy/runtime/rknn_api_min.h)
FLOAT32, FLOAT16, INT8, UINT8, INT16 = 0, 1, 2, 3, 4
QNT_NONE, QNT_DFP, QNT_AFFINE = 0, 1, 2
INT_RANGES = {INT8: (-128, 127), UINT8: (0, 255), INT16: (-32768, 32767)}

# test/fake_rknnrt.c's model options
NHWC, PADDED_ROWS, FAIL_THIRD_RUN, WIDE_LOGITS, NO_PERF_RUN = 1, 2, 4, 8, 16


@dataclass(frozen=True)
class TensorType:
    """A tensor's type as rknn_query would report it; value = (q - zp) * scale for the integer types (DFP: 2^-fl)."""

    type: int = FLOAT32
    qnt_type: int = QNT_NONE
    scale: float = 0.0
    zp: int = 0
    fl: int = 0

    def round(self, value: np.ndarray) -> np.ndarray:
        """value as the model's buffer holds it, back in float32: the arithmetic of deploy/runtime/tensor.c (float32
        division and rint, round-to-nearest-even fp16), so both sides agree bit for bit."""
        v = np.asarray(value, np.float32)
        if self.type == FLOAT32:
            return v
        if self.type == FLOAT16:
            return v.astype(np.float16).astype(np.float32)
        scale = np.float32(2.0 ** -self.fl if self.qnt_type == QNT_DFP else self.scale)
        zp = np.float32(0 if self.qnt_type == QNT_DFP else self.zp)
        low, high = INT_RANGES[self.type]
        codes = np.clip(np.rint(v / scale) + zp, low, high).astype(np.float32)
        return (codes - zp) * scale


def affine(low: float, high: float, type_: int = INT8) -> TensorType:
    """The asymmetric affine type that spans [low, high] (and 0), as a calibration that saw that range picks it."""
    low, high = min(low, 0.0), max(high, 0.0)
    q_low, q_high = INT_RANGES[type_]
    scale = np.float32((high - low) / (q_high - q_low) if high > low else 1.0 / (q_high - q_low))
    zp = int(np.clip(np.rint(q_low - low / scale), q_low, q_high))
    return TensorType(type_, QNT_AFFINE, float(scale), zp)


@dataclass
class QuantizedIO:
    """A StepModel whose every graph input and output passes through its board type: the Python side of a board
    model whose I/O is float16 or int8. Types are by graph and tensor name; a name not given stays float32."""

    inner: StepModel
    types: Mapping[str, Mapping[str, TensorType]]  # {"encoder": {...}, "decoder": {...}}

    def _round(self, graph: str, tensors: Feeds) -> Feeds:
        table = self.types.get(graph, {})
        return {name: table[name].round(value) if name in table else value for name, value in tensors.items()}

    def run_encoder(self, feeds: Feeds) -> Feeds:
        return self._round("encoder", self.inner.run_encoder(self._round("encoder", feeds)))

    def run_decoder(self, feeds: Feeds) -> Feeds:
        return self._round("decoder", self.inner.run_decoder(self._round("decoder", feeds)))


@dataclass
class RandomStepModel:
    """Outputs drawn at random with the contract's shapes: a recording of a given size where no graph of that size
    exists. eos_at forces eos at that step; None never ends, so a decode runs all Tc steps."""

    meta: DeployMeta
    seed: int = 0
    eos_at: int | None = None

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.io = contract_io(self.meta)
        self.step = 0

    def _draw(self, shapes: Mapping[str, list[int]]) -> Feeds:
        return {name: self.rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}

    def run_encoder(self, feeds: Feeds) -> Feeds:
        self.step = 0
        return self._draw(self.io["encoder"][1])

    def run_decoder(self, feeds: Feeds) -> Feeds:
        outputs = self._draw(self.io["decoder"][1])
        outputs["logits"][:, self.meta.eos_id] = 50.0 if self.step == self.eos_at else -50.0
        self.step += 1
        return outputs


def _tensor_list(shapes: Mapping[str, Sequence[int]]) -> bytes:
    out = struct.pack("<I", len(shapes))
    for name, shape in shapes.items():
        out += struct.pack("<I", len(name)) + name.encode() + struct.pack(f"<I{len(shape)}I", len(shape), *shape)
    return out


def write_recording(path: Path, meta: DeployMeta, sentence: Sentence) -> Path:
    """One sentence's calls (a Recorder's `sentences` entry) as an RKRPL2 file."""
    io = contract_io(meta)
    lists = [io["encoder"][0], io["encoder"][1], io["decoder"][0], io["decoder"][1]]
    header = RECORDING_MAGIC + struct.pack("<I", len(sentence.decoder)) + b"".join(map(_tensor_list, lists))
    calls = [(sentence.encoder, io["encoder"])] + [(call, io["decoder"]) for call in sentence.decoder]
    body = [np.asarray(tensors[name], "<f4").tobytes() for call, (inputs, outputs) in calls
            for tensors, names in ((call.inputs, inputs), (call.outputs, outputs)) for name in names]
    path.write_bytes(header + b"".join(body))
    return path


def write_fake_model(path: Path, role: str, recording: Path, options: int = 0,
                     types: Mapping[str, TensorType] | None = None) -> Path:
    """A model file for test/fake_rknnrt.c: role "encoder" or "decoder", the recording it serves, its options and
    the types of its tensors (the rest float32)."""
    specs = b"".join(name.encode() + b"\0" + struct.pack("<IIfii", t.type, t.qnt_type, t.scale, t.zp, t.fl)
                     for name, t in (types or {}).items())
    path.write_bytes(FAKE_MODEL_MAGIC + struct.pack("<2I", ("encoder", "decoder").index(role), options)
                     + str(recording).encode() + b"\0" + struct.pack("<I", len(types or {})) + specs)
    return path
