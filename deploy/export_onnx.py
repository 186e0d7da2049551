"""Export a student folder to the static ONNX graphs of docs/CONTRACTS.md and prove they match torch.

    python -m deploy.export_onnx --model RUN/final --out DIST/onnx [--max_source_len N] [--opset 17] \\
        [--calib data/catalogs/valid.jsonl] [--test data/catalogs/test.jsonl]

Writes into OUT (= DIST/onnx):
  encoder.onnx, decoder.onnx   the encoder (ending in each decoder layer's cross-attention keys and values) and one
                               decoder step (static shapes, batch 1, float32 I/O, 0/1 masks)
  embed.bin, meta.json         CPU-side embedding tables and the shapes/ids the graphs were exported with
  parity.json                  onnxruntime vs torch: max |logit diff| step by step (state carried) and greedy
                               translations of --n_parity test sentences against model.generate
  calib.npz, eval.npz          rows for deploy/convert_rknn.py, made by greedy-decoding --calib sentences / --test
                               sentences (only those sharing no side with a --calib pair: calibration_disjoint)
and beside it DIST/onnx-int8/ (onnxruntime dynamic int8, for CPU hosts without an NPU) and DIST/tokenizer/ (the
student's tokenizer and vocabulary map, for inference.backends and the board's tokenizer.bin). Where each file goes
and what it holds: deploy/contract.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import corpus
import data
import vocabulary
from config import DIRECTIONS
from deploy.contract import (ContractError, DeployMeta, Dist, EmbedTables, Feeds, Recorder, StepModel, contract_io,
                             greedy)
from deploy.onnx_step_model import OnnxStepModel
from model import StudentForTranslation

log = logging.getLogger("deploy.export_onnx")

# Ops rknn-toolkit2 cannot convert (REFERENCE.md, op support list): an export that contains one fails here.
FORBIDDEN_OPS = frozenset({"Range", "Trilu", "CumSum", "TopK", "GatherND", "Neg", "Einsum", "IsNaN"})
MIN_OPSET = 17  # LayerNormalization is a single op from 17 on
MAX_LOGIT_DIFF = 1e-3  # float32 onnxruntime vs torch on the same inputs; larger means a wrong graph, not noise
DECODER_ROWS_PER_SENTENCE = 4  # calibration rows are spread over each sentence's decode, not all of its steps


class ExportError(RuntimeError):
    """The export or its parity check failed; the message says which and why."""


# --------------------------------------------------------------------------- the graphs


class EncoderGraph(nn.Module):
    """(src_embeds [1,S,D], src_mask [1,S]) -> cross_k_0, cross_v_0, ...: StudentForTranslation.static_encode."""

    def __init__(self, student: StudentForTranslation) -> None:
        super().__init__()
        self.student = student

    def forward(self, src_embeds: torch.Tensor, src_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.student.static_encode(src_embeds, src_mask)


class DecoderGraph(nn.Module):
    """One decoder step: StudentForTranslation.static_step with the contract's inputs and outputs."""

    def __init__(self, student: StudentForTranslation) -> None:
        super().__init__()
        self.student = student

    def forward(self, tok_embeds: torch.Tensor, src_mask: torch.Tensor,
                *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.student.static_step(tok_embeds, src_mask, *tensors)


def export_graph(module: nn.Module, inputs: dict[str, list[int]], outputs: Sequence[str], path: Path,
                 opset: int) -> None:
    example = tuple(torch.zeros(shape) for shape in inputs.values())
    # The TorchScript exporter (dynamo=False): static shapes, plain opset ops, no onnxscript; its deprecation
    # warnings are expected.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(path), input_names=list(inputs), output_names=list(outputs),
                          opset_version=opset, dynamo=False, do_constant_folding=True)


def all_op_types(graph) -> set[str]:
    """Op types of a graph and of any subgraph held in node attributes."""
    ops = set()
    for node in graph.node:
        ops.add(node.op_type)
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                ops |= all_op_types(sub)
    return ops


def scalar_index_gathers(model) -> list[str]:
    """Gather nodes whose indices are a scalar: RV1126B's Gather takes rank-1 indices only (an integer index in
    torch exports as one)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model).graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*inferred.input, *inferred.value_info]}
    ranks.update({t.name: len(t.dims) for t in inferred.initializer})
    for node in inferred.node:
        if node.op_type == "Constant":
            ranks.update({node.output[0]: len(a.t.dims) for a in node.attribute if a.name == "value"})
    return [node.name for node in inferred.node if node.op_type == "Gather" and ranks.get(node.input[1]) == 0]


def check_graph(path: Path, inputs: dict[str, list[int]], outputs: dict[str, list[int]]) -> None:
    """The exported file has the contract's I/O (names, static shapes) and no op the NPU toolkit rejects."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    forbidden = sorted(all_op_types(graph) & FORBIDDEN_OPS)
    if forbidden:
        raise ExportError(f"{path.name} contains {', '.join(forbidden)}, which rknn-toolkit2 cannot convert; "
                          "rewrite that part of model.py (static_step / static_encode) without it")
    gathers = scalar_index_gathers(model)
    if gathers:
        raise ExportError(f"{path.name} has scalar-index Gather nodes ({', '.join(gathers[:3])}), which RV1126B "
                          "does not take; index with a slice or a reshape in model.py (static_step / static_encode)")
    found = [(v.name, [d.dim_value for d in v.type.tensor_type.shape.dim]) for v in [*graph.input, *graph.output]]
    expected = [*inputs.items(), *outputs.items()]  # in the contract's order, which the npz rows follow
    if found != expected:
        raise ExportError(f"{path.name} has I/O {found}, docs/CONTRACTS.md expects {expected}")


# --------------------------------------------------------------------------- tables and metadata


def build_meta(student: StudentForTranslation, max_source_len: int) -> DeployMeta:
    cfg = student.config
    return DeployMeta(decoder=cfg.decoder, S=max_source_len, Tc=cfg.max_target_len, D=cfg.d_model,
                      L=cfg.decoder_layers, H=cfg.n_heads, V=cfg.vocab_size, pad_id=cfg.pad_token_id,
                      bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_id, directions=list(DIRECTIONS),
                      max_positions=student.positions.shape[0],
                      parameters=sum(p.numel() for p in student.parameters()))


def embed_tables(student: StudentForTranslation) -> EmbedTables:
    """The rows the CPU sums (docs/CONTRACTS.md); token rows pre-scaled by sqrt(D) as in input_embeds."""
    with torch.no_grad():
        token = student.embed.weight * math.sqrt(student.config.d_model)
        return EmbedTables(token.float().numpy(), student.direction_embed.weight.float().numpy(),
                           student.positions.float().numpy())


# --------------------------------------------------------------------------- step models around the greedy loop


class TorchStepModel:
    """The exported modules themselves, run by torch: the reference the ONNX graphs must match."""

    def __init__(self, student: StudentForTranslation, io: dict[str, tuple[dict, dict]]) -> None:
        self.graphs = {"encoder": EncoderGraph(student), "decoder": DecoderGraph(student)}
        self.io = io

    @torch.no_grad()
    def _run(self, graph: str, feeds: Feeds) -> Feeds:
        inputs, outputs = self.io[graph]
        results = self.graphs[graph](*(torch.from_numpy(feeds[name]) for name in inputs))
        return {name: tensor.numpy() for name, tensor in zip(outputs, results)}

    def run_encoder(self, feeds: Feeds) -> Feeds:
        return self._run("encoder", feeds)

    def run_decoder(self, feeds: Feeds) -> Feeds:
        return self._run("decoder", feeds)


@dataclass
class ParityProbe:
    """Runs a reference and a candidate StepModel on identical inputs and carries the candidate's state, so the
    differences seen are those the deployed loop accumulates; records the largest |diff| of the encoder's outputs
    and of the logits."""

    reference: StepModel
    candidate: StepModel
    max_diff: dict[str, float] = field(default_factory=lambda: {"encoder": 0.0, "logits": 0.0})
    max_abs_logit: float = 0.0

    def _track(self, what: str, ref: Feeds, got: Feeds, names: Sequence[str]) -> None:
        diff = max(float(np.max(np.abs(ref[name] - got[name]))) for name in names)
        self.max_diff[what] = max(self.max_diff[what], diff)

    def run_encoder(self, feeds: Feeds) -> Feeds:
        got = self.candidate.run_encoder(feeds)
        self._track("encoder", self.reference.run_encoder(feeds), got, list(got))
        return got

    def run_decoder(self, feeds: Feeds) -> Feeds:
        got = self.candidate.run_decoder(feeds)
        self._track("logits", self.reference.run_decoder(feeds), got, ["logits"])
        self.max_abs_logit = max(self.max_abs_logit, float(np.max(np.abs(got["logits"]))))
        return got


def calibration_arrays(recorder: Recorder, rows_per_sentence: int) -> dict[str, np.ndarray]:
    """convert_rknn's layout: `<graph>/<input>` stacked on a leading sample axis; decoder rows evenly spread over
    each sentence's steps (early steps see a nearly empty cache, late ones a full one)."""
    encoder, decoder = [], []
    for sentence in recorder.sentences:
        steps = sentence.decoder
        picks = np.unique(np.linspace(0, len(steps) - 1, rows_per_sentence).round().astype(int))
        encoder.append(sentence.encoder.inputs)
        decoder += [steps[i].inputs for i in picks]
    out = {}
    for graph, rows in (("encoder", encoder), ("decoder", decoder)):
        for name in rows[0]:
            out[f"{graph}/{name}"] = np.stack([row[name] for row in rows]).astype(np.float32)
    return out


# --------------------------------------------------------------------------- sentences


@dataclass(frozen=True)
class Request:
    source_ids: list[int]
    direction: int


def calibration_disjoint(test: Sequence[corpus.Pair], calib: Sequence[corpus.Pair]) -> list[corpus.Pair]:
    """The test pairs that share neither side with a calibration pair: what the RKNN checks and scores run on, so
    no quantization range was fitted to a sentence it is judged on (UI strings repeat across catalogs)."""
    seen = {p.zh.strip() for p in calib} | {p.en.strip() for p in calib}
    return [p for p in test if p.zh.strip() not in seen and p.en.strip() not in seen]


def requests_from(pairs: Sequence[corpus.Pair], what: Path, builder: data.ExampleBuilder, max_len: int, n: int,
                  directions: Sequence[str]) -> tuple[list[Request], int]:
    """The first n pairs that fit max_len, alternating directions; also how many were too long. `what`: the file
    they came from, for the error."""
    requests, too_long = [], 0
    for i, pair in enumerate(pairs):
        direction = i % len(directions)
        ids = builder.student_ids(pair.side(directions[direction].split("-")[0]).strip())
        if len(ids) > max_len:
            too_long += 1
            continue
        requests.append(Request(ids, direction))
        if len(requests) == n:
            break
    if not requests:
        raise ExportError(f"{what}: no usable sentence of at most {max_len} tokens; give a file with shorter pairs")
    return requests, too_long


def torch_greedy(student: StudentForTranslation, request: Request) -> list[int]:
    """model.generate's greedy answer for one sentence (batch 1: no padding, as on the board)."""
    ids = torch.tensor([request.source_ids])
    return student.generate(ids, torch.ones_like(ids), torch.tensor([request.direction]))[0]


# --------------------------------------------------------------------------- checks


def parity(reference: TorchStepModel, candidate: OnnxStepModel, tables: EmbedTables, meta: DeployMeta,
           requests: Sequence[Request], expected: Sequence[list[int]]) -> dict:
    """One backend against torch: logit/encoder differences step by step and greedy agreement with generate."""
    probe = ParityProbe(reference, candidate)
    got = [greedy(probe, tables, meta, r.source_ids, r.direction) for r in requests]
    mismatches = [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]
    return {"max_abs_diff_logits": probe.max_diff["logits"], "max_abs_diff_encoder": probe.max_diff["encoder"],
            "max_abs_logit": probe.max_abs_logit, "greedy_identical": len(requests) - len(mismatches),
            "greedy_total": len(requests),
            "first_mismatches": [{"index": i, "torch": expected[i], "got": got[i]} for i in mismatches[:3]]}


def quantize_int8(src: Path, dst: Path) -> None:
    """onnxruntime dynamic int8 (weights int8, activations quantized per call): for CPU hosts, not the NPU."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs every tensor and advises pre-processing meant for CNNs
    try:
        for name in ("encoder", "decoder"):
            quantize_dynamic(src / f"{name}.onnx", dst / f"{name}.onnx", weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def calibration_rows(tables: EmbedTables, meta: DeployMeta, model: OnnxStepModel,
                     requests: Sequence[Request]) -> dict[str, np.ndarray]:
    """Rows for the RKNN calibration/eval files, from the deployed greedy loop on real sentences."""
    recorder = Recorder(model, keep_outputs=False)
    # disable=None: a bar only when stderr is a terminal, so logs and captured output stay clean.
    for r in tqdm(requests, desc="greedy", unit="sent", disable=None, leave=False):
        greedy(recorder, tables, meta, r.source_ids, r.direction)
    return calibration_arrays(recorder, DECODER_ROWS_PER_SENTENCE)


# --------------------------------------------------------------------------- the whole export


@dataclass(frozen=True)
class ExportOptions:
    model: Path
    out: Path
    max_source_len: int = 0  # 0 = the model's own
    opset: int = MIN_OPSET
    calib: Path = Path("data/catalogs/valid.jsonl")
    test: Path = Path("data/catalogs/test.jsonl")
    n_parity: int = 50
    n_calib: int = 24
    n_eval: int = 8


def load_student(folder: Path) -> tuple[StudentForTranslation, data.ExampleBuilder]:
    from transformers import AutoTokenizer

    if not (folder / "config.json").is_file():
        raise ExportError(f"{folder}: no config.json; give a student folder (RUN/final or train_ds.py export)")
    student = StudentForTranslation.from_pretrained(folder, use_safetensors=True).eval()  # never a pickle
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = vocabulary.VocabMap.load(folder)
    vocab.check_tokenizer(tokenizer, str(folder))
    cfg = student.config
    return student, data.ExampleBuilder(tokenizer, vocab, cfg.max_source_len, cfg.max_target_len)


def export(opts: ExportOptions) -> dict:
    """Every file listed in the module docstring; returns parity.json's content."""
    if opts.out.name != "onnx":
        raise ExportError(f"--out {opts.out}: name the folder onnx (DIST/onnx); inference.backends, the converter "
                          "and the packager find the graphs there and onnx-int8/, tokenizer/ beside it")
    if opts.opset < MIN_OPSET:
        raise ExportError(f"--opset {opts.opset}: need {MIN_OPSET} or newer (LayerNormalization)")
    student, builder = load_student(opts.model)
    limit = student.config.max_source_len
    S = opts.max_source_len or limit
    if not 1 <= S <= limit:
        raise ExportError(f"--max_source_len {S}: must be 1..{limit} (the model's max_source_len)")
    if student.config.max_target_len < 2:
        raise ExportError(f"{opts.model}: max_target_len {student.config.max_target_len}; the decoder step's cache "
                          "holds max_target_len - 1 positions, so export a model with max_target_len >= 2")
    meta = build_meta(student, S)
    dist = Dist(opts.out.parent)
    dist.onnx.mkdir(parents=True, exist_ok=True)
    io = contract_io(meta)

    log.info("exporting %s decoder (S=%d, Tc=%d, D=%d, V=%d) to %s", meta.decoder, S, meta.Tc, meta.D, meta.V,
             dist.onnx)
    for name, module in (("encoder", EncoderGraph(student)), ("decoder", DecoderGraph(student))):
        inputs, outputs = io[name]
        export_graph(module.eval(), inputs, list(outputs), dist.onnx / f"{name}.onnx", opts.opset)
        check_graph(dist.onnx / f"{name}.onnx", inputs, outputs)
    tables = embed_tables(student)
    dist.embed.write_bytes(tables.to_bytes())
    meta.save(dist.meta)
    builder.tokenizer.save_pretrained(dist.tokenizer)
    builder.vocab.save(dist.tokenizer)
    log.info("onnxruntime int8 (dynamic) -> %s", dist.int8)
    quantize_int8(dist.onnx, dist.int8)

    reference = TorchStepModel(student, io)
    onnx_fp32 = OnnxStepModel(dist.onnx)
    calib_pairs = corpus.read_pairs(opts.calib, on_bad_line="skip")
    test_pairs = calibration_disjoint(corpus.read_pairs(opts.test, on_bad_line="skip"), calib_pairs)
    requests, too_long = requests_from(test_pairs, opts.test, builder, S, opts.n_parity, meta.directions)
    log.info("parity on %d test sentences: torch generate vs onnxruntime fp32 and int8", len(requests))
    expected = [torch_greedy(student, r) for r in requests]
    report = {"sentences": len(requests), "skipped_too_long": too_long, "test": str(opts.test),
              "onnx": parity(reference, onnx_fp32, tables, meta, requests, expected),
              "onnx-int8": parity(reference, OnnxStepModel(dist.int8), tables, meta, requests, expected)}
    dist.parity.write_text(json.dumps(report, indent=2) + "\n")
    check_parity(report["onnx"])

    calib, _ = requests_from(calib_pairs, opts.calib, builder, S, opts.n_calib, meta.directions)
    log.info("RKNN calibration rows from %d --calib sentences, eval rows from %d --test sentences", len(calib),
             min(opts.n_eval, len(requests)))
    np.savez_compressed(dist.calib, **calibration_rows(tables, meta, onnx_fp32, calib))
    # Eval rows only need to be unseen by calibration (calibration_disjoint), not by the parity check.
    np.savez_compressed(dist.eval, **calibration_rows(tables, meta, onnx_fp32, requests[:opts.n_eval]))
    return report


def check_parity(fp32: dict) -> None:
    if fp32["max_abs_diff_logits"] > MAX_LOGIT_DIFF:
        raise ExportError(f"onnxruntime logits differ from torch by {fp32['max_abs_diff_logits']:.2e} "
                          f"(> {MAX_LOGIT_DIFF}); the exported graph is wrong, see parity.json")
    if fp32["greedy_identical"] != fp32["greedy_total"]:
        raise ExportError(f"onnxruntime greedy output differs from model.generate on "
                          f"{fp32['greedy_total'] - fp32['greedy_identical']} of {fp32['greedy_total']} sentences "
                          "(see parity.json first_mismatches)")


def configure_logging() -> None:
    """INFO from deploy and inference; other libraries (onnxruntime's quantizer logs every tensor) only warn."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in ("deploy", "inference"):
        logging.getLogger(name).setLevel(logging.INFO)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="student folder (RUN/final)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder DIST/onnx, named onnx (onnx-int8/ and tokenizer/ go beside it)")
    parser.add_argument("--max_source_len", type=int, default=0,
                        help="static source length S of the graphs (default 0: the model's max_source_len)")
    parser.add_argument("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset, {MIN_OPSET} or newer")
    parser.add_argument("--calib", type=Path, default=ExportOptions.calib,
                        help="sentences for the RKNN calibration rows (default: data/catalogs/valid.jsonl)")
    parser.add_argument("--test", type=Path, default=ExportOptions.test,
                        help="sentences for the parity check and RKNN eval rows (default: data/catalogs/test.jsonl)")
    parser.add_argument("--n_parity", type=int, default=ExportOptions.n_parity,
                        help="test sentences whose greedy output must equal model.generate's (default 50)")
    parser.add_argument("--n_calib", type=int, default=ExportOptions.n_calib,
                        help=f"calibration sentences, {DECODER_ROWS_PER_SENTENCE} decoder rows each (default 24)")
    parser.add_argument("--n_eval", type=int, default=ExportOptions.n_eval,
                        help="test sentences for the simulator-vs-onnxruntime check rows (default 8)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    # Batch-1 decoding of a small model: one thread is fastest, and more stall badly on a busy host.
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        report = export(ExportOptions(**vars(args)))
    except (ExportError, ContractError, corpus.CorpusError, vocabulary.VocabMismatchError) as exc:
        log.error("%s", exc)
        return 2
    fp32, int8 = report["onnx"], report["onnx-int8"]
    print(f"exported to {args.out} in {time.perf_counter() - started:.1f}s: fp32 max |logit diff| "
          f"{fp32['max_abs_diff_logits']:.2e}, greedy {fp32['greedy_identical']}/{fp32['greedy_total']} identical; "
          f"int8 {int8['greedy_identical']}/{int8['greedy_total']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
