"""Convert encoder.onnx / decoder.onnx to .rknn for each precision and check them in the RKNN simulator.

Runs INSIDE the RKNN venv (create it with `bash deploy/setup_rknn_env.sh`); imports only the stdlib, numpy,
onnxruntime, onnx (the toolkit's own dependency) and rknn-toolkit2, never the training code. From the repository root:

    .venv-rknn/bin/python -m deploy.convert_rknn --onnx_dir DIST/onnx --calib DIST/onnx/calib.npz \
        --eval DIST/onnx/eval.npz --precision w8a8,fp16 --out DIST/rknn

Calibration / eval file (.npz, written by the exporter): one array per graph input, named `<graph>/<input>`
(`encoder/src_embeds`, `decoder/state_0`, ...), float32, shaped [N, *input_shape] where input_shape is the ONNX
input's static shape (docs/CONTRACTS.md). Sample i of a graph is the i-th row of every one of its arrays; N may differ
between the encoder and the decoder (the decoder usually has several steps per sentence). Realistic decoder rows
(states/caches produced by earlier steps, masks as the runner shifts them) calibrate far better than noise.

Precisions: fp16 and w4a16 come from `build`. w8a8 and hybrid both come from the toolkit's two-step path:
hybrid_quantization_step1 quantizes the graph with the calibration rows and writes its per-tensor parameters
(<graph>.quantization.cfg), hybrid_quantization_step2 builds from them. w8a8 takes the file as written; hybrid lists
the output of every attention (exSDPAttention) and normalisation (exNorm) layer in its `custom_quantize_layers` as
float16 (the layers int8 hurts most on RV1126B: per-tensor int8 attention, an fp16-only norm kernel), so the two
differ exactly by those layers, every time.

Output: OUT/<precision>/{encoder,decoder}.rknn, OUT/<precision>/<graph>.build.log (the toolkit's own chatter),
and OUT/rknn_report.json: per precision and graph the file size and sha256, build seconds, per-output
cosine/max-abs-diff of the simulator against onnxruntime, where the toolkit placed each op (NPU or CPU, counted by op
type) and at which dtype, which ops went to the CPU, the in/out tensors whose dtype the build changed from float32
(what the board runtime will see; empty for fp16, whose I/O the runtime converts itself), for w8a8/hybrid the int8
scale and zero point of each 0/1 mask input (and whether 0 and 1 survive exactly) and the layers kept in float16,
and, where an output's cosine falls below --analysis_cos_thresh (0.99), the worst layers from accuracy_analysis
on the eval sample with the lowest cosine. `hybrid_vs_w8a8` says whether hybrid came out the same as w8a8: by file
hash, and by its layers' dtypes (the toolkit's .rknn bytes differ between two builds of one graph, so equal layer
dtypes is the test that means something).

Board-side facts found here: 4-D inputs (cross-attention keys/values, the transformer's caches) are NCHW in the
npz and in `inference` (the toolkit assumes NHWC unless told), and quantized builds change the model's I/O dtypes
(int8 for w8a8, float16 for w4a16): see `io_dtypes` in the report.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("convert_rknn")

GRAPHS = ("encoder", "decoder")
PRECISIONS = ("w8a8", "fp16", "w4a16", "hybrid")
QUANT_ALGORITHMS = ("normal", "mmse", "kl_divergence")
W4A16_TARGETS = frozenset({"rv1126b", "rk3576"})  # the only NPUs with 4-bit weight kernels (toolkit API reference)
ANALYSIS_COS_THRESH = 0.99  # below this on any output, run accuracy_analysis to name the layers that lose it
HYBRID_FLOAT16_OPS = ("exSDPAttention", "exNorm")  # hybrid keeps these toolkit layers in float16
N_WORST_LAYERS = 5


class ConvertError(RuntimeError):
    """A failure the user can act on; main() prints it as one line."""


class RknnEnvError(ConvertError):
    """rknn-toolkit2 cannot be imported in this interpreter."""


def import_rknn() -> Any:
    """The toolkit's RKNN class, or a one-line instruction when this is not the RKNN venv."""
    try:
        from rknn.api import RKNN
    except ImportError as exc:
        raise RknnEnvError(
            f"rknn-toolkit2 is not importable from {sys.executable} ({exc}); run `bash deploy/setup_rknn_env.sh` "
            "and run it as .venv-rknn/bin/python -m deploy.convert_rknn"
        ) from exc
    return RKNN


def toolkit_version() -> str:
    from importlib.metadata import version

    return version("rknn-toolkit2")


@dataclass(frozen=True)
class BuildOptions:
    precision: str
    target: str = "rv1126b"
    quant_algorithm: str = "normal"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConvertError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if self.quant_algorithm not in QUANT_ALGORITHMS:
            raise ConvertError(f"unknown quant algorithm {self.quant_algorithm!r}; choose from {QUANT_ALGORITHMS}")
        if self.precision == "w4a16" and self.target not in W4A16_TARGETS:
            raise ConvertError(
                f"w4a16 needs one of {sorted(W4A16_TARGETS)}, not {self.target!r}; use w8a8, fp16 or hybrid"
            )

    @property
    def quantized(self) -> bool:
        return self.precision != "fp16"

    @property
    def two_step(self) -> bool:
        """Built through hybrid_quantization_step1/step2 (see the module docstring)."""
        return self.precision in ("w8a8", "hybrid")


@dataclass(frozen=True)
class GraphIO:
    """Names and static shapes of one ONNX graph, read through onnxruntime (no `onnx` import needed)."""

    path: Path
    inputs: list[str]
    shapes: list[list[int]]
    outputs: list[str]

    @classmethod
    def from_onnx(cls, path: Path) -> GraphIO:
        if not path.is_file():
            raise ConvertError(f"{path} not found; export the ONNX graphs first (deploy/export_onnx.py)")
        session = ort_session(path)
        shapes = [list(i.shape) for i in session.get_inputs()]
        for name, shape in zip([i.name for i in session.get_inputs()], shapes, strict=True):
            if not all(isinstance(d, int) and d > 0 for d in shape):
                raise ConvertError(f"{path}: input {name} has shape {shape}; the NPU needs static shapes")
        inputs, outputs = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
        return cls(path.resolve(), inputs, shapes, outputs)


def ort_session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


Sample = list[np.ndarray]  # one array per graph input, in GraphIO.inputs order


def load_samples(npz_path: Path, graph: str, io: GraphIO) -> list[Sample]:
    """Rows of `<graph>/<input>` arrays in an npz, checked against the graph's input shapes."""
    if not npz_path.is_file():
        raise ConvertError(f"{npz_path} not found")
    with np.load(npz_path) as npz:
        arrays = []
        for name, shape in zip(io.inputs, io.shapes, strict=True):
            key = f"{graph}/{name}"
            if key not in npz:
                raise ConvertError(f"{npz_path} has no array {key!r} (holds {sorted(npz.files)})")
            array = np.ascontiguousarray(npz[key], dtype=np.float32)
            if list(array.shape[1:]) != shape:
                expected = ", ".join(map(str, ["N", *shape]))
                raise ConvertError(f"{npz_path}:{key} is {list(array.shape)}, expected [{expected}]")
            arrays.append(array)
    counts = {len(a) for a in arrays}
    if len(counts) != 1 or 0 in counts:
        raise ConvertError(f"{npz_path}: {graph} arrays need the same, non-zero leading sample count, got {counts}")
    return [[a[i] for a in arrays] for i in range(arrays[0].shape[0])]


def write_sample(sample: Sample, io: GraphIO, folder: Path, index: int) -> list[Path]:
    paths = []
    for name, array in zip(io.inputs, sample, strict=True):
        path = folder / f"{index:05d}_{name}.npy"
        np.save(path, array)
        paths.append(path)
    return paths


def write_dataset(samples: Sequence[Sample], io: GraphIO, folder: Path) -> Path:
    """The toolkit's multi-input calibration list: one line per sample, that sample's .npy paths space-separated."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [" ".join(str(p) for p in write_sample(s, io, folder, i)) for i, s in enumerate(samples)]
    dataset = folder / "dataset.txt"
    dataset.write_text("\n".join(lines) + "\n")
    return dataset


@dataclass(frozen=True)
class ToolkitIO:
    """Where toolkit calls put their side effects: console output into `log`, stray files into `scratch`.

    The toolkit's C++ core prints its (huge) layer tables straight to fd 1/2, and load_onnx/build drop
    check*_*.onnx debug copies into the current directory, so each call runs redirected and inside `scratch`.
    Both paths must be absolute, as must every path handed to the toolkit.
    """

    log: Path
    scratch: Path

    @contextlib.contextmanager
    def redirected(self) -> Iterator[None]:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        with open(self.log, "ab") as sink, contextlib.chdir(self.scratch):
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])

    def call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """One toolkit call; a -1 return or an exception becomes a ConvertError naming the log."""
        try:
            with self.redirected():
                result = fn(*args, **kwargs)
        except Exception as exc:  # the toolkit raises bare ValueError/RuntimeError with multi-page tracebacks
            last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise ConvertError(f"{what} failed: {last} (toolkit log: {self.log})") from exc
        if isinstance(result, int) and result != 0:
            raise ConvertError(f"{what} failed with code {result}; see the toolkit log {self.log}")
        return result


def config_kwargs(opts: BuildOptions) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"target_platform": opts.target, "mean_values": None, "std_values": None,
                              "float_dtype": "float16"}
    if opts.quantized:
        kwargs["quantized_dtype"] = "w4a16" if opts.precision == "w4a16" else "w8a8"
        kwargs["quantized_algorithm"] = opts.quant_algorithm
    return kwargs


@dataclass
class BuiltGraph:
    """One graph built for one precision and held in the simulator."""

    name: str
    io: GraphIO
    rknn: Any
    build_seconds: float
    toolkit: ToolkitIO
    quantization: dict[str, Any] = field(default_factory=dict)  # two-step builds: masks and float16 layers

    def run(self, sample: Sample) -> list[np.ndarray]:
        # 'nchw' for every input: 4-D inputs (the cache) are NCHW like the ONNX graph; the toolkit ignores the
        # format for other ranks, and without it assumes NHWC and rejects or silently permutes the cache.
        outputs: list[np.ndarray] = self.toolkit.call(f"{self.name} inference", self.rknn.inference,
                                                      inputs=sample, data_format=["nchw"] * len(sample))
        return outputs

    def release(self) -> None:
        self.rknn.release()


def new_rknn(toolkit: ToolkitIO, opts: BuildOptions) -> Any:
    """A configured RKNN object; verbose, so the layer table (which op runs where, at which dtype) reaches the log."""
    with toolkit.redirected():
        rknn = import_rknn()(verbose=True)
    try:
        toolkit.call(f"{opts.precision} config", rknn.config, **config_kwargs(opts))
    except BaseException:
        rknn.release()
        raise
    return rknn


def load_onnx(rknn: Any, io: GraphIO, toolkit: ToolkitIO, what: str) -> None:
    toolkit.call(f"{what} load_onnx", rknn.load_onnx, str(io.path), inputs=io.inputs, input_size_list=io.shapes,
                 outputs=io.outputs)


def read_quantized_graph(path: Path) -> Any:
    """step1's quantized graph (<graph>.model): an ONNX ModelProto in the toolkit's own op set."""
    import onnx

    model = onnx.ModelProto()
    model.ParseFromString(path.read_bytes())
    return model


def float16_layers(model: Any) -> list[str]:
    """Output tensors of the attention and normalisation layers of a quantized graph, in graph order."""
    return [out for node in model.graph.node if node.op_type in HYBRID_FLOAT16_OPS for out in node.output]


def input_conversions(model: Any) -> dict[str, str]:
    """Graph input -> the tensor its float32-to-int8 conversion writes (whose parameters the cfg holds)."""
    inputs = {i.name for i in model.graph.input}
    return {node.input[0]: node.output[0] for node in model.graph.node
            if node.op_type == "exDataConvert" and node.input and node.input[0] in inputs}


def tensor_parameters(cfg_text: str, tensor: str) -> tuple[float, int] | None:
    """(scale, zero point) of one tensor in a .quantization.cfg, None when it is not quantized there. The file is
    the toolkit's YAML (4-space tensor keys, `-   value` list items); this venv has no YAML library."""
    lines = cfg_text.splitlines()
    try:
        start = lines.index(f"    {tensor}:")
    except ValueError:
        return None
    found: dict[str, str] = {}
    key = ""
    for line in lines[start + 1:]:
        if line.startswith("    ") and not line.startswith("     "):
            break  # the next tensor
        text = line.strip()
        if text.endswith(":"):
            key = text[:-1]
        elif text.startswith("-") and key in ("scale", "zero_point") and key not in found:
            found[key] = text[1:].strip()  # "-   -128": the list dash, then the value
    if set(found) != {"scale", "zero_point"}:
        return None
    return float(found["scale"]), int(found["zero_point"])


def mask_quantization(cfg_text: str, conversions: Mapping[str, str], masks: Sequence[str]) -> dict[str, Any]:
    """Per 0/1 mask input: its int8 scale and zero point, and whether 0 and 1 both come back exactly from int8
    (q = clip(round(x / scale) + zp, -128, 127), x' = (q - zp) * scale)."""
    result = {}
    for mask in masks:
        parameters = tensor_parameters(cfg_text, conversions.get(mask, ""))
        if parameters is None:
            result[mask] = {"quantized": False, "exact": True}
            continue
        scale, zero_point = parameters
        back = [(min(127, max(-128, round(x / scale) + zero_point)) - zero_point) * scale for x in (0.0, 1.0)]
        result[mask] = {"quantized": True, "scale": scale, "zero_point": zero_point,
                        "exact": all(abs(b - x) < 1e-6 for b, x in zip(back, (0.0, 1.0)))}
    return result


def keep_float16(cfg_text: str, tensors: Sequence[str]) -> str:
    """The cfg with `tensors` listed in custom_quantize_layers as float16 (the toolkit's format: output tensor name:
    dtype)."""
    marker = "custom_quantize_layers: {}\n"
    if marker not in cfg_text:
        raise ConvertError("the toolkit's .quantization.cfg has no empty custom_quantize_layers entry; this converter "
                           "knows rknn-toolkit2 2.5.0's format (deploy/setup_rknn_env.sh installs it)")
    entries = "".join(f"    {tensor}: float16\n" for tensor in tensors)
    return cfg_text.replace(marker, "custom_quantize_layers:\n" + entries if entries else marker, 1)


def two_step_build(name: str, io: GraphIO, opts: BuildOptions, dataset: Path, toolkit: ToolkitIO) -> tuple[Any, dict]:
    """w8a8 or hybrid through hybrid_quantization_step1/step2 (module docstring); returns the built RKNN object and
    what the report says about its quantization: the mask inputs' parameters and the layers kept in float16."""
    what = f"{opts.precision} {name}"
    step1 = new_rknn(toolkit, opts)
    try:
        load_onnx(step1, io, toolkit, what)
        toolkit.call(f"{what} hybrid_quantization_step1", step1.hybrid_quantization_step1, dataset=str(dataset),
                     proposal=False)
    finally:
        step1.release()
    # step1 names its files after the ONNX file and writes them into the working directory: the scratch folder.
    model, weights, cfg = (toolkit.scratch / f"{io.path.stem}{ext}" for ext in (".model", ".data", ".quantization.cfg"))
    graph = read_quantized_graph(model)
    kept = float16_layers(graph) if opts.precision == "hybrid" else []
    masks = [n for n in io.inputs if n.endswith("_mask")]
    cfg_text = cfg.read_text()
    edited = cfg.with_name(f"{io.path.stem}.{opts.precision}.cfg")
    edited.write_text(keep_float16(cfg_text, kept))
    rknn = new_rknn(toolkit, opts)
    try:
        toolkit.call(f"{what} hybrid_quantization_step2", rknn.hybrid_quantization_step2, model_input=str(model),
                     data_input=str(weights), model_quantization_cfg=str(edited))
    except BaseException:
        rknn.release()
        raise
    return rknn, {"masks": mask_quantization(cfg_text, input_conversions(graph), masks), "float16_layers": kept}


def build_graph(name: str, io: GraphIO, opts: BuildOptions, calib: Sequence[Sample], toolkit: ToolkitIO,
                export_path: Path | None = None) -> BuiltGraph:
    """Build (+ export_rknn) + init_runtime(simulator); the object stays live for inference."""
    import_rknn()
    toolkit.log.parent.mkdir(parents=True, exist_ok=True)
    toolkit.log.write_text("")
    log.info("%s %s: building (toolkit log: %s)", opts.precision, name, toolkit.log)
    what = f"{opts.precision} {name}"
    dataset = write_dataset(calib, io, toolkit.scratch / f"calib_{name}") if opts.quantized else None
    start = time.perf_counter()
    quantization: dict[str, Any] = {}
    if opts.two_step:
        assert dataset is not None
        rknn, quantization = two_step_build(name, io, opts, dataset, toolkit)
    else:
        rknn = new_rknn(toolkit, opts)
    try:
        if not opts.two_step:
            load_onnx(rknn, io, toolkit, what)
            toolkit.call(f"{what} build", rknn.build, do_quantization=opts.quantized,
                         dataset=str(dataset) if dataset else None)
        seconds = time.perf_counter() - start
        if export_path is not None:
            export_path.parent.mkdir(parents=True, exist_ok=True)
            toolkit.call(f"{what} export_rknn", rknn.export_rknn, str(export_path))
        # The simulator only runs a model built in this process (not one loaded from .rknn), hence right here.
        toolkit.call(f"{what} init_runtime", rknn.init_runtime)
    except BaseException:
        rknn.release()
        raise
    return BuiltGraph(name, io, rknn, seconds, toolkit, quantization)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denom = np.linalg.norm(a64) * np.linalg.norm(b64)
    return float(a64 @ b64 / denom) if denom > 0 else float(np.array_equal(a64, b64))


def compare_outputs(graph: BuiltGraph, samples: Sequence[Sample]) -> tuple[dict[str, dict[str, float]], int]:
    """Per output: mean/min cosine and max |diff| of the simulator vs onnxruntime over samples (+ argmax agreement
    for logits); also the index of the sample with the lowest cosine on any output."""
    session = ort_session(graph.io.path)
    stats: dict[str, dict[str, list[float]]] = {name: {"cos": [], "diff": [], "agree": []} for name in graph.io.outputs}
    for sample in samples:
        reference = session.run(graph.io.outputs, dict(zip(graph.io.inputs, sample, strict=True)))
        for name, sim, ref in zip(graph.io.outputs, graph.run(sample), reference, strict=True):
            sim = np.asarray(sim, dtype=np.float32).reshape(ref.shape)
            stats[name]["cos"].append(cosine(sim, ref))
            stats[name]["diff"].append(float(np.max(np.abs(sim - ref))))
            stats[name]["agree"].append(float(np.argmax(sim) == np.argmax(ref)))
    report = {}
    for name, s in stats.items():
        entry = {"cos_mean": float(np.mean(s["cos"])), "cos_min": float(np.min(s["cos"])),
                 "max_abs_diff": float(np.max(s["diff"]))}
        if name == "logits":  # greedy decoding only cares whether the top token survives
            entry["argmax_agree"] = float(np.mean(s["agree"]))
        report[name] = entry
    worst_sample = int(np.argmin(np.min([s["cos"] for s in stats.values()], axis=0)))
    return report, worst_sample


_LAYER_ROW = re.compile(r"^\[(?P<op>[^\]]+)\]\s+(?P<name>\S+)\s+(?P<ecos>[\d.]+)\s*\|\s*(?P<eeuc>[\d.]+)"
                        r"\s+(?P<scos>[\d.]+)\s*\|\s*(?P<seuc>[\d.]+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def parse_error_analysis(text: str, k: int = N_WORST_LAYERS) -> list[dict[str, Any]]:
    """The k layers with the lowest single-layer cosine (their own quantization error, not accumulated)."""
    rows = []
    for line in _ANSI.sub("", text).splitlines():
        match = _LAYER_ROW.match(line.strip())
        if match:
            rows.append({"layer": match["name"], "op": match["op"], "single_cos": float(match["scos"]),
                         "entire_cos": float(match["ecos"])})
    return sorted(rows, key=lambda r: r["single_cos"])[:k]


def worst_layers(graph: BuiltGraph, sample: Sample) -> list[dict[str, Any]]:
    """accuracy_analysis on one sample; its per-layer text dumps are large, so they live in a temp dir."""
    with tempfile.TemporaryDirectory(prefix="rknn_acc_") as tmp:
        inputs = [str(p) for p in write_sample(sample, graph.io, Path(tmp), 0)]
        snapshot = Path(tmp) / "snapshot"
        graph.toolkit.call(f"{graph.name} accuracy_analysis", graph.rknn.accuracy_analysis,
                           inputs=inputs, output_dir=str(snapshot))
        return parse_error_analysis((snapshot / "error_analysis.txt").read_text())


_DTYPE_CHANGE = re.compile(r"default (input|output) dtype of '([^']+)' is changed from '\w+' to '(\w+)'")
# A row of the build's "Network Layer Information Table": ID, OpType, DataType, Target, ..., FullName.
_TABLE_ROW = re.compile(r"^D RKNN: \[[^\]]*\]\s+\d+\s+(?P<op>\S+)\s+(?P<dtype>\S+)\s+(?P<target>CPU|NPU|GPU)\s"
                        r".*?(?P<last>\S+)\s*$")


def parse_build_log(text: str) -> dict[str, Any]:
    """From a verbose build log: where the toolkit placed each op (target -> op type -> count, from its "Network
    Layer Information Table"), at which dtype (op type -> dtype -> count), the ops on the CPU ('OpType:name') and
    the I/O tensors whose dtype the build changed (name -> new dtype)."""
    text = _ANSI.sub("", text)
    cpu_ops, placement, dtypes = set(), {}, {}
    for line in text.splitlines():
        row = _TABLE_ROW.match(line)
        if not row or row["op"] in ("InputOperator", "OutputOperator"):
            continue
        counts = placement.setdefault(row["target"], {})
        counts[row["op"]] = counts.get(row["op"], 0) + 1
        by_dtype = dtypes.setdefault(row["op"], {})
        by_dtype[row["dtype"]] = by_dtype.get(row["dtype"], 0) + 1
        if row["target"] == "CPU":
            cpu_ops.add(row["last"] if ":" in row["last"] else row["op"])
    return {"cpu_ops": sorted(cpu_ops), "placement": placement, "layer_dtypes": dtypes,
            "io_dtypes": {m[2]: m[3] for m in _DTYPE_CHANGE.finditer(text)}}


class SimulatedModel:
    """Encoder and decoder built for one precision and held in the simulator: build once, then cheap `run` calls.

    For a greedy-decoding evaluation in the simulator:

        with SimulatedModel(onnx_dir, BuildOptions("w8a8"), calib_npz, work_dir) as model:
            cross = model.run("encoder", {"src_embeds": x, "src_mask": m})  # cross_k_0, cross_v_0, ...
            out = model.run("decoder", {"tok_embeds": e, "src_mask": m, **cross, "state_0": s0, "state_1": s1})

    Feeds are float32 arrays with the ONNX input shapes (no sample axis); results are float32 with the ONNX output
    shapes. `export_dir` also writes <export_dir>/{encoder,decoder}.rknn; toolkit logs go to
    <work_dir>/<graph>.build.log.
    """

    def __init__(self, onnx_dir: Path, opts: BuildOptions, calib: Path | None, work_dir: Path,
                 export_dir: Path | None = None) -> None:
        if opts.quantized and calib is None:
            raise ConvertError(f"{opts.precision} needs calibration data (--calib FILE.npz)")
        self.opts = opts
        self.graphs: dict[str, BuiltGraph] = {}
        work_dir = work_dir.resolve()
        work_dir.mkdir(parents=True, exist_ok=True)
        # Read and check both graphs' inputs before the first (slow) build, so a bad file fails at once.
        ios = {name: GraphIO.from_onnx(onnx_dir / f"{name}.onnx") for name in GRAPHS}
        samples = {name: load_samples(calib, name, io) if calib and opts.quantized else [] for name, io in ios.items()}
        # Calibration .npy files and the toolkit's stray files; lives as long as the RKNN objects.
        self._scratch = tempfile.TemporaryDirectory(prefix="rknn_scratch_")
        try:
            for name, io in ios.items():
                toolkit = ToolkitIO(work_dir / f"{name}.build.log", Path(self._scratch.name).resolve())
                export = export_dir.resolve() / f"{name}.rknn" if export_dir else None
                self.graphs[name] = build_graph(name, io, opts, samples[name], toolkit, export)
        except BaseException:
            self.close()
            raise

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        built = self.graphs[graph]
        missing = set(built.io.inputs) - set(feeds)
        if missing:
            raise ConvertError(f"{graph}: missing inputs {sorted(missing)}")
        sample = [np.ascontiguousarray(feeds[name], dtype=np.float32) for name in built.io.inputs]
        outputs = built.run(sample)
        return {name: np.asarray(out, dtype=np.float32) for name, out in zip(built.io.outputs, outputs, strict=True)}

    def close(self) -> None:
        for graph in self.graphs.values():
            graph.release()
        self.graphs.clear()
        self._scratch.cleanup()

    def __enter__(self) -> SimulatedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def simulate(precision: str, onnx_dir: Path, calib: Path | None,
             samples: Mapping[str, Sequence[Mapping[str, np.ndarray]]], target: str = "rv1126b",
             work_dir: Path | None = None) -> dict[str, list[dict[str, np.ndarray]]]:
    """Run samples {graph: [feeds, ...]} through both graphs built for `precision`; same structure back.

    One-shot convenience over SimulatedModel; for step-by-step decoding keep a SimulatedModel open instead.
    """
    with contextlib.ExitStack() as stack:
        work = work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rknn_sim_")))
        model = stack.enter_context(SimulatedModel(onnx_dir, BuildOptions(precision, target), calib, work))
        return {graph: [model.run(graph, feeds) for feeds in rows] for graph, rows in samples.items()}


def graph_report(graph: BuiltGraph, rknn_path: Path, out: Path, eval_samples: Sequence[Sample],
                 analysis_cos_thresh: float) -> dict[str, Any]:
    """One graph's entry in rknn_report.json."""
    outputs, worst_sample = compare_outputs(graph, eval_samples)
    worst_cos = min(o["cos_min"] for o in outputs.values())
    worst = worst_layers(graph, eval_samples[worst_sample]) if worst_cos < analysis_cos_thresh else []
    return {"file": str(rknn_path.relative_to(out)), "size_bytes": rknn_path.stat().st_size,
            "sha256": hashlib.sha256(rknn_path.read_bytes()).hexdigest(),
            "build_seconds": round(graph.build_seconds, 3), "outputs": outputs,
            **parse_build_log(graph.toolkit.log.read_text(errors="replace")), **graph.quantization,
            "worst_layers": worst, "log": str(graph.toolkit.log.relative_to(out))}


def hybrid_vs_w8a8(precisions: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """Whether hybrid came out the same as w8a8, per graph: identical files, and identical layer dtypes (which is
    what "the same" means here: two builds of one graph already differ in some bytes)."""
    if not {"hybrid", "w8a8"} <= set(precisions):
        return None
    graphs = {name: {"identical_file": g["sha256"] == precisions["w8a8"][name]["sha256"],
                     "same_layer_dtypes": g["layer_dtypes"] == precisions["w8a8"][name]["layer_dtypes"],
                     "float16_layers": len(g.get("float16_layers", []))}
              for name, g in precisions["hybrid"].items()}
    return {"graphs": graphs, "same_as_w8a8": all(g["identical_file"] or g["same_layer_dtypes"]
                                                 for g in graphs.values())}


def convert(onnx_dir: Path, calib: Path, eval_npz: Path | None, precisions: Sequence[str], out: Path,
            target: str = "rv1126b", quant_algorithm: str = "normal",
            analysis_cos_thresh: float = ANALYSIS_COS_THRESH) -> dict[str, Any]:
    """Build, export and check every precision; write OUT/rknn_report.json and return the report."""
    options = [BuildOptions(p, target, quant_algorithm) for p in precisions]  # validate all first
    import_rknn()
    out = out.resolve()
    eval_source = eval_npz or calib
    # Check the eval file before the first (slow) build.
    eval_samples = {name: load_samples(eval_source, name, GraphIO.from_onnx(onnx_dir / f"{name}.onnx"))
                    for name in GRAPHS}
    report: dict[str, Any] = {"toolkit_version": toolkit_version(), "target": target,
                              "quant_algorithm": quant_algorithm, "hybrid_float16_ops": list(HYBRID_FLOAT16_OPS),
                              "onnx_dir": str(onnx_dir), "calib": str(calib), "eval": str(eval_source),
                              "eval_is_calib": eval_npz is None,
                              "n_eval": {name: len(rows) for name, rows in eval_samples.items()}, "precisions": {}}
    for opts in options:
        folder = out / opts.precision
        # One precision's RKNN objects at a time: each holds a compiled model and a simulator session.
        with SimulatedModel(onnx_dir, opts, calib, folder, export_dir=folder) as model:
            report["precisions"][opts.precision] = {
                name: graph_report(g, folder / f"{name}.rknn", out, eval_samples[name], analysis_cos_thresh)
                for name, g in model.graphs.items()
            }
    report["hybrid_vs_w8a8"] = hybrid_vs_w8a8(report["precisions"])
    if report["hybrid_vs_w8a8"] and report["hybrid_vs_w8a8"]["same_as_w8a8"]:
        log.warning("hybrid came out the same as w8a8 (no layer changed dtype): rknn_report.json hybrid_vs_w8a8")
    out.mkdir(parents=True, exist_ok=True)
    (out / "rknn_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_table(report: Mapping[str, Any]) -> str:
    """One line per precision, graph and output: size, build time, cosine, max diff, CPU ops."""
    lines = [f"{'precision':<9} {'graph':<8} {'size KB':>8} {'build s':>7} {'output':<12} {'cos mean':>9} "
             f"{'cos min':>9} {'max diff':>9} {'argmax':>6}  cpu ops"]
    for precision, graphs in report["precisions"].items():
        for name, g in graphs.items():
            for i, (out, s) in enumerate(g["outputs"].items()):
                head = (f"{precision:<9} {name:<8} {g['size_bytes'] / 1024:>8.0f} {g['build_seconds']:>7.2f}" if i == 0
                        else f"{'':<9} {'':<8} {'':>8} {'':>7}")
                argmax = f"{s['argmax_agree']:>6.3f}" if "argmax_agree" in s else f"{'':>6}"
                tail = f"  {len(g['cpu_ops'])}" if i == 0 else ""
                lines.append(f"{head} {out:<12} {s['cos_mean']:>9.5f} {s['cos_min']:>9.5f} {s['max_abs_diff']:>9.4f} "
                             f"{argmax}{tail}")
            for layer in g["worst_layers"]:
                lines.append(f"{'':<18}   worst layer {layer['op']} {layer['layer']} "
                             f"cos {layer['single_cos']:.5f}")
    return "\n".join(lines)


def parse_precisions(values: Sequence[str]) -> list[str]:
    """`--precision w8a8 --precision fp16,hybrid` -> ['w8a8', 'fp16', 'hybrid'] (first occurrence order)."""
    names = [p.strip() for v in values for p in v.split(",") if p.strip()]
    return list(dict.fromkeys(names))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx_dir", type=Path, required=True, help="folder holding encoder.onnx and decoder.onnx")
    parser.add_argument("--calib", type=Path, required=True,
                        help="calibration .npz: arrays 'encoder/<input>' and 'decoder/<input>', shaped [N, *input]")
    parser.add_argument("--eval", type=Path, default=None,
                        help="held-out .npz in the same layout for the simulator-vs-onnxruntime check "
                             "(default: the calibration file)")
    parser.add_argument("--target", default="rv1126b",
                        help="target platform, any the toolkit knows: rk3588, rk3576, ... (default: rv1126b)")
    parser.add_argument("--precision", action="append", default=None,
                        help=f"precision(s) to build, repeatable or comma-separated, from {', '.join(PRECISIONS)}; "
                             "hybrid = w8a8 with attention and normalisation layers kept in fp16 (default: w8a8,fp16)")
    parser.add_argument("--quant_algorithm", default="normal", choices=QUANT_ALGORITHMS,
                        help="calibration algorithm for quantized precisions (default: normal)")
    parser.add_argument("--analysis_cos_thresh", type=float, default=ANALYSIS_COS_THRESH,
                        help="run accuracy_analysis for a graph whose worst output cosine falls below this "
                             f"(default: {ANALYSIS_COS_THRESH})")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder: <precision>/{encoder,decoder}.rknn and rknn_report.json")
    args = parser.parse_args(argv)
    args.precision = parse_precisions(args.precision or ["w8a8,fp16"])
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        report = convert(args.onnx_dir, args.calib, args.eval, args.precision, args.out, args.target,
                         args.quant_algorithm, args.analysis_cos_thresh)
    except ConvertError as exc:
        log.error("%s", exc)
        return 2
    print(format_table(report))
    log.info("report: %s", args.out / "rknn_report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
