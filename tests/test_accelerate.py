"""`accelerate launch --config_file ds_configs/accelerate_zero3.yaml train_ds.py ...` runs the same training as
`deepspeed --num_gpus 2 train_ds.py ...`: the student's engine made by accelerator.prepare, the frozen teacher's
by deepspeed.initialize. Both launches run here on two CPU ranks (gloo) with the same flags and must agree
bit for bit, step by step: losses, learning rates (the LambdaLR schedule handed to the engine) and the final
weights.

Both runs are given OMP_NUM_THREADS=1: torch.distributed.run (accelerate's launcher) sets it to 1 for every
rank on its own, the deepspeed launcher leaves torch's default (one thread per core), and the thread count
changes the order of float reductions in the CPU kernels (on a 2-core machine, 2 threads against 1 moved step
3's loss in the 7th digit and the final weights by up to 3e-6). With the same thread count nothing differs.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, launch
from engine import free_port

ARGS = ["--stage", "distill", "--max_steps", "4", "--save_every", "100", "--eval_every", "100", "--keep", "2",
        "--micro_batch_size", "8", "--data.tokens_per_batch", "0", "--data.valid_subset", "4",
        "--data.vocab_size", "600", "--lr", "3e-3", "--warmup_steps", "2", "--log_every", "1"]
YAML = ROOT / "ds_configs" / "accelerate_zero3.yaml"


def accelerate_launch(log: Path, *args: str) -> subprocess.Popen:
    """`accelerate launch --config_file ds_configs/accelerate_zero3.yaml --num_processes 2 train_ds.py ARGS`, started
    in the background with its output in `log` (a pipe nobody reads while it runs could fill and stall it)."""
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", str(YAML),
           "--num_processes", "2", "--main_process_port", str(free_port()), "train_ds.py", *args]
    with log.open("w") as handle:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def steps(run: Path) -> dict[int, tuple[float, float]]:
    """(loss, lr) of every training step in RUN/metrics.jsonl."""
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: (e["loss"], e["lr"]) for e in entries if "eval" not in e}


def test_accelerate_launch_trains_like_deepspeed_launch(tiny_teacher, small_corpus, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # both launchers (see the module docstring)
    monkeypatch.delenv("RK_DISTILL_FAULT", raising=False)
    common = [*ARGS, "--teacher", str(tiny_teacher), "--data", str(small_corpus)]
    acc, ref = tmp_path / "accelerate", tmp_path / "deepspeed"
    started = time.perf_counter()
    # the two launches run side by side, which keeps the test short; neither's numbers depend on the other
    process = accelerate_launch(tmp_path / "accelerate.log", *common, "--out", str(acc))
    try:
        reference = launch(*common, "--out", str(ref))
        returncode = process.wait(timeout=600)
    finally:
        if process.poll() is None:  # launch() failed first: stop the launcher and its ranks (its own session)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    print(f"both launches: {time.perf_counter() - started:.0f} s")
    out = (tmp_path / "accelerate.log").read_text()
    assert returncode == 0, out[-6000:]
    assert "2 rank(s)" in out and "engine made by accelerate.prepare (DistributedType.DEEPSPEED, 2 processes)" in out
    assert "accelerate.prepare" not in reference.stdout  # the reference took plain deepspeed.initialize
    assert (acc / "final" / "model.safetensors").is_file() and (acc / "checkpoints" / "step4").is_dir()
    by_accelerate, by_deepspeed = steps(acc), steps(ref)
    assert sorted(by_accelerate) == [1, 2, 3, 4]
    assert by_accelerate == by_deepspeed  # losses and learning rates, bit for bit
    assert len({lr for _, lr in by_accelerate.values()}) == 4  # the schedule moved at every step
    mine, theirs = load_file(acc / "final" / "model.safetensors"), load_file(ref / "final" / "model.safetensors")
    assert mine.keys() == theirs.keys()
    assert all(mine[k].equal(theirs[k]) for k in mine)
