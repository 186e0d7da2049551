"""translate / evaluate / Translator on real folders: a student saved in a temp dir and the tiny teacher."""

import json
import subprocess
import sys

import pytest
import torch

import data
from conftest import ROOT
from inference import InputTooLongError, Translator
from model import StudentConfig, StudentForTranslation


@pytest.fixture(scope="module")
def student_folder(tiny_teacher, tokenizer, small_corpus, tmp_path_factory):
    pairs = data.read_pairs(small_corpus / "train.jsonl")
    vocab = data.build_vocab_map(tokenizer, [p.zh for p in pairs] + [p.en for p in pairs], 600, 832)
    builder = data.ExampleBuilder(tokenizer, vocab, 24, 24)
    torch.manual_seed(0)
    model = StudentForTranslation(StudentConfig(vocab_size=vocab.size, d_model=32, n_heads=4, encoder_layers=1,
                                                decoder_layers=1, ffn_dim=64, max_source_len=24, max_target_len=24,
                                                pad_token_id=builder.pad_id, bos_token_id=builder.bos_id,
                                                eos_token_id=builder.eos_id))
    folder = tmp_path_factory.mktemp("student")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    vocab.save(folder)
    return folder


def run(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_translate_cli_and_input_file(which, student_folder, tiny_teacher, tmp_path):
    folder = student_folder if which == "student" else tiny_teacher
    lines = tmp_path / "in.txt"
    lines.write_text("打开文件\n\n保存\n", encoding="utf-8")
    out = run("inference.translate", "--model", str(folder), "--direction", "zh-en", "--input", str(lines), "退出")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 3


def test_evaluate_prints_one_json_object(student_folder, small_corpus):
    out = run("inference.evaluate", "--model", str(student_folder), "--test", str(small_corpus / "test.jsonl"),
              "--direction", "en-zh", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"bleu", "chrf", "n", "ms_per_sentence", "params"} <= set(result)
    assert result["n"] + result["skipped_too_long"] == 24
    assert result["params"] == sum(p.numel() for p in StudentForTranslation.from_pretrained(student_folder).parameters())


def test_python_api_refuses_too_long_input(student_folder):
    translator = Translator(student_folder)
    assert len(translator.translate(["打开文件", "Open"], "zh-en")) == 2
    with pytest.raises(InputTooLongError, match="at most 24"):
        translator.translate(["文件" * 60], "zh-en")


def test_missing_folder_is_one_clear_line(tmp_path):
    out = run("inference.translate", "--model", str(tmp_path / "nope"), "x")
    assert out.returncode == 2 and "no config.json" in out.stderr
