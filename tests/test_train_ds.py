"""A real 2-rank CPU DeepSpeed ZeRO-3 run: teacher fine-tuning, distillation, exact resume, export."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import corpus
import engine
import vocabulary
from conftest import COMMON, DISTILL, ROOT, launch, step_losses  # the sft_run/distill_run fixtures live in conftest.py


def test_sft_exports_a_teacher_folder(sft_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    final = sft_run / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.vocab_size % 64 == 0 and len(tokenizer) < model.config.vocab_size
    losses = step_losses(sft_run)
    assert sorted(losses) == list(range(1, 13))
    assert sum(list(losses.values())[-3:]) < sum(list(losses.values())[:3])


def test_distillation_learns_logs_and_exports(distill_run):
    losses = step_losses(distill_run)
    assert sorted(losses) == list(range(1, 25))
    first, last = sum(losses[s] for s in (1, 2, 3)), sum(losses[s] for s in (22, 23, 24))
    assert last < 0.8 * first, losses
    evals = [json.loads(line) for line in (distill_run / "metrics.jsonl").read_text().splitlines()
             if "eval" in line]
    assert [e["step"] for e in evals] == [12, 24] and all("bleu" in e and "chrf" in e for e in evals)
    tb = list((distill_run / "tb").glob("events.out.tfevents.*"))
    assert tb, "TensorBoard events missing"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = EventAccumulator(str(tb[0])).Reload().Tags()["scalars"]
    for tag in ("loss/total", "loss/kd", "loss/ce", "lr", "grad_norm", "throughput/tokens_per_s",
                "time/teacher_ms", "time/student_ms", "memory/max_allocated_gb", "eval/loss", "eval/bleu",
                "eval/chrf"):
        assert tag in tags, tag
    final = distill_run / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab_map.json", "training_config.json"):
        assert (final / name).is_file(), name
    out = subprocess.run([sys.executable, "-m", "inference.translate", "--model", str(final), "--direction",
                          "zh-en", "打开文件", "保存"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert len(out.stdout.splitlines()) == 2


def test_resume_is_exact(distill_run, sft_run, small_corpus, tmp_path):
    run = tmp_path / "halted"
    args = [*DISTILL, "--teacher", str(sft_run / "final"), "--data", str(small_corpus), "--out", str(run)]
    launch(*args, "--halt_at", "10")
    assert (run / "checkpoints" / "step10").is_dir() and not (run / "final").exists()
    launch(*args, "--resume")
    uninterrupted, resumed = step_losses(distill_run), step_losses(run)
    for step in range(11, 25):
        assert abs(resumed[step] - uninterrupted[step]) < 1e-6, (step, resumed[step], uninterrupted[step])


def test_zero2_student_trains_evaluates_and_exports(sft_run, small_corpus, tmp_path):
    """ds_configs/zero2.json for the student (a small one gains nothing from partitioned weights); the teacher
    stays under ZeRO-3. Trains, evaluates, exports its best, and its checkpoint exports offline to the same."""
    from model import StudentForTranslation
    run = tmp_path / "zero2"
    launch(*DISTILL, "--teacher", str(sft_run / "final"), "--data", str(small_corpus), "--out", str(run),
           "--ds_config", "ds_configs/zero2.json", "--max_steps", "4", "--eval_every", "4")
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval" in line]
    assert [e["step"] for e in evals] == [4]
    student = StudentForTranslation.from_pretrained(run / "final")
    assert student.config.vocab_size == vocabulary.VocabMap.load(run / "final").size
    # the offline export reads ZeRO-2 checkpoints too: the step-4 weights, as the run's own export wrote them
    subprocess.run([sys.executable, "train_ds.py", "export", "--ckpt", str(run / "checkpoints"), "--out",
                    str(tmp_path / "exported")], cwd=ROOT, check=True, capture_output=True)
    exported = StudentForTranslation.from_pretrained(tmp_path / "exported").state_dict()
    assert all(torch.equal(exported[k], v) for k, v in student.state_dict().items())


def test_export_consolidates_zero3_shards(distill_run, tmp_path):
    from model import StudentForTranslation
    out = tmp_path / "exported"
    subprocess.run([sys.executable, "train_ds.py", "export", "--ckpt", str(distill_run / "checkpoints"),
                    "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    exported = StudentForTranslation.from_pretrained(out)
    final = StudentForTranslation.from_pretrained(distill_run / "final")  # best == last here? compare shapes only
    assert exported.state_dict().keys() == final.state_dict().keys()
    assert vocabulary.VocabMap.load(out).size == final.config.vocab_size


def test_streamed_corpus_trains_and_resumes_exactly(tiny_teacher, small_corpus, tmp_path):
    """--data.stream_window: the train split read from a save_to_disk folder in 100-row windows; a run halted
    at step 3 resumes at its saved stream position and ends with the uninterrupted run's losses."""
    import datasets
    pairs = {split: corpus.read_pairs(small_corpus / f"{split}.jsonl") for split in ("train", "valid")}
    arrow = tmp_path / "arrow"
    datasets.DatasetDict({name: datasets.Dataset.from_dict({"zh": [p.zh for p in ps], "en": [p.en for p in ps]})
                          for name, ps in (("train", pairs["train"]), ("validation", pairs["valid"]))}
                         ).save_to_disk(str(arrow))
    args = ["--stage", "distill", "--teacher", str(tiny_teacher), "--data", str(arrow), "--max_steps", "6",
            "--eval_every", "100", "--micro_batch_size", "8", "--data.tokens_per_batch", "0",
            "--data.stream_window", "100", "--data.valid_subset", "4", "--data.vocab_size", "600",
            "--warmup_steps", "2", "--log_every", "1", "--seq_kd", "false"]
    whole = tmp_path / "whole"
    result = launch(*args, "--out", str(whole))
    assert "streaming 600 train rows in windows of 100" in result.stdout
    halted = tmp_path / "halted"
    launch(*args, "--out", str(halted), "--halt_at", "3")
    launch(*args, "--out", str(halted), "--resume")
    assert step_losses(halted) == step_losses(whole) and sorted(step_losses(whole)) == list(range(1, 7))


def test_bf16_run_fine_tunes_distils_resumes_and_exports_float32(tiny_teacher, small_corpus, tmp_path):
    """--train.bf16 on, as every GPU run trains, on CPU's bf16 kernels: teacher fine-tuning, then distillation with
    seq-KD and on-policy steps, evaluation, a checkpoint, an exact resume and the export. The student folder holds
    float32 weights that load and translate; the fine-tuned teacher keeps bf16 and says so in its config."""
    from safetensors import safe_open

    from inference import Translator
    from model import StudentForTranslation
    bf16 = ["--train.bf16", "on"]
    sft = tmp_path / "sft"
    launch("--stage", "sft", "--teacher", str(tiny_teacher), "--data", str(small_corpus), "--out", str(sft),
           "--max_steps", "4", "--eval_every", "4", *COMMON, *bf16)
    with safe_open(sft / "final" / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}
    assert json.loads((sft / "final" / "config.json").read_text())["dtype"] == "bfloat16"

    args = [*DISTILL, "--teacher", str(sft / "final"), "--data", str(small_corpus), "--max_steps", "6",
            "--eval_every", "3", "--seq_kd", "--on_policy_ratio", "0.5",
            "--distill.seq_kd_cache", str(tmp_path / "seq_kd.jsonl"), *bf16]
    result = launch(*args, "--out", str(tmp_path / "whole"))
    assert "bf16 True" in result.stdout and "teacher translations in" in result.stdout
    launch(*args, "--out", str(tmp_path / "halted"), "--halt_at", "3")
    launch(*args, "--out", str(tmp_path / "halted"), "--resume")
    whole, resumed = step_losses(tmp_path / "whole"), step_losses(tmp_path / "halted")
    assert sorted(whole) == list(range(1, 7)) and all(math.isfinite(v) for v in whole.values())
    assert all(resumed[s] == whole[s] for s in range(4, 7)), (resumed, whole)
    entries = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries if "eval" in e] == [3, 6] and any(e.get("on_policy") for e in entries)

    final = tmp_path / "whole" / "final"
    student = StudentForTranslation.from_pretrained(final)
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    assert len(Translator(final).translate(["打开文件", "保存"], "zh-en")) == 2


LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def without_launcher() -> dict:
    """The environment of `python train_ds.py ...` typed in a shell: no launcher variables."""
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}


def test_every_path_is_checked_in_one_line_before_anything_loads(tiny_teacher, small_corpus, student_folder,
                                                                 tmp_path, capsys):
    import config as config_lib
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "vision").mkdir()
    (tmp_path / "vision" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text((tiny_teacher / "config.json").read_text())
    good = ["--teacher", str(tiny_teacher), "--data", str(small_corpus), "--out", str(tmp_path / "run")]
    cases = [
        (["--teacher", "/nonexistent"], "--teacher /nonexistent: no such folder; expected a local Hugging Face"),
        (["--teacher", str(tmp_path / "a_file")], "a file, not a folder"),
        (["--teacher", str(tmp_path / "empty")], "no config.json in this folder"),
        (["--teacher", str(student_folder)], "a distilled student (rk_student), not a teacher"),
        (["--teacher", str(tmp_path / "vision")], "a vit model, which transformers cannot load as a causal LM"),
        (["--teacher", str(tmp_path / "no_weights")], "no weights (*.safetensors) in this folder"),
        (["--data", "/nonexistent/corpus"], "--data /nonexistent/corpus: no such file or folder"),
        (["--data", str(tmp_path / "empty")], "this folder has no train.jsonl or valid.jsonl"),
        (["--data", str(small_corpus / "train.jsonl")], "a single file holds only a train split"),
        (["--ds_config", "ds_configs/zero9.json"], "--ds_config ds_configs/zero9.json: no such file"),
        (["--resume"], "--resume latest: no such checkpoint in"),
        (["--stage", "export", "--ckpt", str(tmp_path / "empty")], "not a run's checkpoints folder"),
    ]
    for extra, message in cases:
        args, cfg = config_lib.parse_run_args([*good, *extra], "", engine.has_gpu)
        with pytest.raises((config_lib.ConfigError, corpus.CorpusError), match=re.escape(message)):
            config_lib.check_run_paths(args, cfg)
    config_lib.check_run_paths(*config_lib.parse_run_args(good, "", engine.has_gpu))  # the good ones pass
    with pytest.raises(SystemExit):
        config_lib.parse_run_args([*good, "--config", "/nonexistent.yaml"], "", engine.has_gpu)
    assert capsys.readouterr().err.startswith("train_ds.py: --config /nonexistent.yaml: no such file")

    # as a user meets it: one line, before any process group starts, whether launched or not
    result = subprocess.run([sys.executable, "train_ds.py", "--stage", "distill", "--teacher", "/nonexistent",
                             "--data", str(small_corpus)], cwd=ROOT, env=without_launcher(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("train_ds.py: --teacher /nonexistent: no such folder")
    assert "init_distributed" not in result.stdout + result.stderr


def test_without_a_launcher_it_trains_as_one_process_and_its_log_file_has_no_bar_redraws(tiny_teacher, small_corpus,
                                                                                          tmp_path):
    """`python train_ds.py ...` (no launcher, as people debug) is a world of one rank; with its output going to a
    file (CI, nohup, a scheduler) no progress bar is redrawn into it: the file reads as a log."""
    run, log_file = tmp_path / "run", tmp_path / "out.log"
    with log_file.open("w") as handle:
        subprocess.run([sys.executable, "train_ds.py", *DISTILL, "--teacher", str(tiny_teacher), "--data",
                        str(small_corpus), "--out", str(run), "--max_steps", "3", "--eval_every", "3", "--seq_kd"],
                       cwd=ROOT, env=without_launcher(), stdout=handle, stderr=subprocess.STDOUT, timeout=600,
                       check=True)
    text = log_file.read_text()
    assert "1 rank(s) on cpu" in text and "teacher translations in" in text and (run / "final").is_dir()
    assert "\r" not in text and "it/s]" not in text and "src/s]" not in text and "Warning" not in text
    assert len(text.splitlines()) < 20, text
