"""NPU time per token and board memory on RV1126B, estimated from the exported graphs and stated assumptions.

    python -m deploy.estimate --dist DIST --precision w8a8 [--tokens 12]

Nothing here is measured on a board. Per graph call: MACs (every MatMul/Gemm of the ONNX graph, shapes from ONNX
shape inference) at an assumed share of the NPU's peak rate, bytes moved (weights at the precision's width, every
activation written once and read once) at an assumed DRAM bandwidth, the larger of the two (a roofline), plus an
assumed fixed cost per rknn_run call and per NPU layer. Where the converter's build log exists, the toolkit's own
per-layer cycle estimate is reported beside it as a cross-check. Every assumption is written next to the numbers.
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

from inference.backends import DeployMeta, Dist

# (bytes per weight, bytes per activation) as the toolkit stores them; hybrid counted as w8a8 (most layers stay int8).
PRECISION_BYTES = {"w8a8": (1.0, 1.0), "hybrid": (1.0, 1.0), "fp16": (2.0, 2.0), "w4a16": (0.5, 2.0)}
FLOAT_PRECISIONS = frozenset({"fp16", "w4a16"})  # computed in fp16 on the NPU (w4a16 widens weights to fp16)
# Ops the toolkit folds into neighbours or turns into metadata; they cost no NPU layer of their own.
FREE_OPS = frozenset({"Constant", "Identity", "Shape", "Unsqueeze", "Squeeze", "Reshape"})
# A row of the build log's layer table: "... OutputShape  DDR/NPU/Total  [SparseRatio]  RW(KB)  FullName".
_LAYER_CYCLES = re.compile(r"^D RKNN: \[[^\]]*\]\s+\d+\s+(?P<op>\S+)\s+\S+\s+(?P<target>NPU|CPU)\s.*?"
                           r"\s(?P<ddr>\d+)/(?P<npu>\d+)/(?P<total>\d+)\s")


@dataclass(frozen=True)
class Assumptions:
    """What the estimate rests on; each field is printed with the result."""

    int8_tops: float = 3.0  # RV1126B NPU int8 peak, vendor figure (REFERENCE.md); 1 MAC = 2 ops
    utilisation: float = 0.30  # share of peak that matmuls this small (K, N of a few hundred) reach
    fp16_rate: float = 0.25  # fp16 MAC rate relative to int8 (Rockchip NPUs: 1/4; 1/2 would halve fp16 compute)
    dram_gb_s: float = 4.0  # effective LPDDR4 bandwidth the NPU gets, GB/s
    run_overhead_ms: float = 0.2  # per rknn_run: rknn_inputs_set + run + rknn_outputs_get with float conversion
    layer_overhead_us: float = 10.0  # per NPU layer: command dispatch and synchronisation
    npu_mhz: float = 950.0  # NPU clock used to turn the toolkit's cycle counts into time (396-950 MHz)
    runtime_mb: float = 40.0  # board process baseline: librknnrt.so, the runner, libc, stacks
    latency_target_ms: float = 30.0  # seed target
    memory_target_mb: float = 512.0  # seed target


@dataclass(frozen=True)
class GraphCost:
    macs: int  # multiply-accumulates of every MatMul/Gemm
    weights: int  # initializer elements
    activations: int  # elements of graph inputs, outputs and every intermediate tensor
    layers: int  # nodes that become an NPU layer (FREE_OPS excluded)


def _numel(value_info) -> int:
    return math.prod(d.dim_value for d in value_info.type.tensor_type.shape.dim)


def graph_cost(path: Path) -> GraphCost:
    """MACs, weights and activation elements of a static-shape ONNX graph."""
    import onnx
    from onnx import numpy_helper

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    graph = model.graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*graph.input, *graph.output, *graph.value_info]}
    shapes.update({t.name: list(t.dims) for t in graph.initializer})
    macs = 0
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            k = shapes[node.input[0]][-2 if node.op_type == "Gemm" and _attr(node, "transA") else -1]
            macs += math.prod(shapes[node.output[0]]) * k
    weights = sum(numpy_helper.to_array(t).size for t in graph.initializer)
    activations = sum(_numel(v) for v in [*graph.input, *graph.output, *graph.value_info])
    layers = sum(node.op_type not in FREE_OPS for node in graph.node)
    return GraphCost(macs, weights, activations, layers)


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


def graph_time(cost: GraphCost, precision: str, a: Assumptions, build_log: Path | None = None) -> dict[str, Any]:
    """Milliseconds for one call of a graph, with the pieces that make it up."""
    weight_bytes, act_bytes = PRECISION_BYTES[precision]
    mac_rate = a.int8_tops * 1e12 / 2 * a.utilisation * (a.fp16_rate if precision in FLOAT_PRECISIONS else 1.0)
    # Activations are written once and read once; weights are read once per call (no cache holds them).
    moved = cost.weights * weight_bytes + 2 * cost.activations * act_bytes
    compute_ms, memory_ms = 1e3 * cost.macs / mac_rate, 1e3 * moved / (a.dram_gb_s * 1e9)
    cycles = toolkit_cycles(build_log) if build_log else None
    layers = cycles["npu_layers"] if cycles else cost.layers
    overhead_ms = a.run_overhead_ms + layers * a.layer_overhead_us / 1e3
    result = {"macs": cost.macs, "weights": cost.weights, "bytes_moved": int(moved), "layers": layers,
              "compute_ms": round(compute_ms, 4), "memory_ms": round(memory_ms, 4),
              "overhead_ms": round(overhead_ms, 4), "ms": round(max(compute_ms, memory_ms) + overhead_ms, 4)}
    if cycles:
        result["toolkit"] = {**cycles, "ms_at_npu_clock": round(cycles["cycles"] / (a.npu_mhz * 1e3), 4)}
    return result


def board_memory_mb(dist: Dist, precision: str, a: Assumptions) -> dict[str, float]:
    """Resident memory on the board: the loaded files (the runtime keeps the model blobs and its own copy of the
    weights in NPU-visible memory, so .rknn counts twice) plus the process baseline."""
    rknn = sum(p.stat().st_size for p in (dist.rknn / precision).glob("*.rknn"))
    tables = sum(p.stat().st_size for p in (dist.embed, dist.board / "tokenizer.bin") if p.is_file())
    total = (2 * rknn + tables) / 2**20 + a.runtime_mb
    return {"rknn_mb": round(rknn / 2**20, 2), "tables_mb": round(tables / 2**20, 2), "runtime_mb": a.runtime_mb,
            "total_mb": round(total, 1)}


def estimate(dist: Dist, precision: str, tokens: float = 0.0, a: Assumptions = Assumptions()) -> dict[str, Any]:
    """Encoder per sentence, decoder per token, a sentence of `tokens` output tokens (0: the longest, Tc) and
    memory, against the seed targets."""
    meta = DeployMeta.load(dist.meta)
    graphs = {name: graph_time(graph_cost(dist.onnx / f"{name}.onnx"), precision, a,
                               dist.rknn / precision / f"{name}.build.log") for name in ("encoder", "decoder")}
    tokens = tokens or meta.Tc
    sentence_ms = graphs["encoder"]["ms"] + tokens * graphs["decoder"]["ms"]
    memory = board_memory_mb(dist, precision, a)
    return {
        "precision": precision, "assumptions": asdict(a), "encoder_per_sentence": graphs["encoder"],
        "decoder_per_token": graphs["decoder"], "tokens_per_sentence": round(tokens, 1),
        "per_token_ms": graphs["decoder"]["ms"], "per_sentence_ms": round(sentence_ms, 3),
        "worst_case_sentence_ms": round(graphs["encoder"]["ms"] + meta.Tc * graphs["decoder"]["ms"], 3),
        "memory": memory,
        "targets": {"latency_ms": a.latency_target_ms, "memory_mb": a.memory_target_mb,
                    "per_token_within_latency": graphs["decoder"]["ms"] < a.latency_target_ms,
                    "sentence_within_latency": sentence_ms < a.latency_target_ms,
                    "memory_within_target": memory["total_mb"] < a.memory_target_mb},
    }


def summary(result: dict[str, Any]) -> str:
    """Two lines a person reads: the numbers and the verdict against the targets."""
    t = result["targets"]
    return (f"{result['precision']}: ~{result['per_token_ms']:.2f} ms/token, encoder "
            f"{result['encoder_per_sentence']['ms']:.2f} ms, ~{result['per_sentence_ms']:.1f} ms for "
            f"{result['tokens_per_sentence']} tokens; ~{result['memory']['total_mb']:.0f} MB on the board\n"
            f"targets < {t['latency_ms']:.0f} ms: per token {'yes' if t['per_token_within_latency'] else 'NO'}, "
            f"per sentence {'yes' if t['sentence_within_latency'] else 'NO'}; < {t['memory_mb']:.0f} MB: "
            f"{'yes' if t['memory_within_target'] else 'NO'} (estimates, not board measurements)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dist", type=Path, required=True, help="deploy output folder (onnx/, rknn/)")
    parser.add_argument("--precision", default="w8a8", choices=sorted(PRECISION_BYTES),
                        help="the NPU precision to estimate (default w8a8)")
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
