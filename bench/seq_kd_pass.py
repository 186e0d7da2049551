"""Sources/s of the seq-KD teacher pass (the teacher translating every scheduled training source before step 1),
for each teacher placement, on a fresh cache every time.

    python -m bench.seq_kd_pass                     # CPU: 2 ranks, the 32M-parameter Qwen2-shaped random teacher
    python -m bench.seq_kd_pass --shape gpu         # every GPU, the Qwen1.5-1.8B shape (random weights), bf16

Each placement is one real `train_ds.py --stage distill` job halted after step 1; the figure is read from the
run's own log line ("seq_kd: N teacher translations in S s"). A random teacher never emits its end token, so
every source decodes to the length limit: the worst case, and the same work whatever the decoding code.
Writes bench/results/seq_kd_pass-<shape>.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.results_io import write_results
from bench.train_step import CACHE, SETTINGS, prepare_inputs
from engine import free_port

ROOT = Path(__file__).resolve().parents[1]


PASS_LINE = re.compile(r"seq_kd: (\d+) teacher translations in ([\d.]+) s")


@dataclass(frozen=True)
class PassSetting:
    steps: int            # scheduled optimiser steps: their sources are what the teacher translates
    micro_batch: int      # sentences per micro-batch and rank
    max_target_len: int   # the decoding length limit


PASSES = {"cpu": PassSetting(16, 16, 32), "gpu": PassSetting(200, 64, 48)}


def run_pass(shape: str, placement: str, corpus: Path, teacher: Path, ranks: int, extra: list[str]) -> dict:
    setting = PASSES[shape]
    run = CACHE / f"seq_kd-{placement}"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
           str(free_port()), "train_ds.py", "--stage", "distill", "--teacher", str(teacher), "--data", str(corpus),
           "--out", str(run), "--preset", SETTINGS[shape].preset, "--teacher_placement", placement,
           "--max_steps", str(setting.steps), "--halt_at", "1", "--micro_batch_size", str(setting.micro_batch),
           "--data.tokens_per_batch", "0", "--model.max_target_len", str(setting.max_target_len),
           "--eval_every", "1000000", "--seq_kd", "true", "--distill.seq_kd_cache", str(run / "cache.jsonl"),
           *extra]
    subprocess.run(["rm", "-rf", str(run)], check=True)
    print("$ " + " ".join(cmd), file=sys.stderr)
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                          text=True)
    found = PASS_LINE.search(done.stdout)
    if done.returncode != 0 or not found:
        raise SystemExit(f"bench/seq_kd_pass.py: the {placement} job failed:\n{done.stdout[-3000:]}"
                         f"{done.stderr[-3000:]}")
    sources, seconds = int(found.group(1)), float(found.group(2))
    return {"placement": placement, "ranks": ranks, "sources": sources, "seconds": seconds,
            "sources_per_s": sources / seconds, "max_target_len": setting.max_target_len}


def table(rows: list[dict]) -> str:
    lines = ["| placement | ranks | sources | seconds | sources/s |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['placement']} | {r['ranks']} | {r['sources']:,} | {r['seconds']:.1f} | "
                     f"{r['sources_per_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(PASSES), default=None,
                        help="cpu: 2 CPU ranks, 32M teacher; gpu: every GPU, Qwen1.5-1.8B-shaped teacher "
                             "(default: gpu when CUDA is available)")
    parser.add_argument("--placements", default="resident,sharded",
                        help="comma-separated teacher placements to measure (resident, sharded, offload)")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the results (default: bench/results/seq_kd_pass-<shape>.json)")
    parser.add_argument("--label", default="", help="a note stored with the results (e.g. the commit measured)")
    parser.add_argument("train_args", nargs="*", help="extra train_ds.py flags after `--` (e.g. "
                                                      "--distill.seq_kd_batch 128)")
    args = parser.parse_args()

    import torch
    shape = args.shape or ("gpu" if torch.cuda.is_available() else "cpu")
    ranks = SETTINGS[shape].ranks or torch.cuda.device_count()
    corpus, teacher = prepare_inputs(SETTINGS[shape])
    rows = [run_pass(shape, placement, corpus, teacher, ranks, args.train_args)
            for placement in args.placements.split(",")]
    print(table(rows))
    write_results(f"seq_kd_pass-{shape}", args.json, {"shape": shape, "label": args.label,
                                                      "setting": PASSES[shape].__dict__, "rows": rows})


if __name__ == "__main__":
    main()
