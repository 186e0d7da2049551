"""translate / evaluate / Translator on real folders: a student saved in a temp dir and the tiny teacher."""

import json
import logging
import subprocess
import sys

import pytest

import corpus
from conftest import ROOT
from inference import InputTooLongError, Translator, splitting
from inference.evaluate import evaluate
from inference.metrics import score
from model import StudentForTranslation


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


LONG_ZH = "打开文件。保存所有更改！是否退出程序？删除选中的文件；复制到剪贴板。"
LONG_EN = "Open the file. Save all your changes! Quit the program now? Delete the selected files; copy them."


@pytest.fixture(scope="module")
def translator(student_folder):
    return Translator(student_folder)


@pytest.fixture(scope="module")
def splitter(student_folder):
    return Translator(student_folder, split_long=True)


def test_python_api_refuses_too_long_input(translator):
    assert len(translator.translate(["打开文件", "Open"], "zh-en")) == 2
    tokens = translator.token_count("文件" * 60)
    assert tokens > 24
    with pytest.raises(InputTooLongError) as refused:
        translator.translate(["打开文件", "文件" * 60], "zh-en")
    assert (refused.value.index, refused.value.tokens, refused.value.limit) == (1, tokens, 24)
    assert str(refused.value).startswith("input 2 ('文件文件")
    assert f"has {tokens} tokens, the model takes at most 24: pass --split_long" in str(refused.value)


def test_sentences_split_at_chinese_and_english_ends():
    text = '他说："好。"然后走了！v3.5 in file.txt is fine?! Yes; go. 「真的？」最后一句'
    assert splitting.sentences(text) == ['他说："好。"', "然后走了！", "v3.5 in file.txt is fine?!", "Yes;",
                                         "go.", "「真的？」", "最后一句"]


@pytest.mark.parametrize(("text", "direction", "joiner"), [(LONG_ZH, "zh-en", " "), (LONG_EN, "en-zh", "")],
                         ids=["zh-en", "en-zh"])
def test_split_long_translates_sentence_by_sentence(splitter, text, direction, joiner):
    assert splitter.token_count(text) > 24
    sentences = splitting.sentences(text)
    assert len(sentences) == 5 and splitter.pieces(text) == sentences
    # The same pieces in the same order, so the same batches: results are comparable bit for bit.
    *each, short = splitter.translate([*sentences, "打开"], direction)
    assert all(each)  # the fixture's student says something for every sentence, so the join is really checked
    assert splitter.translate([text, "打开"], direction) == [joiner.join(each), short]


@pytest.mark.parametrize(("text", "joiner"), [("文件" * 60, ""),
                                              (" ".join(["open the selected file and save it"] * 6), " ")],
                         ids=["zh", "en"])
def test_one_overlong_sentence_is_cut_by_token_count(splitter, text, joiner):
    pieces = splitter.pieces(text)
    assert len(pieces) > 1
    assert all(splitter.token_count(p) <= 24 for p in pieces)
    assert joiner.join(pieces) == text  # nothing dropped; English is cut at spaces, so words stay whole
    assert len(splitter.translate([text], "zh-en")) == 1


def test_cut_off_translations_are_logged(translator, caplog):
    with caplog.at_level(logging.WARNING, logger="inference.translator"):
        translator.translate(["打开文件", "保存"], "zh-en")
    assert "2 of 2 translations reached the model's limit of 24 target tokens" in caplog.text


def test_evaluate_skips_or_splits_long_sources_never_truncates(translator, splitter):
    pairs = [corpus.Pair("打开文件", "Open file"), corpus.Pair(LONG_ZH, LONG_EN), corpus.Pair("保存", "Save")]
    skipped = evaluate(translator, pairs, "zh-en")
    assert (skipped["n"], skipped["skipped_too_long"], skipped["split_too_long"]) == (2, 1, 0)
    split = evaluate(splitter, pairs, "zh-en")
    assert (split["n"], split["skipped_too_long"], split["split_too_long"]) == (3, 0, 1)
    pieces = splitter.translate(["打开文件", *splitting.sentences(LONG_ZH), "保存"], "zh-en")
    assert [e["hypothesis"] for e in split["examples"]] == [pieces[0], " ".join(pieces[1:-1]), pieces[-1]]


def test_evaluate_scores_each_catalog_of_a_mixed_split(translator):
    """A split of several catalogs is also scored per catalog, largest first, each with sacrebleu on its own pairs;
    one catalog (or none named) adds nothing."""
    pairs = [corpus.Pair("打开文件", "Open file", "gedit"), corpus.Pair("保存", "Save", "xkb"),
             corpus.Pair("退出", "Quit", "xkb"), corpus.Pair("复制", "Copy", "xkb")]
    result = evaluate(translator, pairs, "zh-en")
    assert list(result["by_source"]) == ["xkb", "gedit"]
    hyps = translator.translate(["保存", "退出", "复制"], "zh-en")
    assert result["by_source"]["xkb"] == score(hyps, ["Save", "Quit", "Copy"], "en")
    assert result["by_source"]["gedit"]["n"] == 1
    assert "by_source" not in evaluate(translator, [corpus.Pair(p.zh, p.en) for p in pairs], "zh-en")


def test_translate_cli_refuses_or_splits_a_long_line(student_folder, tmp_path):
    lines = tmp_path / "in.txt"
    lines.write_text(f"打开文件\n{LONG_ZH}\n", encoding="utf-8")
    refused = run("inference.translate", "--model", str(student_folder), "--input", str(lines))
    assert refused.returncode == 2
    assert "input 2 ('打开文件。保存所有更改" in refused.stderr and "pass --split_long" in refused.stderr
    split = run("inference.translate", "--model", str(student_folder), "--input", str(lines), "--split_long")
    assert split.returncode == 0, split.stderr
    expected = Translator(student_folder, split_long=True).translate(["打开文件", LONG_ZH], "zh-en")
    assert split.stdout.splitlines() == expected


def test_missing_folder_is_one_clear_line(tmp_path):
    out = run("inference.translate", "--model", str(tmp_path / "nope"), "x")
    assert out.returncode == 2 and "no config.json" in out.stderr
