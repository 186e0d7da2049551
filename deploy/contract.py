"""The DIST folder contract on the Python side: what `python -m deploy` writes and every reader loads.

docs/CONTRACTS.md describes it; deploy/runtime/contract.c is the board runner's side. Here: where each artifact lives
under DIST (`Dist`), meta.json (`DeployMeta`), embed.bin (`EmbedTables`), the graphs' named inputs and outputs
(`contract_io`), the precision report.json chose (`default_precision`), the summary of the rknn-sim worker's checks
(`fidelity`) and the greedy loop over any `StepModel` (`greedy`), written once, on named float32 arrays:
    run_encoder({src_embeds, src_mask}) -> {cross_k_0, cross_v_0, ...}
    run_decoder({tok_embeds, src_mask, cross_*, carried inputs}) -> {logits, carried outputs}
The loop sets the per-sentence inputs once, carries the state as the board runner does (recurrent states replaced,
transformer caches shifted by one position with the step's key/value appended) and shifts the 0/1 self mask.
Embedding rows are summed on the CPU from embed.bin exactly as the board runner does. Step models: onnxruntime's in
deploy/onnx_step_model.py, the simulator's in deploy/rknn_sim_eval.py, torch's static graphs in deploy/export_onnx.py.

Only the standard library and numpy: the RKNN venv (numpy 1.26, no torch or transformers) imports this module too,
so the simulator runs the very same loop.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

EMBED_MAGIC = b"RKEMB1\0\0"
EMBED_HEADER = struct.Struct("<8s4I")  # magic, V, D, n_directions, max_positions

Feeds = dict[str, np.ndarray]  # a graph's inputs or outputs by name (docs/CONTRACTS.md)
Shapes = dict[str, list[int]]


class ContractError(RuntimeError):
    """A DIST folder lacks or garbles a file the contract names, or an input does not fit the exported graphs; the
    message says what to do."""


@dataclass(frozen=True)
class Dist:
    """Where `python -m deploy` puts each artifact under one output folder."""

    root: Path

    @property
    def onnx(self) -> Path:
        return self.root / "onnx"

    @property
    def int8(self) -> Path:
        return self.root / "onnx-int8"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def rknn(self) -> Path:
        return self.root / "rknn"

    @property
    def board(self) -> Path:
        return self.root / "board"

    @property
    def meta(self) -> Path:
        return self.onnx / "meta.json"

    @property
    def embed(self) -> Path:
        return self.onnx / "embed.bin"

    @property
    def calib(self) -> Path:
        return self.onnx / "calib.npz"

    @property
    def eval(self) -> Path:
        return self.onnx / "eval.npz"

    @property
    def parity(self) -> Path:
        return self.onnx / "parity.json"

    @property
    def rknn_report(self) -> Path:
        return self.rknn / "rknn_report.json"

    @property
    def report(self) -> Path:
        return self.root / "report.json"

    def graphs(self, backend: str) -> Path:
        """The folder holding encoder.onnx and decoder.onnx for an onnxruntime backend."""
        return self.int8 if backend == "onnx-int8" else self.onnx


def default_precision(dist: Dist) -> str:
    """The precision `python -m deploy` chose, else the first one the converter built."""
    if dist.report.is_file():
        return json.loads(dist.report.read_text())["choice"]["precision"]
    if dist.rknn_report.is_file():
        return next(iter(json.loads(dist.rknn_report.read_text())["precisions"]))
    raise ContractError(f"{dist.root}: no report.json or rknn/rknn_report.json; convert first, or name a precision "
                        "(w8a8, fp16, ...)")


@dataclass(frozen=True)
class DeployMeta:
    """meta.json: the static shapes and ids the graphs were exported with (names as in docs/CONTRACTS.md)."""

    decoder: str  # "transformer" or "recurrent"
    S: int  # max source length
    Tc: int  # max target length (decoder steps)
    D: int  # width
    L: int  # decoder layers
    H: int  # heads
    V: int  # student vocabulary size
    pad_id: int
    bos_id: int
    eos_id: int
    directions: list[str]  # index = direction id in embed.bin
    max_positions: int
    parameters: int

    @classmethod
    def load(cls, path: Path) -> DeployMeta:
        if not path.is_file():
            raise ContractError(f"{path} not found; export the model first (python -m deploy.export_onnx)")
        return cls(**json.loads(path.read_text()))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")


@dataclass(frozen=True)
class EmbedTables:
    """embed.bin: token rows (already scaled by sqrt(D)), direction rows and position rows."""

    token: np.ndarray  # [V, D]
    direction: np.ndarray  # [n_directions, D]
    position: np.ndarray  # [max_positions, D]

    @classmethod
    def load(cls, path: Path) -> EmbedTables:
        if not path.is_file():
            raise ContractError(f"{path} not found; export the model first (python -m deploy.export_onnx)")
        blob = path.read_bytes()
        magic, vocab, width, n_dir, n_pos = EMBED_HEADER.unpack_from(blob)
        floats = np.frombuffer(blob, dtype="<f4", offset=EMBED_HEADER.size)
        if magic != EMBED_MAGIC or floats.size != (vocab + n_dir + n_pos) * width:
            raise ContractError(f"{path}: not an embed.bin (bad magic or size); re-export the model")
        tables = np.split(floats.reshape(-1, width).astype(np.float32), [vocab, vocab + n_dir])
        return cls(*tables)

    def to_bytes(self) -> bytes:
        header = EMBED_HEADER.pack(EMBED_MAGIC, *self.token.shape, len(self.direction), len(self.position))
        body = np.concatenate([self.token, self.direction, self.position]).astype("<f4")
        return header + body.tobytes()

    def rows(self, ids: Sequence[int], direction: int, start: int) -> np.ndarray:
        """[1, T, D] inputs for ids at positions start..start+T-1, summed in the model's order."""
        x = self.token[list(ids)] + self.direction[direction]
        return (x + self.position[start:start + len(ids)])[None].astype(np.float32)


def contract_io(meta: DeployMeta) -> dict[str, tuple[Shapes, Shapes]]:
    """Per graph, (inputs, outputs) name -> static shape, in the order docs/CONTRACTS.md lists them."""
    S, D, L, H = meta.S, meta.D, meta.L, meta.H
    cross = {f"cross_{kv}_{layer}": [1, H, S, D // H] for layer in range(L) for kv in "kv"}
    encoder = ({"src_embeds": [1, S, D], "src_mask": [1, S]}, cross)
    common = {"tok_embeds": [1, 1, D], "src_mask": [1, S], **cross}
    if meta.decoder == "recurrent":
        decoder = ({**common, **{f"state_{layer}": [1, D] for layer in range(L)}},
                   {"logits": [1, meta.V], **{f"new_state_{layer}": [1, D] for layer in range(L)}})
    else:
        cache = {f"self_{kv}_{layer}": [1, H, meta.Tc - 1, D // H] for layer in range(L) for kv in "kv"}
        step = {f"step_{kv}_{layer}": [1, H, 1, D // H] for layer in range(L) for kv in "kv"}
        decoder = ({**common, "self_mask": [1, meta.Tc], **cache}, {"logits": [1, meta.V], **step})
    return {"encoder": encoder, "decoder": decoder}


class StepModel(Protocol):
    """One encoder pass and one decoder step, on named float32 arrays with the graphs' static shapes."""

    def run_encoder(self, feeds: Feeds) -> Feeds: ...

    def run_decoder(self, feeds: Feeds) -> Feeds: ...


@dataclass(frozen=True)
class Call:
    """One graph call: what went in and what came out."""

    inputs: Feeds
    outputs: Feeds


@dataclass
class Sentence:
    encoder: Call
    decoder: list[Call]


@dataclass
class Recorder:
    """A StepModel that keeps every call of the one it wraps, sentence by sentence (an encoder call starts one).

    keep_outputs=False keeps only the inputs (calibration rows): the logits of every step would cost V floats each.
    """

    inner: StepModel
    keep_outputs: bool = True
    sentences: list[Sentence] = field(default_factory=list)

    def run_encoder(self, feeds: Feeds) -> Feeds:
        outputs = self.inner.run_encoder(feeds)
        self.sentences.append(Sentence(Call(feeds, outputs if self.keep_outputs else {}), []))
        return outputs

    def run_decoder(self, feeds: Feeds) -> Feeds:
        outputs = self.inner.run_decoder(feeds)
        self.sentences[-1].decoder.append(Call(feeds, outputs if self.keep_outputs else {}))
        return outputs


def initial_carried(meta: DeployMeta) -> Feeds:
    """The decoder inputs carried from step to step, before step 0: zero states, or zero caches (masked)."""
    decoder_inputs = contract_io(meta)["decoder"][0]
    prefixes = ("state_",) if meta.decoder == "recurrent" else ("self_k_", "self_v_")
    return {name: np.zeros(shape, np.float32) for name, shape in decoder_inputs.items() if name.startswith(prefixes)}


def self_mask(meta: DeployMeta, step: int) -> np.ndarray:
    """The transformer's self-attention mask at step t (from 0): 1 on the last t+1 positions (its cache's last t
    and its own), 0 before them."""
    mask = np.zeros((1, meta.Tc), np.float32)
    mask[:, meta.Tc - step - 1:] = 1.0
    return mask


def advance(feeds: Feeds, outputs: Feeds) -> Feeds:
    """The next step's decoder inputs: `new_state_l` replaces `state_l`; `step_k_l` / `step_v_l` are appended to
    `self_k_l` / `self_v_l`, whose oldest position is dropped (the runner shifts its buffers the same way)."""
    carried = dict(feeds)
    for name, value in outputs.items():
        if name.startswith("new_"):
            carried[name[len("new_"):]] = value
        elif name.startswith("step_"):
            cache = "self_" + name[len("step_"):]
            carried[cache] = np.concatenate([feeds[cache][:, :, 1:], value], axis=2)
    return carried


def source_inputs(tables: EmbedTables, meta: DeployMeta, source_ids: Sequence[int], direction: int) -> Feeds:
    """Encoder inputs: the source padded with pad rows to S, and its 0/1 mask."""
    n = len(source_ids)
    if n > meta.S:
        raise ContractError(f"source has {n} tokens; the exported graphs take at most {meta.S}")
    mask = np.zeros((1, meta.S), np.float32)
    mask[:, :n] = 1.0
    return {"src_embeds": tables.rows(list(source_ids) + [meta.pad_id] * (meta.S - n), direction, 0),
            "src_mask": mask}


def step_argmaxes(model: StepModel, tables: EmbedTables, meta: DeployMeta, source_ids: Sequence[int],
                  direction: int, forced: Sequence[int] | None = None) -> list[int]:
    """The argmax of every decoder step, bos fed at position 0. Without `forced` each step is fed the previous
    step's argmax until eos or Tc steps (greedy decoding; the eos, when reached, is the last id). With `forced`
    (ids, e.g. another model's greedy output and its eos) step t+1 is fed forced[t], one step per id: teacher
    forcing, so a step is judged on the path it is given and an early disagreement does not derail later steps."""
    source = source_inputs(tables, meta, source_ids, direction)
    # Set once per sentence: the source mask and every layer's cross-attention keys and values.
    feeds = {"src_mask": source["src_mask"], **model.run_encoder(source), **initial_carried(meta)}
    steps = meta.Tc if forced is None else min(len(forced), meta.Tc)
    token, out = meta.bos_id, []
    for step in range(steps):
        feeds = {**feeds, "tok_embeds": tables.rows([token], direction, step)}
        if meta.decoder == "transformer":
            feeds["self_mask"] = self_mask(meta, step)
        outputs = model.run_decoder(feeds)
        out.append(int(np.argmax(outputs["logits"])))
        token = out[-1] if forced is None else forced[step]
        if forced is None and token == meta.eos_id:
            break
        feeds = advance(feeds, outputs)
    return out


def greedy(model: StepModel, tables: EmbedTables, meta: DeployMeta, source_ids: Sequence[int],
           direction: int) -> list[int]:
    """Greedy decoding as in model.generate: bos at position 0, stop at eos or Tc steps; ids exclude bos/eos."""
    return without_eos(step_argmaxes(model, tables, meta, source_ids, direction), meta)


def without_eos(ids: Sequence[int], meta: DeployMeta) -> list[int]:
    """A decoded path as a hypothesis: its final eos (if it reached one) removed."""
    return list(ids[:-1]) if ids and ids[-1] == meta.eos_id else list(ids)


def fidelity(checks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The simulator against fp32 onnxruntime over the rknn-sim worker's per-sentence checks (docs/CONTRACTS.md;
    inference.backends.RknnSimDecoder.take_checks hands them over), as report.json's `fidelity`: the share of
    teacher-forced steps whose argmax is fp32's token, and per graph each output's mean and lowest cosine over every
    call; a graph's `cosine` is its worst output's mean."""
    steps = sum(len(c["fp32"]) for c in checks)
    agreeing = sum(a == b for c in checks for a, b in zip(c["argmax"], c["fp32"]))
    graphs: dict[str, Any] = {}
    for graph in ("encoder", "decoder"):
        values: dict[str, list[float]] = {}
        for check in checks:
            for name, cosines in check["cosines"][graph].items():
                values.setdefault(name, []).extend(cosines)
        outputs = {name: {"mean": float(np.mean(v)), "min": float(np.min(v))} for name, v in values.items()}
        graphs[graph] = {"cosine": min((o["mean"] for o in outputs.values()), default=float("nan")),
                         "outputs": outputs}
    disagreements = [{"fp32": c["fp32"], "argmax": c["argmax"]} for c in checks if c["argmax"] != c["fp32"]]
    return {"sentences": len(checks), "steps": steps, "agreeing_steps": agreeing,
            "agreement": agreeing / steps if steps else float("nan"), "graphs": graphs,
            "disagreeing_sentences": len(disagreements), "first_disagreements": disagreements[:3]}
