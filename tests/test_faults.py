"""Faults a long distillation run meets, each tried on a real 2-rank ZeRO-3 CPU run (train_ds.py):
pre-emption (SIGTERM, SIGINT), a killed node (SIGKILL in the middle of a step and of a checkpoint save),
non-finite losses, and mismatched models or configs at start-up. Faults are injected with
$RK_DISTILL_FAULT (faults.fault) so each lands at an exact step.

Untrusted files are tried at the end: a pickled student, a teacher folder with its own Python code, a config
file that points outside the project (the C runner's fuzzing is in test_runtime.py, bad corpus lines in
test_corpus.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, launch
from engine import free_port

RUN_ARGS = ["--stage", "distill", "--max_steps", "8", "--save_every", "3", "--eval_every", "100", "--keep", "5",
            "--micro_batch_size", "8", "--data.tokens_per_batch", "0", "--data.valid_subset", "4",
            "--data.vocab_size", "600", "--lr", "3e-3", "--warmup_steps", "2", "--log_every", "1"]


def losses(run: Path) -> dict[int, float]:
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in entries if "eval" not in e}


def latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def args(tiny_teacher, small_corpus):
    return lambda run, *extra: [*RUN_ARGS, "--teacher", str(tiny_teacher), "--data", str(small_corpus),
                                "--out", str(run), *extra]


@pytest.fixture(scope="module")
def uninterrupted(args, tmp_path_factory) -> dict[int, float]:
    run = tmp_path_factory.mktemp("faults") / "clean"
    launch(*args(run))
    return losses(run)


def test_killed_and_preempted_run_resumes_to_the_same_final_loss(args, uninterrupted, tmp_path):
    run = tmp_path / "run"
    # SIGTERM (a scheduler's pre-emption) after step 2's backward: the step completes, is saved, exit 0
    result = launch(*args(run), fault="SIGTERM:in_step@2")
    assert "SIGTERM received: saved step 2" in result.stdout
    assert latest(run) == "step2"
    # SIGKILL in the middle of step 5 (after backward, before the update): step 3's checkpoint stays latest
    result = launch(*args(run), "--resume", fault="SIGKILL:in_step@5", check=False)
    assert result.returncode != 0
    assert latest(run) == "step3"
    # SIGKILL in the middle of saving step 6: the shards were written under a partial name, never published
    result = launch(*args(run), "--resume", fault="SIGKILL:in_save@6", check=False)
    assert result.returncode != 0
    assert latest(run) == "step3" and (run / "checkpoints" / "step6.partial").is_dir()
    assert not (run / "checkpoints" / "step6").exists()
    # SIGINT (Ctrl-C) after step 7's backward: saved cleanly like SIGTERM
    result = launch(*args(run), "--resume", fault="SIGINT:in_step@7")
    assert "SIGINT received: saved step 7" in result.stdout
    launch(*args(run), "--resume")
    resumed = losses(run)  # metrics.jsonl is appended to: the last entry per step is the resumed one
    assert resumed[8] == uninterrupted[8]
    assert all(resumed[s] == uninterrupted[s] for s in uninterrupted)
    assert not list((run / "checkpoints").glob("*.partial"))  # the next published save cleaned it up


def test_non_finite_losses_skip_the_update_and_stop_after_max_bad_steps(args, tmp_path):
    run = tmp_path / "nan"
    # rank 0 alone sees a NaN at steps 2 and 3: both ranks must skip together (or ZeRO-3 would hang)
    result = launch(*args(run, "--max_bad_steps", "2", "--save_every", "1"), fault="nan:loss@2,nan:loss@3",
                    check=False)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "2 steps in a row skipped, the last: non-finite loss at step 3, epoch 0 batch 2" in out
    assert latest(run) == "step2" and not (run / "checkpoints" / "step3").exists()
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries if "skipped" in e] == [2, 3]

    # a single NaN is skipped, counted, and the run goes on to the end
    run = tmp_path / "one_nan"
    result = launch(*args(run), fault="nan:loss@4")
    assert "skipped the update: non-finite loss at step 4" in result.stdout
    assert losses(run)[8] == pytest.approx(losses(run)[8]) and (run / "final").is_dir()


def single_rank(*argv: str) -> subprocess.CompletedProcess:
    """train_ds.py as one process without the launcher (start-up checks fail before any training)."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    return subprocess.run([sys.executable, "train_ds.py", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_resume_with_another_preset_is_refused(args, tmp_path):
    run = tmp_path / "preset"
    launch(*args(run, "--max_steps", "2"))
    result = single_rank(*args(run, "--preset", "balanced", "--max_steps", "2"), "--resume")
    assert result.returncode != 0
    assert "--resume with a different config (model.preset" in result.stderr


def test_teacher_with_fewer_rows_than_its_tokenizer_is_refused(tiny_teacher, small_corpus, tmp_path):
    """A tokenizer with ids past the model's output layer (a tokenizer from another model of the family)."""
    import shutil
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    config = json.loads((teacher / "config.json").read_text())
    from safetensors.torch import load_file, save_file
    weights = load_file(teacher / "model.safetensors")
    rows = 500  # fewer than the tokenizer's 800 ids
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name] = weights[name][:rows].contiguous()
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    config["vocab_size"] = rows
    (teacher / "config.json").write_text(json.dumps(config))
    result = single_rank(*RUN_ARGS, "--teacher", str(teacher), "--data", str(small_corpus),
                         "--out", str(tmp_path / "run"))
    assert result.returncode != 0
    assert "the tokenizer has 800 ids but the model has only 500 output rows" in result.stderr
    assert "Traceback" not in result.stderr


class Payload:
    """Unpickling this would create `marker`: the proof that loading a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickled_student_is_never_loaded(student_folder, tmp_path):
    import shutil

    import torch

    from inference import Translator
    folder = tmp_path / "student"
    shutil.copytree(student_folder, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"payload": Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(OSError, match="model.safetensors"):
        Translator(folder)
    assert not marker.exists()


def test_teacher_code_runs_only_with_trust_remote_code(tiny_teacher, small_corpus, tmp_path):
    import shutil
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    marker = tmp_path / "code-ran"
    (teacher / "evil_config.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import Qwen2Config\nclass EvilConfig(Qwen2Config):\n    model_type = 'evil'\n")
    config = json.loads((teacher / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_config.EvilConfig"}
    config["model_type"] = "evil"  # unknown to transformers: only the folder's own code could build it
    (teacher / "config.json").write_text(json.dumps(config))
    result = single_rank(*RUN_ARGS, "--teacher", str(teacher), "--data", str(small_corpus),
                         "--out", str(tmp_path / "run"))
    assert result.returncode != 0 and "trust_remote_code" in result.stderr
    assert not marker.exists()


def test_a_config_file_cannot_send_a_run_outside_the_project(tmp_path):
    config = tmp_path / "run.json"
    for out in ("/tmp/elsewhere", "../../elsewhere"):
        config.write_text(json.dumps({"train": {"out": out}}))
        result = subprocess.run([sys.executable, "train_ds.py", "--config", str(config), "--max_steps", "1"],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2
        assert f"train.out {out!r} leaves the working folder" in result.stderr
