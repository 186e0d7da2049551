"""Tokens/s of the full distillation step under DeepSpeed ZeRO-3 against the teacher-forward-only ceiling,
measured in the same run on the same batches, for each teacher placement.

    python -m bench.train_step                      # CPU: 2 ranks, a 32M-parameter Qwen2-shaped teacher
    python -m bench.train_step --shape gpu          # every GPU, the Qwen1.5-1.8B shape (random weights), bf16

The ceiling is the work no distiller can skip: the teacher's forward pass over the prompt and target, plus
its kept output rows at target positions. The full step adds the student's forward and backward, the fused
loss and the optimiser step. ratio = full-step tokens/s / ceiling tokens/s; the issue's target is >= 0.6.
Writes bench/results/train_step-<shape>.json and prints a table; each placement is its own deepspeed job.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.results_io import write_results
from engine import free_port

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"


@dataclass(frozen=True)
class Setting:
    teacher_size: str       # a scripts/make_tiny_teacher.py size
    preset: str             # student preset
    ranks: int
    tokens_per_batch: int   # padded student tokens per micro-batch per rank
    batches: int            # timed micro-batches per rank and phase
    warmup: int


SETTINGS = {
    "cpu": Setting("medium", "tiny", 2, 1024, 12, 3),
    "gpu": Setting("qwen1.5-1.8b", "balanced", 0, 8192, 30, 5),  # ranks 0 = every GPU
}


# ----------------------------------------------------------------------------- one deepspeed job (every rank)

def worker(argv: list[str]) -> None:
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    import config as config_lib
    import data
    import engine
    import stages
    import teacher
    from step_log import StepTimer, gpu_name, peak_flops

    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--result", type=Path, required=True)
    own, rest = parser.parse_known_args(argv)
    _, cfg = config_lib.parse_run_args(rest, __doc__, engine.has_gpu)
    procs = engine.start_processes()  # the run's own set-up: this rank's device bound, then the process group
    rank, world, device, on_gpu = procs.rank, procs.world, procs.device, procs.on_gpu
    accelerator = get_accelerator()
    cfg.train.ds_config = engine.resolve_ds_config(cfg, "distill", on_gpu)
    engine.setup_logging(Path(cfg.train.out))
    stage = stages.DistillStage(cfg)
    prepared = data.prepare_run_data(cfg, Path(cfg.train.out), rank, world, stage.trims_vocabulary)
    models = stage.build_models(prepared, Path(cfg.train.out), world, on_gpu, on_gpu, device)
    builder = prepared.builder
    mine = data.make_batches(prepared.train_examples, cfg.train.micro_batch_size, cfg.data.tokens_per_batch,
                             cfg.train.seed, 0, world)[rank::world][:own.warmup + own.batches]
    batches = [engine.to_device(builder.collate([prepared.train_examples[i] for i in indices]), device)
               for indices in mine]

    def teacher_only(batch):
        with torch.no_grad():
            labels = batch["labels"]
            hidden = teacher.teacher_hidden(models.teacher, batch, labels.shape[1])
            return hidden.flatten(0, 1).index_select(0, batch["target_positions"]) @ models.teacher_rows.T

    def full_step(batch):
        parts = stage.batch_loss(models, batch, StepTimer(accelerator, on_gpu))
        models.engine.backward(parts.total)
        models.engine.step()

    def timed(work, chosen) -> float:
        accelerator.synchronize()
        dist.barrier()
        start = time.perf_counter()
        for batch in chosen:
            work(batch)
        accelerator.synchronize()
        dist.barrier()
        return time.perf_counter() - start

    warm, measured = batches[:own.warmup], batches[own.warmup:]
    timed(teacher_only, warm)
    timed(full_step, warm)
    # ceiling measured before and after the full steps, so drift (clocks, caches) cancels out
    ceiling_s = (timed(teacher_only, measured) + timed(teacher_only, measured)) / 2
    full_s = timed(full_step, measured)
    counts = torch.tensor([sum(int(b["teacher_attention_mask"].sum()) for b in measured),
                           sum(int(b["source_mask"].sum()) for b in measured),
                           sum(int((b["labels"] != data.IGNORE_INDEX).sum()) for b in measured)],
                          dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    teacher_tokens, source_tokens, target_tokens = counts.tolist()
    peak = peak_flops(gpu_name(on_gpu))
    flops = models.flops(teacher_tokens, source_tokens, target_tokens)
    teacher_flops = models.flops.teacher_per_token * teacher_tokens \
        + models.flops.teacher_head_per_target * target_tokens
    if rank == 0:
        result = {
            "ranks": world, "device": torch.cuda.get_device_name() if on_gpu else "cpu",
            "placement": cfg.distill.teacher_placement, "student_parameters": models.flops.student_parameters,
            "teacher_tokens": teacher_tokens, "target_tokens": target_tokens,
            "ceiling_tokens_per_s": teacher_tokens / ceiling_s, "full_tokens_per_s": teacher_tokens / full_s,
            "ratio": ceiling_s / full_s, "ceiling_ms_per_batch": 1000 * ceiling_s / own.batches,
            "full_ms_per_batch": 1000 * full_s / own.batches,
            "full_tflops_per_rank": flops / full_s / world / 1e12,
            "ceiling_tflops_per_rank": teacher_flops / ceiling_s / world / 1e12,
            "mfu": flops / full_s / world / peak if peak else None,
        }
        own.result.write_text(json.dumps(result, indent=2) + "\n")
    dist.barrier()


# ----------------------------------------------------------------------------- driver (one process)

def prepare_inputs(setting: Setting) -> tuple[Path, Path]:
    """The catalog corpus and a random teacher of the setting's shape, built once under bench/.cache."""
    import corpus
    from scripts import make_tiny_teacher
    catalogs = CACHE / "catalogs"
    if not (catalogs / "train.jsonl").is_file():
        corpus.build_catalog_corpus("/usr/share/locale", catalogs)
    teacher = CACHE / f"teacher-{setting.teacher_size}"
    if not (teacher / "config.json").is_file():
        print(f"building a random {setting.teacher_size} teacher in {teacher} (once)", file=sys.stderr)
        make_tiny_teacher.build_teacher(corpus.read_pairs(catalogs / "train.jsonl"), teacher, setting.teacher_size,
                                        force=True)
    return catalogs, teacher


def run_job(setting: Setting, placement: str, corpus: Path, teacher: Path, ranks: int) -> dict:
    run = CACHE / f"run-{placement}"
    result = run / "result.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
           "--master_port", str(free_port()), "--module", "bench.train_step", "--_worker",
           "--batches", str(setting.batches), "--warmup", str(setting.warmup), "--result", str(result),
           "--stage", "distill", "--teacher", str(teacher), "--data", str(corpus), "--out", str(run),
           "--preset", setting.preset, "--teacher_placement", placement,
           "--data.tokens_per_batch", str(setting.tokens_per_batch), "--data.vocab_size", "8000"]
    print("$ " + " ".join(cmd), file=sys.stderr)
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                          text=True)
    if done.returncode != 0 or not result.is_file():
        raise SystemExit(f"bench/train_step.py: the {placement} job failed:\n{done.stdout[-3000:]}"
                         f"{done.stderr[-3000:]}")
    return json.loads(result.read_text())


def table(rows: list[dict]) -> str:
    lines = ["| placement | ranks | ceiling tok/s (teacher fwd only) | full step tok/s | ratio | "
             "ms/batch ceiling / full | TFLOP/s per rank | MFU |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (CPU)"
        lines.append(f"| {r['placement']} | {r['ranks']} | {r['ceiling_tokens_per_s']:,.0f} | "
                     f"{r['full_tokens_per_s']:,.0f} | {r['ratio']:.2f} | {r['ceiling_ms_per_batch']:.0f} / "
                     f"{r['full_ms_per_batch']:.0f} | {r['full_tflops_per_rank']:.3f} | {mfu} |")
    return "\n".join(lines)


def main() -> None:
    if "--_worker" in sys.argv:
        return worker([a for a in sys.argv[1:] if a != "--_worker"])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SETTINGS), default=None,
                        help="cpu: 2 CPU ranks, 32M teacher, tiny student; gpu: every GPU, Qwen1.5-1.8B-shaped "
                             "teacher, balanced student (default: gpu when CUDA is available)")
    parser.add_argument("--placements", default="resident,sharded",
                        help="comma-separated teacher placements to measure (resident, sharded, offload)")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the results (default: bench/results/train_step-<shape>.json)")
    args = parser.parse_args()

    import torch
    shape = args.shape or ("gpu" if torch.cuda.is_available() else "cpu")
    setting = SETTINGS[shape]
    ranks = setting.ranks or torch.cuda.device_count()
    corpus, teacher = prepare_inputs(setting)
    rows = [run_job(setting, placement, corpus, teacher, ranks) for placement in args.placements.split(",")]
    print(table(rows))
    write_results(f"train_step-{shape}", args.json, {"shape": shape, "setting": setting.__dict__, "rows": rows})

if __name__ == "__main__":
    main()
