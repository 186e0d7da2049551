"""scripts/stored_teacher.py and what the quickstart starts from: the committed teacher models/tiny-qwen-catalogs,
checked against this machine's catalog split, and the two training recipes under scripts/recipes/."""

from __future__ import annotations

import json
import shutil

import pytest

import config as config_lib
import engine
import teacher
from conftest import ROOT
from scripts import stored_teacher

STORED = ROOT / "models" / "tiny-qwen-catalogs"


def test_the_committed_teacher_fits_this_machines_corpus_and_loads(corpus_dir):
    """It trained only on catalogs this machine's split puts in train, and it is a Qwen2 causal LM with its
    tokenizer, as train_ds.py checks a teacher folder before any process starts."""
    stored_teacher.check(STORED, corpus_dir)
    record = json.loads((STORED / "corpus.json").read_text())
    here = json.loads((corpus_dir / "stats.json").read_text())["catalogs"]
    assert set(record["train_catalogs"]) <= set(here["train"])
    assert set(record["held_out_catalogs"]) == set(here["valid"]) | set(here["test"])
    teacher.check_teacher_folder("--teacher", str(STORED), trust_remote_code=False)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(STORED)
    assert model.config.model_type == "qwen2" and model.num_parameters() == 1_164_416
    tokenizer = AutoTokenizer.from_pretrained(STORED)
    assert tokenizer.decode(tokenizer("打开文件")["input_ids"]) == "打开文件"


def test_a_teacher_that_saw_a_held_out_catalog_is_refused_in_one_line(corpus_dir, tmp_path):
    leaked = tmp_path / "leaked"
    shutil.copytree(STORED, leaked)
    test_catalog = json.loads((corpus_dir / "stats.json").read_text())["catalogs"]["test"][0]
    record = json.loads((leaked / "corpus.json").read_text())
    record["train_catalogs"].append(test_catalog)
    (leaked / "corpus.json").write_text(json.dumps(record))
    with pytest.raises(stored_teacher.StoredTeacherError, match=f"held out here \\({test_catalog}"):
        stored_teacher.check(leaked, corpus_dir)
    assert stored_teacher.main(["check", str(leaked), str(corpus_dir)]) == 2
    (leaked / "corpus.json").unlink()
    with pytest.raises(stored_teacher.StoredTeacherError, match="not a stored teacher"):
        stored_teacher.check(leaked, corpus_dir)


def test_save_stores_a_finished_run_with_its_record(sft_run, corpus_dir, tmp_path):
    """save copies RUN/final with the run's log, the catalogs it trained on and a README of the command, the
    validation curve and the test scores given."""
    score = {"direction": "zh-en", "test": "data/labels/test.jsonl", "n": 723, "bleu": 1.98, "chrf": 19.07}
    (tmp_path / "zh-en.json").write_text(json.dumps(score))
    out = stored_teacher.save(sft_run, corpus_dir, tmp_path / "stored", "python train_ds.py --stage sft ...",
                              [tmp_path / "zh-en.json"])
    assert (out / "model.safetensors").read_bytes() == (sft_run / "final" / "model.safetensors").read_bytes()
    assert (out / "train.log").read_text() == (sft_run / "train.log").read_text()
    catalogs = json.loads((corpus_dir / "stats.json").read_text())["catalogs"]
    assert json.loads((out / "corpus.json").read_text())["train_catalogs"] == catalogs["train"]
    readme = (out / "README.md").read_text()
    assert "python train_ds.py --stage sft ..." in readme
    assert "| zh-en | data/labels/test.jsonl | 723 | 1.98 | 19.07 |" in readme
    for entry in json.loads((sft_run / "history.json").read_text()):
        assert f"| {entry['step']} | {entry['loss']:.3f} |" in readme
    stored_teacher.check(out, corpus_dir)
    with pytest.raises(stored_teacher.StoredTeacherError, match="no model.safetensors"):
        stored_teacher.save(tmp_path, corpus_dir, tmp_path / "nothing", "x", [])


@pytest.mark.parametrize("recipe, stage", [("labels-sft.yaml", "sft"), ("labels-distill.yaml", "distill")])
def test_the_quickstart_recipes_load_as_configs(recipe, stage):
    """The files quickstart.sh and bench/kd_methods.py pass as --config: valid, on the label subset, ZeRO-2,
    whole batches of 32; a flag after them still wins."""
    _, cfg = config_lib.parse_run_args(["--stage", stage, "--config", str(ROOT / "scripts" / "recipes" / recipe),
                                        "--max_steps", "7"], "", engine.has_gpu)
    assert (cfg.data.path, cfg.data.tokens_per_batch, cfg.train.micro_batch_size) == ("data/labels", 0, 32)
    assert cfg.train.ds_config == "ds_configs/zero2.json" and cfg.train.max_steps == 7
    assert cfg.train.lr == (0.0005 if stage == "sft" else 0.002)
