"""NPU time per token and board memory on RV1126B: an estimate calibrated on Rockchip's own measurements.

    python -m deploy.estimate --dist DIST --precision fp16 [--tokens 12] [--json]

Nothing here is measured on an RV1126B; `./run.sh --bench` in the board package measures it. The model of one graph
call (one rknn_run) is

    ms = blocks * block_ms + max(bytes / bandwidth, MACs / MAC rate)

- blocks: the graph's weight matmuls, attention cores and normalisations (MatMul/Gemm with a weight, Softmax,
  LayerNormalization in the ONNX graph; the toolkit fuses bias, residual add and ReLU into the matmul's Conv and the
  score matmuls, scale and mask into exSDPAttention), plus, for hybrid, two int8/float16 conversions around every
  attention and normalisation it keeps in float16. block_ms covers dispatch, the block's activations and the
  reshapes between blocks.
- bytes: the weights at the precision's width plus the graph's inputs and outputs (batch-1 activations inside a
  graph are small; their cost is in block_ms).
- block_ms and bandwidth are fitted to Rockchip's published rknn_run times of its lite_transformer demo (ANCHORS): an
  encoder and a decoder step of the same 256-wide fp16 model on one chip give two equations in the two unknowns. The
  decoder step reads ~23 MB of weights (its 36,808 x 256 output layer), the encoder ~4 MB, with nearly the same
  number of blocks, so their difference pins the bandwidth and the encoder the per-block cost.
- RV1126B from RK3576 (they share one operator chapter; one RK3576 core is 3 TOPS like the RV1126B's NPU): the
  per-block cost scales with the NPU clock (1000 -> 950 MHz: low end) or the DDR clock (2112 -> 1332 MHz: high end);
  the bandwidth is the RK3576 fit scaled by the DDR clock (low end) up to what RKLLM reaches on the RV1126B itself
  (high end). The result is a range, low to high.
- Precision: weights and I/O take 1 byte (w8a8, hybrid), 2 (fp16) or 0.5/2 (w4a16); block_ms is the fp16 fit for
  every precision (no int8 anchor exists: Rockchip marks the demo fp16-only).

Where the converter's build log exists, the toolkit's own per-layer cycle estimate is reported beside it as a
cross-check.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from deploy.contract import DeployMeta, Dist

LABEL = "estimate, not a board measurement (./run.sh --bench on the board measures it)"

ZOO_TABLE = ("airockchip/rknn_model_zoo v2.3.2 README.md, 'Model performance benchmark (FPS)', lite_transformer "
             "lite-transformer-encoder-16 / -decoder-16, FP16, single core, maximum NPU frequency, rknn_run only")
DEMO_README = ("airockchip/rknn_model_zoo examples/lite_transformer/README.md, 'Expected Results' "
               "(rknn encoder run 2.037 ms, rknn decoder once run 6.686 ms)")
DEMO_SHAPE = ("airockchip/lite-transformer configs/rk_nmt.yml and rk_tools/export_onnx.py; rknn_model_zoo "
              "examples/lite_transformer/cpp/lite_transformer.h and model/dict_order.txt")


@dataclass(frozen=True)
class Anchor:
    """Rockchip's measured rknn_run time of one lite_transformer graph on one chip."""

    chip: str
    encoder_ms: float
    decoder_ms: float  # one decoder step
    source: str


# Frames per second in the model zoo's table, turned into ms; the demo README's RK3566 run is a second, older pair.
ANCHORS = (
    Anchor("rk3576", 1000 / 784.1, 1000 / 272.3, ZOO_TABLE),
    Anchor("rk3588", 1000 / 867.6, 1000 / 343.8, ZOO_TABLE),
    Anchor("rk3562", 1000 / 725.8, 1000 / 252.0, ZOO_TABLE),
    Anchor("rk3566", 1000 / 337.5, 1000 / 142.5, ZOO_TABLE),
    Anchor("rk3566 (demo README)", 2.037, 6.686, DEMO_README),
)
REFERENCE_CHIP = "rk3576"  # the chip whose operator chapter RV1126B shares

# Clocks Rockchip's RKLLM benchmark scripts pin (airockchip/rknn-llm scripts/fix_freq_rk3576.sh, fix_freq_rv1126b.sh).
NPU_MHZ = {"rk3576": 1000.0, "rv1126b": 950.0}
DDR_MHZ = {"rk3576": 2112.0, "rv1126b": 1332.0}
# RKLLM decodes Qwen2-0.5B w8a8 at 13.6 tokens/s on RV1126B, about 6-7 GB/s of weights (airockchip/rknn-llm
# benchmark.md): the upper end of the bandwidth an NPU workload gets there.
RKLLM_RV1126B_GB_S = 7.0

INT8_MACS_PER_S = 1.5e12  # RV1126B: 3 TOPS int8 (vendor figure), 1 MAC = 2 ops
FLOAT16_MAC_SHARE = (0.5, 0.25)  # fp16 MAC rate relative to int8: low-end and high-end assumption
# (bytes per weight, bytes per input/output element) as the toolkit stores them.
PRECISION_BYTES = {"w8a8": (1.0, 1.0), "hybrid": (1.0, 1.0), "fp16": (2.0, 2.0), "w4a16": (0.5, 2.0)}
FLOAT_PRECISIONS = frozenset({"fp16", "w4a16"})  # computed in fp16 on the NPU (w4a16 widens weights to fp16)
# ONNX ops of the layers hybrid keeps in float16 (the toolkit's exSDPAttention and exNorm; deploy/convert_rknn.py).
FLOAT16_BLOCK_OPS = ("Softmax", "LayerNormalization")

# A row of the build log's layer table: "... OutputShape  DDR/NPU/Total  [SparseRatio]  RW(KB)  FullName".
_LAYER_CYCLES = re.compile(r"^D RKNN: \[[^\]]*\]\s+\d+\s+(?P<op>\S+)\s+\S+\s+(?P<target>NPU|CPU)\s.*?"
                           r"\s(?P<ddr>\d+)/(?P<npu>\d+)/(?P<total>\d+)\s")


@dataclass(frozen=True)
class GraphCost:
    macs: int  # multiply-accumulates of every MatMul/Gemm
    weights: int  # initializer elements
    io: int  # elements of the graph's inputs and outputs
    blocks: int  # weight matmuls, attention cores (Softmax) and normalisations
    float16_blocks: int  # the attention cores and normalisations (hybrid keeps them in float16)


def lite_transformer_costs() -> dict[str, GraphCost]:
    """Rockchip's demo model (DEMO_SHAPE): fairseq transformer, width 256, 4 heads, FFN 256, 5 encoder and 3
    decoder layers (post-norm), static length 16, output layer tied to the 36,808-token embedding (dict_order.txt's
    36,804 entries and fairseq's 4 specials). Its decoder step takes the encoder output and computes every layer's
    cross-attention keys and values from it, each step."""
    D, S, V, enc_layers, dec_layers = 256, 16, 36_808, 5, 3
    linear = D * D + D  # weight and bias; the FFN is D -> D too
    encoder_layer = 6 * linear + 2 * 2 * D  # q, k, v, o, up, down; two norms
    decoder_layer = 10 * linear + 3 * 2 * D  # self q k v o, cross q k v o, up, down; three norms
    cache = 4 * (S - 1) * (D // 4)  # [1, H, 15, hd] per layer, keys and values
    encoder = GraphCost(macs=enc_layers * (S * 6 * D * D + 2 * S * S * D), weights=enc_layers * encoder_layer,
                        io=S * D + S * S + S * D, blocks=enc_layers * (6 + 1 + 2), float16_blocks=enc_layers * 3)
    decoder = GraphCost(macs=dec_layers * (8 * D * D + 2 * S * D * D + 4 * S * D) + V * D,
                        weights=dec_layers * decoder_layer + V * D,
                        io=D + S * D + 2 * S + 2 * dec_layers * cache + V + 2 * dec_layers * (cache + 4 * (D // 4)),
                        blocks=dec_layers * (10 + 2 + 3) + 1, float16_blocks=dec_layers * 5)
    return {"encoder": encoder, "decoder": decoder}


@dataclass(frozen=True)
class Fit:
    """block_ms and bandwidth solved from one chip's encoder and decoder times (fp16, compute below memory)."""

    chip: str
    block_ms: float
    bandwidth_gb_s: float


def fit(anchor: Anchor) -> Fit:
    costs = lite_transformer_costs()

    def mbytes(cost: GraphCost) -> float:  # fp16: 2 bytes a weight and an I/O element
        return 2 * (cost.weights + cost.io) / 1e6

    (b1, m1, t1), (b2, m2, t2) = ((costs[g].blocks, mbytes(costs[g]), t) for g, t in
                                  (("encoder", anchor.encoder_ms), ("decoder", anchor.decoder_ms)))
    # b * block_ms + m * ms_per_mb = t for both graphs (MB / (GB/s) = ms)
    det = b1 * m2 - b2 * m1
    block_ms, ms_per_mb = (t1 * m2 - t2 * m1) / det, (b1 * t2 - b2 * t1) / det
    return Fit(anchor.chip, block_ms, 1 / ms_per_mb)


@dataclass(frozen=True)
class Range:
    low: float
    high: float


@dataclass(frozen=True)
class Calibration:
    """RV1126B's per-block cost and bandwidth ranges, derived from the reference chip's fit (module docstring)."""

    reference: Fit
    block_ms: Range
    bandwidth_gb_s: Range

    @classmethod
    def rv1126b(cls) -> Calibration:
        ref = fit(next(a for a in ANCHORS if a.chip == REFERENCE_CHIP))
        block = Range(ref.block_ms * NPU_MHZ[ref.chip] / NPU_MHZ["rv1126b"],
                      ref.block_ms * DDR_MHZ[ref.chip] / DDR_MHZ["rv1126b"])
        scaled = ref.bandwidth_gb_s * DDR_MHZ["rv1126b"] / DDR_MHZ[ref.chip]
        return cls(ref, block, Range(min(scaled, RKLLM_RV1126B_GB_S), max(scaled, RKLLM_RV1126B_GB_S)))

    def describe(self) -> dict[str, Any]:
        return {"reference_fit": asdict(self.reference), "block_ms": asdict(self.block_ms),
                "bandwidth_gb_s": asdict(self.bandwidth_gb_s),
                "all_fits": [asdict(fit(a)) for a in ANCHORS],
                "anchors": [asdict(a) for a in ANCHORS], "demo_shape": DEMO_SHAPE,
                "clocks_mhz": {"npu": NPU_MHZ, "ddr": DDR_MHZ}, "rkllm_rv1126b_gb_s": RKLLM_RV1126B_GB_S}


def graph_cost(path: Path) -> GraphCost:
    """MACs, weights, I/O elements and blocks of a static-shape ONNX graph."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    graph = model.graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*graph.input, *graph.output, *graph.value_info]}
    initializers = {t.name: list(t.dims) for t in graph.initializer}
    shapes.update(initializers)
    macs = blocks = float16_blocks = 0
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            k = shapes[node.input[0]][-2 if node.op_type == "Gemm" and _attr(node, "transA") else -1]
            macs += math.prod(shapes[node.output[0]]) * k
            blocks += any(name in initializers for name in node.input)  # a score matmul belongs to its attention
        elif node.op_type in FLOAT16_BLOCK_OPS:
            blocks += 1
            float16_blocks += 1
    weights = sum(math.prod(dims) for dims in initializers.values())
    io = sum(math.prod(d.dim_value for d in v.type.tensor_type.shape.dim) for v in [*graph.input, *graph.output])
    return GraphCost(macs, weights, io, blocks, float16_blocks)


def _attr(node, name: str) -> int:
    return next((a.i for a in node.attribute if a.name == name), 0)


def toolkit_cycles(build_log: Path) -> dict[str, int] | None:
    """Sum of the toolkit's per-layer cycle estimates and the NPU/CPU layer counts from a verbose build log."""
    if not build_log.is_file():
        return None
    totals = {"cycles": 0, "npu_layers": 0, "cpu_layers": 0}
    for line in re.sub(r"\x1b\[[0-9;]*m", "", build_log.read_text(errors="replace")).splitlines():
        row = _LAYER_CYCLES.match(line)
        if row and row["op"] not in ("InputOperator", "OutputOperator"):
            totals["cycles"] += int(row["total"])
            totals["npu_layers" if row["target"] == "NPU" else "cpu_layers"] += 1
    return totals if totals["npu_layers"] else None


def graph_time(cost: GraphCost, precision: str, cal: Calibration) -> dict[str, Any]:
    """One call of a graph: its low and high milliseconds and the pieces that make them up."""
    weight_bytes, io_bytes = PRECISION_BYTES[precision]
    blocks = cost.blocks + (2 * cost.float16_blocks if precision == "hybrid" else 0)
    mbytes = (cost.weights * weight_bytes + cost.io * io_bytes) / 1e6
    rates = [INT8_MACS_PER_S * (share if precision in FLOAT_PRECISIONS else 1.0) for share in FLOAT16_MAC_SHARE]
    ends = {}
    for end, block_ms, bandwidth, rate in (("low", cal.block_ms.low, cal.bandwidth_gb_s.high, rates[0]),
                                           ("high", cal.block_ms.high, cal.bandwidth_gb_s.low, rates[1])):
        memory_ms, compute_ms = mbytes / bandwidth, 1e3 * cost.macs / rate
        ends[end] = {"blocks_ms": round(blocks * block_ms, 4), "memory_ms": round(memory_ms, 4),
                     "compute_ms": round(compute_ms, 4), "ms": round(blocks * block_ms + max(memory_ms, compute_ms), 4)}
    return {"macs": cost.macs, "weights": cost.weights, "io": cost.io, "blocks": blocks, "mbytes": round(mbytes, 3),
            "low": ends["low"], "high": ends["high"], "ms": asdict(Range(ends["low"]["ms"], ends["high"]["ms"]))}


def time_estimate(costs: dict[str, GraphCost], precision: str, tokens: float, max_tokens: int,
                  cal: Calibration | None = None) -> dict[str, Any]:
    """Encoder per sentence, decoder per token and a sentence of `tokens` output tokens, each as a range."""
    cal = cal or Calibration.rv1126b()
    graphs = {name: graph_time(cost, precision, cal) for name, cost in costs.items()}
    enc, dec = graphs["encoder"]["ms"], graphs["decoder"]["ms"]

    def sentence(n: float) -> dict[str, float]:
        return {end: round(enc[end] + n * dec[end], 3) for end in ("low", "high")}

    return {"precision": precision, "label": LABEL, "encoder_per_sentence": graphs["encoder"],
            "decoder_per_token": graphs["decoder"], "per_token_ms": dec, "encoder_ms": enc,
            "tokens_per_sentence": round(tokens, 1), "per_sentence_ms": sentence(tokens),
            "worst_case_sentence_ms": sentence(max_tokens), "calibration": cal.describe()}


@dataclass(frozen=True)
class MemoryAssumptions:
    runtime_mb: float = 40.0  # board process baseline: librknnrt.so, the runner, libc, stacks
    latency_target_ms: float = 30.0  # seed target, per sentence
    memory_target_mb: float = 512.0  # seed target


def board_memory_mb(dist: Dist, precision: str, a: MemoryAssumptions) -> dict[str, float]:
    """Resident memory on the board: the loaded files (the runtime keeps the model blobs and its own copy of the
    weights in NPU-visible memory, so .rknn counts twice) plus the process baseline."""
    rknn = sum(p.stat().st_size for p in (dist.rknn / precision).glob("*.rknn"))
    tables = sum(p.stat().st_size for p in (dist.embed, dist.board / "tokenizer.bin") if p.is_file())
    total = (2 * rknn + tables) / 2**20 + a.runtime_mb
    return {"rknn_mb": round(rknn / 2**20, 2), "tables_mb": round(tables / 2**20, 2), "runtime_mb": a.runtime_mb,
            "total_mb": round(total, 1)}


def estimate(dist: Dist, precision: str, tokens: float = 0.0, a: MemoryAssumptions = MemoryAssumptions()) -> dict:
    """time_estimate for DIST's graphs (tokens 0: the longest, Tc), the board memory, the toolkit's cycle counts
    beside it, and the verdict against the seed targets (judged on the high end)."""
    meta = DeployMeta.load(dist.meta)
    costs = {name: graph_cost(dist.onnx / f"{name}.onnx") for name in ("encoder", "decoder")}
    result = time_estimate(costs, precision, tokens or meta.Tc, meta.Tc)
    for name in costs:
        cycles = toolkit_cycles(dist.rknn / precision / f"{name}.build.log")
        if cycles:
            result[f"{name}_per_sentence" if name == "encoder" else "decoder_per_token"]["toolkit"] = {
                **cycles, "ms_at_npu_clock": round(cycles["cycles"] / (NPU_MHZ["rv1126b"] * 1e3), 4)}
    memory = board_memory_mb(dist, precision, a)
    high = result["per_sentence_ms"]["high"]
    result.update(memory=memory, memory_assumptions=asdict(a), targets={
        "latency_ms": a.latency_target_ms, "memory_mb": a.memory_target_mb,
        "sentence_within_latency": high < a.latency_target_ms,
        "memory_within_target": memory["total_mb"] < a.memory_target_mb})
    return result


def summary(result: dict[str, Any]) -> str:
    """Two lines a person reads: the ranges and the verdict against the targets."""
    t, tok, enc, sent = (result[k] for k in ("targets", "per_token_ms", "encoder_ms", "per_sentence_ms"))
    return (f"{result['precision']}: {tok['low']:.2f}-{tok['high']:.2f} ms/token, encoder {enc['low']:.2f}-"
            f"{enc['high']:.2f} ms, {sent['low']:.1f}-{sent['high']:.1f} ms for {result['tokens_per_sentence']} "
            f"tokens; ~{result['memory']['total_mb']:.0f} MB on the board\n"
            f"targets < {t['latency_ms']:.0f} ms a sentence: {'yes' if t['sentence_within_latency'] else 'NO'}; "
            f"< {t['memory_mb']:.0f} MB: {'yes' if t['memory_within_target'] else 'NO'} ({LABEL})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dist", type=Path, required=True, help="deploy output folder (onnx/, rknn/)")
    parser.add_argument("--precision", default="fp16", choices=sorted(PRECISION_BYTES),
                        help="the NPU precision to estimate (default fp16)")
    parser.add_argument("--tokens", type=float, default=0.0,
                        help="output tokens per sentence, eos included (default 0: the longest, Tc)")
    parser.add_argument("--json", action="store_true", help="print the whole estimate as JSON")
    args = parser.parse_args(argv)
    try:
        result = estimate(Dist(args.dist), args.precision, args.tokens)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"estimate: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
