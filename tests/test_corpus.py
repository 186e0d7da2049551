import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import corpus
from conftest import write_mo


# ---------------------------------------------------------------- catalogs

def test_catalog_cleaning_and_split_by_catalog(tmp_path):
    locale = tmp_path / "locale"
    for name in ("alpha", "beta", "gamma", "delta"):
        write_mo(locale / "zh_CN/LC_MESSAGES" / f"{name}.mo", {
            f"_Open {name} file": f"打开 {name} 文件(_O)",
            f"Cannot read %s in {name}": f"无法读取 {name} 中的 %s",
            f"&Save {name}": f"保存 {name}(&S)",
            f"Product(R) {name}": f"产品 {name}",
            "Shared string": "共享字符串",
            "GNOME": "GNOME",  # untranslated: the validator would reject it, so the builder drops it
        })
    stats = corpus.build_catalog_corpus(locale, tmp_path / "out", valid_fraction=0.25, test_fraction=0.25)
    splits = {s: corpus.read_pairs(tmp_path / "out" / f"{s}.jsonl") for s in corpus.SPLITS}
    catalogs = {s: {p.source for p in ps} for s, ps in splits.items()}
    assert not catalogs["train"] & catalogs["test"] and not catalogs["train"] & catalogs["valid"]
    everything = [p for ps in splits.values() for p in ps]
    assert corpus.Pair("打开 alpha 文件", "Open alpha file", "alpha") in everything
    assert all("%" not in p.en and "_" not in p.en and "&" not in p.en and "(R)" not in p.en for p in everything)
    assert all("(_" not in p.zh and "(&" not in p.zh for p in everything)
    assert sum(p.en == "Shared string" for p in everything) == 1  # deduplicated across catalogs
    saved = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert saved["pairs"] == stats.pairs and sum(saved["catalogs_per_split"].values()) == 4
    assert saved["dropped"]["source_equals_target"] == 4 and saved["dropped"]["duplicate"] == 3


def test_too_few_catalogs_says_what_to_do(tmp_path):
    with pytest.raises(corpus.CorpusError, match="found 0 zh_CN catalog"):
        corpus.build_catalog_corpus(tmp_path, tmp_path / "out")


def test_machine_corpus_has_no_leaks(corpus_dir):
    stats = json.loads((corpus_dir / "stats.json").read_text())
    assert stats["raw_pairs"] > 40000 and stats["pairs"]["train"] > 25000
    train = corpus.read_pairs(corpus_dir / "train.jsonl")
    test = corpus.read_pairs(corpus_dir / "test.jsonl")
    train_sides = {p.en for p in train} | {p.zh for p in train}
    assert not any(p.en in train_sides or p.zh in train_sides for p in test)
    assert not {p.source for p in train} & {p.source for p in test}


def test_machine_corpus_validates_cleanly(corpus_dir):
    stats = json.loads((corpus_dir / "stats.json").read_text())
    results = corpus.load_splits(corpus_dir, corpus.SPLITS)  # on_bad_line="error": raises on any bad line
    assert {split: len(result.pairs) for split, result in results.items()} == stats["pairs"]
    assert set(stats["dropped"]) <= set(corpus.REASONS) | {"also_in_train"}


# ---------------------------------------------------------------- readers

def test_formats(tmp_path):
    (tmp_path / "flat.jsonl").write_text('{"zh": "打开文件", "en": "Open file"}\n', encoding="utf-8")
    (tmp_path / "wmt.jsonl").write_text('{"translation": {"zh": "打开文件", "en": "Open file"}}\n', encoding="utf-8")
    (tmp_path / "pairs.tsv").write_text("打开文件\tOpen file\n", encoding="utf-8")
    for name in ("flat.jsonl", "wmt.jsonl", "pairs.tsv"):
        assert [(p.zh, p.en) for p in corpus.read_pairs(tmp_path / name)] == [("打开文件", "Open file")]


def test_datasets_folder(tmp_path):
    import datasets
    rows = {"translation": [{"zh": "打开文件", "en": "Open file"}, {"zh": "保存", "en": "Save"}]}
    bad_rows = {"translation": rows["translation"] + [{"zh": "保存", "en": ""}]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "validation": datasets.Dataset.from_dict(bad_rows)}).save_to_disk(str(tmp_path / "ds"))
    assert [p.en for p in corpus.load_split(tmp_path / "ds", "train")] == ["Open file", "Save"]
    with pytest.raises(corpus.CorpusError, match=re.escape(f"{tmp_path / 'ds'}[valid]:3: field 'en' is empty")):
        corpus.load_split(tmp_path / "ds", "valid")
    assert [p.en for p in corpus.load_split(tmp_path / "ds", "valid", "skip")] == ["Open file", "Save"]


def test_every_bad_line_is_named_with_file_line_and_reason(tmp_path, caplog):
    path = tmp_path / "bad.jsonl"
    lines = [
        '{"zh": "打开文件", "en": "Open file", "catalog": "gedit"}',
        '{"zh": "打开文件", "en": ',
        '["保存", "Save"]',
        '{"zh": "保存"}',
        '{"zh": 5, "en": "Five"}',
        '{"zh": "", "en": "Empty"}',
        '{"zh": "这是一个有二十一个字符的很长很长很长的句子", "en": "A long sentence"}',  # 21 > max_chars 20
        '{"zh": " GNOME", "en": "GNOME "}',
        '{"zh": "Open", "en": "Close"}',
        '{"zh": "打开文件", "en": "打开 file"}',
        '{"zh": "打开文件", "en": "Open file"}',
        b"\xff\xfe",
        "[" * 100000,  # deeper than Python's stack: json raises RecursionError
        '{"zh": "\\ud800\\u6253", "en": "Open"}',
        '{"translation": ["保存", "Save"]}',
        "关闭\tClose",  # a TSV line in a JSONL file
    ]
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n\n")
    with pytest.raises(corpus.CorpusError) as err:
        corpus.read_pairs(path, max_chars=20)
    text = str(err.value).splitlines()
    assert text[0].startswith(f"15 bad line(s) ({path}: invalid_json=3 not_object=2 not_utf8=2 ")
    assert text[1:16] == [f"  {path}:{n}: {detail}" for n, detail in [
        (2, "invalid JSON (Expecting value at column 22); write one JSON object a line"),
        (3, 'an array, not an object; write {"zh": "...", "en": "..."} a line'),
        (4, "field 'en' is missing; give both \"zh\" and \"en\""),
        (5, "field 'zh' is a number, not a string; quote the text"),
        (6, "field 'zh' is empty; translate it or remove the line"),
        (7, "field 'zh' has 21 characters, more than data.max_chars=20; split the sentence or raise --data.max_chars"),
        (8, "zh and en are the same text (untranslated); translate it or remove the line"),
        (9, "field 'zh' has no Chinese ideograph; check that zh and en are not swapped"),
        (10, "field 'en' has 4 Latin letter(s) and 2 Chinese ideograph(s), English needs a letter and at most "
             "1 ideograph per 10 letters; check that zh and en are not swapped"),
        (11, "exact duplicate of line 1; remove one of them"),
        (12, "not UTF-8 (byte 0xff at column 1); re-encode the file as UTF-8"),
        (13, "invalid JSON (maximum recursion depth exceeded while decoding a JSON array from a unicode string); "
             "write one JSON object a line"),
        (14, "field 'zh' holds a lone surrogate escape, which UTF-8 cannot encode; fix the \\uXXXX escape"),
        (15, "field 'translation' is an array, not an object; write {\"translation\": {\"zh\": \"...\", \"en\": "
             "\"...\"}}"),
        (16, "invalid JSON (Expecting value at column 1); write one JSON object a line"),
    ]]
    assert text[-1] == "Fix them, or pass --on_bad_line skip to drop and count them."

    with caplog.at_level("INFO", logger="corpus"):
        result = corpus.load_splits(path, ["train"], on_bad_line="skip", max_chars=20)["train"]
    assert result.pairs == [corpus.Pair("打开文件", "Open file", "gedit")] and result.lines == 16
    assert result.counts == {"invalid_json": 3, "not_utf8": 2, "not_object": 2, "missing_field": 1,
                             "not_string": 1, "empty_field": 1, "too_long": 1, "source_equals_target": 1,
                             "not_chinese": 1, "not_english": 1, "duplicate": 1}
    assert set(result.counts) <= set(corpus.REASONS)
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: kept 1 of 16 lines, skipped invalid_json=3 not_object=2 not_utf8=2 missing_field=1 "
        "not_string=1 empty_field=1 too_long=1 source_equals_target=1 not_chinese=1 not_english=1 duplicate=1"]


def test_english_may_quote_an_ideograph_per_ten_letters(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("中字\tThe character 中 means middle\n"  # 1 ideograph, 23 letters
                    "中文\tChinese (中文)\n", encoding="utf-8")  # 2 ideographs, 7 letters
    result = corpus.check_file(path)
    assert [p.en for p in result.pairs] == ["The character 中 means middle"]
    assert [(b.where, b.problem.reason) for b in result.bad] == [(f"{path}:2", "not_english")]


def test_tsv_columns_and_byte_order_mark(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_bytes("\ufeff打开\tOpen\r\n保存\n关闭\tClose\textra\n".encode())
    result = corpus.check_file(path)
    assert result.pairs == [corpus.Pair("打开", "Open", "pairs")]
    assert [str(b) for b in result.bad] == [
        f"{path}:2: 1 tab-separated column(s), expected 2 (zh, en); remove stray tabs or join the line",
        f"{path}:3: 3 tab-separated column(s), expected 2 (zh, en); remove stray tabs or join the line"]


def test_error_lists_twenty_and_counts_all_across_splits(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(f'{{"zh": "第{n}行", "en": ""}}\n' for n in range(25)),
                                          encoding="utf-8")
    (tmp_path / "valid.tsv").write_text("保存\tSave\n保存\tSave\n", encoding="utf-8")
    with pytest.raises(corpus.CorpusError) as err:
        corpus.load_splits(tmp_path, ["train", "valid"])
    text = str(err.value).splitlines()
    assert text[0] == (f"26 bad line(s) ({tmp_path / 'train.jsonl'}: empty_field=25; "
                       f"{tmp_path / 'valid.tsv'}: duplicate=1):")
    assert text[20] == f"  {tmp_path / 'train.jsonl'}:20: field 'en' is empty; translate it or remove the line"
    assert text[21] == "  ... and 6 more" and len(text) == 23
    skipped = corpus.load_splits(tmp_path, ["train", "valid"], on_bad_line="skip")
    assert skipped["train"].pairs == [] and skipped["valid"].pairs == [corpus.Pair("保存", "Save", "valid")]
    assert corpus.load_split(tmp_path, "valid", "skip") == skipped["valid"].pairs


def test_unreadable_sources_and_policy_are_corpus_errors(tmp_path):
    with pytest.raises(corpus.CorpusError, match="missing.jsonl: cannot read"):
        corpus.read_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "train.jsonl").write_text('{"zh": "打开", "en": "Open"}\n', encoding="utf-8")
    with pytest.raises(corpus.CorpusError, match="on_bad_line='drop'; use 'error' or 'skip'"):
        corpus.read_pairs(tmp_path / "train.jsonl", on_bad_line="drop")


# Random input: the loaders must either succeed or raise CorpusError, and account for every non-blank line.

def _assert_loads_or_corpus_error(path, blob: bytes) -> None:
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(blob)
    result = corpus.check_file(path)
    assert result.lines == sum(1 for line in blob.removeprefix(b"\xef\xbb\xbf").split(b"\n") if line.strip())
    assert all(corpus.problem_with(p.zh, p.en, corpus.MAX_CHARS) is None for p in result.pairs)
    assert len({(p.zh.strip(), p.en.strip()) for p in result.pairs}) == len(result.pairs)
    assert {b.problem.reason for b in result.bad} <= set(corpus.REASONS)
    assert corpus.read_pairs(path, on_bad_line="skip") == result.pairs
    try:
        pairs = corpus.load_split(path.parent, "train")
    except corpus.CorpusError as exc:
        assert result.bad and str(result.bad[0]) in str(exc)
    else:
        assert not result.bad and pairs == result.pairs


FAST = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
_texts = st.sampled_from(["打开文件", "Open file", "保存", "Save", "", " ", "打开 file", "\ud800"]) | st.text(max_size=12)
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | _texts,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                         st.sampled_from(["zh", "en", "translation", "catalog"]) | st.text(max_size=4), inner,
                         max_size=4), max_leaves=10)
_records = _json | st.fixed_dictionaries({"zh": _texts, "en": _texts}) | st.fixed_dictionaries({"translation": _json})


@FAST
@given(blob=st.binary(max_size=300) | st.lists(st.binary(max_size=20) | st.tuples(_texts, _texts).map(
    lambda t: f"{t[0]}\t{t[1]}".encode("utf-8", "surrogatepass")), max_size=8).map(b"\n".join))
def test_random_bytes_give_pairs_or_corpus_error(tmp_path, blob):
    _assert_loads_or_corpus_error(tmp_path / "jsonl" / "train.jsonl", blob)
    _assert_loads_or_corpus_error(tmp_path / "tsv" / "train.tsv", blob)


@FAST
@given(records=st.lists(_records, max_size=8), ascii_only=st.booleans())
def test_random_json_gives_pairs_or_corpus_error(tmp_path, records, ascii_only):
    blob = b"\n".join(json.dumps(r, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass") for r in records)
    _assert_loads_or_corpus_error(tmp_path / "json" / "train.jsonl", blob)
