"""The NPU latency estimate (deploy/estimate.py) for each preset and precision on RV1126B, with its calibration.

    python -m bench.npu_estimate                    # tiny, balanced, bergamot; w8a8, fp16, w4a16, hybrid
    python -m bench.npu_estimate --tokens 20 --presets balanced

Each preset's student is built with random weights (the estimate reads shapes, not values) at the lengths a preset is
deployed with (S = Tc = 48), its encoder and decoder-step graphs exported as deploy exports them (docs/CONTRACTS.md),
and deploy/estimate.py's calibrated model applied: a range, low to high, per token, per encoder call and per
sentence of --tokens output tokens. Also prints the calibration: Rockchip's measured lite_transformer times per chip
and the per-block cost and bandwidth each pair gives. Nothing here is measured on an RV1126B; the board package's
`./run.sh --bench` is. Writes bench/results/npu_estimate.json and prints the tables.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench.results_io import write_results

ROOT = Path(__file__).resolve().parents[1]


PRESETS = ("tiny", "balanced", "bergamot")
PRECISIONS = ("w8a8", "fp16", "w4a16", "hybrid")
SOURCE_LEN = TARGET_LEN = 48  # config.ModelConfig's defaults: the static lengths a preset is deployed with


def preset_costs(preset: str, folder: Path) -> tuple[dict, dict]:
    """(graph costs, shape facts) of a random-weight student of this preset, exported to folder."""
    import torch

    from config import PRESETS as SHAPES
    from deploy import estimate, export_onnx
    from deploy.contract import contract_io
    from model import StudentConfig, StudentForTranslation

    shape, vocab = SHAPES[preset]["model"], SHAPES[preset]["data"]["vocab_size"]
    config = StudentConfig(vocab_size=vocab, max_source_len=SOURCE_LEN, max_target_len=TARGET_LEN,
                           pad_token_id=vocab - 3, bos_token_id=vocab - 2, eos_token_id=vocab - 1, **shape)
    torch.manual_seed(0)
    student = StudentForTranslation(config).eval()
    meta = export_onnx.build_meta(student, SOURCE_LEN)
    io = contract_io(meta)
    graphs = {"encoder": export_onnx.EncoderGraph(student), "decoder": export_onnx.DecoderGraph(student)}
    for name, module in graphs.items():
        export_onnx.export_graph(module, io[name][0], list(io[name][1]), folder / f"{name}.onnx",
                                 export_onnx.MIN_OPSET)
    costs = {name: estimate.graph_cost(folder / f"{name}.onnx") for name in graphs}
    return costs, {"parameters": meta.parameters, "V": meta.V, "D": meta.D, "decoder": meta.decoder, "L": meta.L}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets (default: %(default)s)")
    parser.add_argument("--tokens", type=float, default=16, help="output tokens of the sentence (default 16)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/npu_estimate.json)")
    args = parser.parse_args(argv)

    from deploy import estimate

    calibration = estimate.Calibration.rv1126b()
    rows = []
    with tempfile.TemporaryDirectory(prefix="npu_estimate_") as tmp:
        for preset in args.presets.split(","):
            folder = Path(tmp) / preset
            folder.mkdir()
            costs, facts = preset_costs(preset, folder)
            for precision in PRECISIONS:
                result = estimate.time_estimate(costs, precision, args.tokens, TARGET_LEN, calibration)
                rows.append({"preset": preset, **facts, "precision": precision,
                             **{k: result[k] for k in ("per_token_ms", "encoder_ms", "per_sentence_ms",
                                                       "worst_case_sentence_ms")},
                             "decoder_blocks": result["decoder_per_token"]["blocks"],
                             "decoder_mbytes": result["decoder_per_token"]["mbytes"]})

    print(f"Calibration (deploy/estimate.py): {estimate.LABEL}.\n")
    print("| chip | encoder ms | decoder step ms | fitted block µs | fitted bandwidth GB/s | source |")
    print("|---|---:|---:|---:|---:|---|")
    for anchor in estimate.ANCHORS:
        fit = estimate.fit(anchor)
        source = "model zoo table" if anchor.source == estimate.ZOO_TABLE else "demo README"
        print(f"| {anchor.chip} | {anchor.encoder_ms:.2f} | {anchor.decoder_ms:.2f} | {1e3 * fit.block_ms:.1f} | "
              f"{fit.bandwidth_gb_s:.1f} | {source} |")
    print(f"| **rv1126b** (from {estimate.REFERENCE_CHIP}) | | | {1e3 * calibration.block_ms.low:.1f}-"
          f"{1e3 * calibration.block_ms.high:.1f} | {calibration.bandwidth_gb_s.low:.1f}-"
          f"{calibration.bandwidth_gb_s.high:.1f} | clocks, RKLLM |\n")
    print(f"| preset | parameters | decoder | V | precision | decoder MB/step | ms/token | encoder ms | "
          f"ms per {args.tokens:g}-token sentence | worst case ({TARGET_LEN} tokens) |")
    print("|---|---:|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [f"{r[k]['low']:.2f}-{r[k]['high']:.2f}" for k in ("per_token_ms", "encoder_ms")]
        cells += [f"{r[k]['low']:.1f}-{r[k]['high']:.1f}" for k in ("per_sentence_ms", "worst_case_sentence_ms")]
        print(f"| {r['preset']} | {r['parameters'] / 1e6:.1f}M | {r['decoder']} | {r['V']:,} | {r['precision']} | "
              f"{r['decoder_mbytes']:.2f} | " + " | ".join(cells) + " |")
    write_results("npu_estimate", args.out, {"tokens": args.tokens, "source_len": SOURCE_LEN,
                                             "target_len": TARGET_LEN, "calibration": calibration.describe(),
                                             "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
