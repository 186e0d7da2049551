"""Greedy decoding of a deployed student (a DIST folder) with onnxruntime or the RKNN simulator.

The greedy loop (`greedy`) is written once, against `StepModel`, on named float32 arrays (docs/CONTRACTS.md):
    run_encoder({src_embeds, src_mask}) -> {cross_k_0, cross_v_0, ...}
    run_decoder({tok_embeds, src_mask, cross_*, carried inputs}) -> {logits, carried outputs}
The loop sets the per-sentence inputs once, carries the state as the board runner does (recurrent states replaced,
transformer caches shifted by one position with the step's key/value appended) and shifts the 0/1 self mask.
Implementations: `OnnxStepModel` here (fp32 DIST/onnx, int8 DIST/onnx-int8), the simulator's in
deploy/rknn_sim_eval.py and torch's static graphs in deploy/export_onnx.py. Embedding rows are summed on the CPU
from embed.bin exactly as the board runner does (docs/CONTRACTS.md).

At load time this module imports only the stdlib, numpy and tqdm: the RKNN venv (numpy 1.26, no transformers)
loads this file by path so the simulator runs the very same loop.

    python inference/backends.py --dist DIST --backend onnx --requests sources.json --threads 1

`--requests` is {"sources": [[student ids], ...], "directions": [0, 1, ...]}; it prints one JSON object with the
hypotheses, ms per sentence and the process's peak RSS. Run it as a script (not -m) so that nothing but numpy and
onnxruntime is loaded and the RSS is what an ONNX-only host would see.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import struct
import subprocess
import sys
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("torch", "onnx", "onnx-int8", "rknn-sim")
EMBED_MAGIC = b"RKEMB1\0\0"
EMBED_HEADER = struct.Struct("<8s4I")  # magic, V, D, n_directions, max_positions

Feeds = dict[str, np.ndarray]  # a graph's inputs or outputs by name (docs/CONTRACTS.md)


class BackendError(RuntimeError):
    """A deployed model cannot be loaded or run; the message says what to do."""


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
            raise BackendError(f"{path} not found; export the model first (python -m deploy.export_onnx)")
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
            raise BackendError(f"{path} not found; export the model first (python -m deploy.export_onnx)")
        blob = path.read_bytes()
        magic, vocab, width, n_dir, n_pos = EMBED_HEADER.unpack_from(blob)
        floats = np.frombuffer(blob, dtype="<f4", offset=EMBED_HEADER.size)
        if magic != EMBED_MAGIC or floats.size != (vocab + n_dir + n_pos) * width:
            raise BackendError(f"{path}: not an embed.bin (bad magic or size); re-export the model")
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


Shapes = dict[str, list[int]]


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
        raise BackendError(f"source has {n} tokens; the exported graphs take at most {meta.S}")
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


class OnnxStepModel:
    """encoder.onnx + decoder.onnx in onnxruntime (CPU); threads=0 keeps onnxruntime's default (all cores).

    One thread by default: batch-1 steps this small gain nothing from more, and a pool's spinning threads
    starve everything else on a loaded host.
    """

    def __init__(self, folder: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        sessions = []
        for name in ("encoder", "decoder"):
            path = folder / f"{name}.onnx"
            if not path.is_file():
                raise BackendError(f"{path} not found; export the model first (python -m deploy.export_onnx)")
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
    records over (`fidelity` sums them up).
    """

    def __init__(self, dist: Path, precision: str, python: Path | None = None, progress: bool = False) -> None:
        python = python or default_rknn_python()
        if not python.is_file():
            raise BackendError(f"{python} not found; create the RKNN venv with `bash deploy/setup_rknn_env.sh`")
        command = [str(python), str(REPO / "deploy" / "rknn_sim_eval.py"), "--dist", str(dist),
                   "--precision", precision] + (["--progress"] if progress else [])
        log.info("rknn-sim %s: building in the simulator (%s)", precision, python)
        # stderr is inherited: the worker's progress bars and any toolkit trouble show up where the user looks.
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
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


def fidelity(checks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The simulator against fp32 onnxruntime over checked sentences (RknnSimDecoder.take_checks): the share of
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


def default_precision(dist: Dist) -> str:
    """The precision `python -m deploy` chose, else the first one the converter built."""
    if dist.report.is_file():
        return json.loads(dist.report.read_text())["choice"]["precision"]
    if dist.rknn_report.is_file():
        return next(iter(json.loads(dist.rknn_report.read_text())["precisions"]))
    raise BackendError(f"{dist.root}: no rknn/rknn_report.json; convert first or name one: rknn-sim:w8a8")


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


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec,
    so a child of a big parent would report the parent's peak."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux KiB; macOS has no /proc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dist", type=Path, required=True, help="deploy output folder (holds onnx/, onnx-int8/)")
    parser.add_argument("--backend", default="onnx", choices=("onnx", "onnx-int8"),
                        help="which exported graphs to run (default: onnx)")
    parser.add_argument("--requests", type=Path, required=True,
                        help='JSON file {"sources": [[student ids], ...], "directions": [0 or 1, ...]}')
    parser.add_argument("--threads", type=int, default=1,
                        help="onnxruntime intra-op threads (default 1, like one core of the board; 0 = all)")
    args = parser.parse_args(argv)
    try:
        requests = json.loads(args.requests.read_text())
        decoder = open_decoder(args.dist, args.backend, args.threads)
        start = time.perf_counter()
        hypotheses = decoder.decode(requests["sources"], requests["directions"])
        elapsed = time.perf_counter() - start
    except (BackendError, OSError, KeyError, ValueError) as exc:
        print(f"backends: {exc}", file=sys.stderr)
        return 2
    n = max(1, len(hypotheses))
    print(json.dumps({"backend": args.backend, "threads": args.threads, "n": len(hypotheses),
                      "ms_per_sentence": round(1000 * elapsed / n, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
                      "hypotheses": hypotheses}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
