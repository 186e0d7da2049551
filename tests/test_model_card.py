"""inference.model_card on real student folders: exported with run metadata, bare, and refreshed with test scores."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

import config
from conftest import ROOT
from inference.model_card import ModelCardError, write_model_card
from model import StudentForTranslation

VALIDATION = {"step": 120, "loss": 3.2, "kd": 1.1, "ce": 4.0, "bleu": 1.5, "chrf": 12.25,
              "directions": {"zh-en": {"bleu": 1.0, "chrf": 10.5, "n": 24},
                             "en-zh": {"bleu": 2.0, "chrf": 14.0, "n": 24}}}


@pytest.fixture
def exported(student_folder, tiny_teacher, small_corpus, tmp_path):
    """The student as the distill stage's save_folder (stages.py) leaves it: weights, tokenizer, vocab map,
    training_config.json (the resolved Config) and metrics.json (the validation result of the exported step)."""
    folder = shutil.copytree(student_folder, tmp_path / "final")
    cfg = config.Config()
    cfg.train.teacher, cfg.data.path, cfg.distill.kd_loss = str(tiny_teacher), str(small_corpus), "jsd"
    cfg.save(folder / "training_config.json")
    (folder / "metrics.json").write_text(json.dumps(VALIDATION))
    return folder


def read_card(folder):
    _, meta, body = (folder / "README.md").read_text(encoding="utf-8").split("---\n", 2)
    return yaml.safe_load(meta), body


def table_rows(body):
    return [[c.strip() for c in line.strip("|").split("|")] for line in body.splitlines() if line.startswith("| ")]


def results(meta):
    """{direction: (split, bleu, chrf)} from the model-index."""
    return {r["task"]["name"].split()[-1]: (r["dataset"]["split"], *(m["value"] for m in r["metrics"]))
            for r in meta["model-index"][0]["results"]}


def test_card_from_an_exported_folder(exported, tiny_teacher, small_corpus):
    assert write_model_card(exported) == exported / "README.md"
    meta, body = read_card(exported)
    assert (meta["language"], meta["license"], meta["metrics"]) == (["zh", "en"], "other", ["bleu", "chrf"])
    assert {"translation", "distillation"} <= set(meta["tags"])
    assert results(meta) == {"zh-en": ("validation", 1.0, 10.5), "en-zh": ("validation", 2.0, 14.0)}
    student = StudentForTranslation.from_pretrained(exported)
    rows = {cells[0]: cells[1] for cells in table_rows(body) if len(cells) == 2}
    assert rows["Teacher"] == f"`{tiny_teacher}`"
    assert rows["Training data"] == f"`{small_corpus}`"
    assert rows["Preset"] == "`custom`"
    assert rows["Parameters"] == f"{sum(p.numel() for p in student.parameters()):,}"
    assert rows["Decoder"].startswith("transformer (")
    assert rows["Vocabulary"].startswith(f"{student.config.vocab_size:,} tokens")
    assert rows["Maximum length"] == "24 source tokens, 24 target tokens"
    assert rows["Distillation"] == "jsd, alpha 0.5, temperature 2.0"
    assert rows["Exported at step"] == "120"
    assert f"| zh-en | validation: subset of `{small_corpus}` that picked this checkpoint | 1.00 | 10.50 | 24 |" in body
    assert "Not scored on a test split yet (validation scores chose this checkpoint" in body
    for usage in ("from inference import Translator", "python -m inference.translate --model MODEL_DIR",
                  "python -m deploy --model MODEL_DIR", "## Limitations", "Inputs over 24 source tokens are refused"):
        assert usage in body


def test_test_scores_replace_validation_per_direction(exported):
    write_model_card(exported, metrics={"en-zh": {"bleu": 7.5, "chrf": 30.25, "n": 20, "test": "data/test.jsonl"}})
    meta, body = read_card(exported)
    assert results(meta) == {"zh-en": ("validation", 1.0, 10.5), "en-zh": ("test", 7.5, 30.25)}
    assert "| en-zh | test: `data/test.jsonl` | 7.50 | 30.25 | 20 |" in body


def test_bare_folder_still_gets_a_card(student_folder, tmp_path):
    folder = shutil.copytree(student_folder, tmp_path / "bare")
    write_model_card(folder)
    meta, body = read_card(folder)
    assert "model-index" not in meta and meta["language"] == ["zh", "en"]
    assert "| Teacher | not recorded |" in body and "| Training data | not recorded |" in body
    assert "Not scored on a test split yet. Add test scores with:" in body


def test_cli_refreshes_the_card_with_evaluate_json(exported, small_corpus, tmp_path):
    evaluated = subprocess.run([sys.executable, "-m", "inference.evaluate", "--model", str(exported), "--test",
                                str(small_corpus / "test.jsonl"), "--direction", "zh-en", "--json"], cwd=ROOT,
                               capture_output=True, text=True)
    assert evaluated.returncode == 0, evaluated.stderr
    (tmp_path / "zh-en.json").write_text(evaluated.stdout)
    result = json.loads(evaluated.stdout)
    done = subprocess.run([sys.executable, "-m", "inference.model_card", "--model", str(exported), "--eval",
                           str(tmp_path / "zh-en.json")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    meta, body = read_card(exported)
    assert results(meta)["zh-en"] == ("test", result["bleu"], result["chrf"])
    assert (f"| zh-en | test: `{small_corpus / 'test.jsonl'}` | {result['bleu']:.2f} | {result['chrf']:.2f} | "
            f"{result['n']} |") in body


def test_refusals_say_what_to_do(exported, tiny_teacher, tmp_path):
    with pytest.raises(ModelCardError, match="not a student folder .* give a folder exported by train_ds.py"):
        write_model_card(tiny_teacher)
    with pytest.raises(ModelCardError, match="scored a model with 999 parameters, this folder's has .*; evaluate"):
        write_model_card(exported, metrics={"zh-en": {"bleu": 1.0, "chrf": 2.0, "params": 999}})
    with pytest.raises(ModelCardError, match=r"metrics\['zh-en'\] has no chrf"):
        write_model_card(exported, metrics={"zh-en": {"bleu": 1.0}})
    (tmp_path / "log.txt").write_text("BLEU 1.0\n")
    done = subprocess.run([sys.executable, "-m", "inference.model_card", "--model", str(exported), "--eval",
                           str(tmp_path / "log.txt")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith(f"model_card: {tmp_path / 'log.txt'}: not readable as the JSON object")


def test_card_from_a_real_distillation_run(distill_run, sft_run, tmp_path):
    """The folder train_ds.py itself exported, so the card reads the files save_folder really writes."""
    folder = shutil.copytree(distill_run / "final", tmp_path / "final")
    write_model_card(folder)
    meta, body = read_card(folder)
    saved = json.loads((folder / "metrics.json").read_text())["directions"]
    assert results(meta) == {d: ("validation", s["bleu"], s["chrf"]) for d, s in saved.items()}
    rows = {cells[0]: cells[1] for cells in table_rows(body) if len(cells) == 2}
    assert rows["Teacher"] == f"`{sft_run / 'final'}`"
    assert rows["Preset"] == "`tiny`"
    student = StudentForTranslation.from_pretrained(folder)
    assert rows["Parameters"] == f"{sum(p.numel() for p in student.parameters()):,}"
