import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import data
from conftest import write_mo
from qwen_real_tokenizer import load_real_qwen_tokenizer


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
    stats = data.build_catalog_corpus(locale, tmp_path / "out", valid_fraction=0.25, test_fraction=0.25)
    splits = {s: data.read_pairs(tmp_path / "out" / f"{s}.jsonl") for s in data.SPLITS}
    catalogs = {s: {p.source for p in ps} for s, ps in splits.items()}
    assert not catalogs["train"] & catalogs["test"] and not catalogs["train"] & catalogs["valid"]
    everything = [p for ps in splits.values() for p in ps]
    assert data.Pair("打开 alpha 文件", "Open alpha file", "alpha") in everything
    assert all("%" not in p.en and "_" not in p.en and "&" not in p.en and "(R)" not in p.en for p in everything)
    assert all("(_" not in p.zh and "(&" not in p.zh for p in everything)
    assert sum(p.en == "Shared string" for p in everything) == 1  # deduplicated across catalogs
    saved = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert saved["pairs"] == stats.pairs and sum(saved["catalogs_per_split"].values()) == 4
    assert saved["dropped"]["source_equals_target"] == 4 and saved["dropped"]["duplicate"] == 3


def test_too_few_catalogs_says_what_to_do(tmp_path):
    with pytest.raises(data.CorpusError, match="found 0 zh_CN catalog"):
        data.build_catalog_corpus(tmp_path, tmp_path / "out")


def test_machine_corpus_has_no_leaks(corpus_dir):
    stats = json.loads((corpus_dir / "stats.json").read_text())
    assert stats["raw_pairs"] > 40000 and stats["pairs"]["train"] > 25000
    train = data.read_pairs(corpus_dir / "train.jsonl")
    test = data.read_pairs(corpus_dir / "test.jsonl")
    train_sides = {p.en for p in train} | {p.zh for p in train}
    assert not any(p.en in train_sides or p.zh in train_sides for p in test)
    assert not {p.source for p in train} & {p.source for p in test}


def test_machine_corpus_validates_cleanly(corpus_dir):
    stats = json.loads((corpus_dir / "stats.json").read_text())
    results = data.load_splits(corpus_dir, data.SPLITS)  # on_bad_line="error": raises on any bad line
    assert {split: len(result.pairs) for split, result in results.items()} == stats["pairs"]
    assert set(stats["dropped"]) <= set(data.REASONS) | {"also_in_train"}


# ---------------------------------------------------------------- readers

def test_formats(tmp_path):
    (tmp_path / "flat.jsonl").write_text('{"zh": "打开文件", "en": "Open file"}\n', encoding="utf-8")
    (tmp_path / "wmt.jsonl").write_text('{"translation": {"zh": "打开文件", "en": "Open file"}}\n', encoding="utf-8")
    (tmp_path / "pairs.tsv").write_text("打开文件\tOpen file\n", encoding="utf-8")
    for name in ("flat.jsonl", "wmt.jsonl", "pairs.tsv"):
        assert [(p.zh, p.en) for p in data.read_pairs(tmp_path / name)] == [("打开文件", "Open file")]


def test_datasets_folder(tmp_path):
    import datasets
    rows = {"translation": [{"zh": "打开文件", "en": "Open file"}, {"zh": "保存", "en": "Save"}]}
    bad_rows = {"translation": rows["translation"] + [{"zh": "保存", "en": ""}]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "validation": datasets.Dataset.from_dict(bad_rows)}).save_to_disk(str(tmp_path / "ds"))
    assert [p.en for p in data.load_split(tmp_path / "ds", "train")] == ["Open file", "Save"]
    with pytest.raises(data.CorpusError, match=re.escape(f"{tmp_path / 'ds'}[valid]:3: field 'en' is empty")):
        data.load_split(tmp_path / "ds", "valid")
    assert [p.en for p in data.load_split(tmp_path / "ds", "valid", "skip")] == ["Open file", "Save"]


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
    with pytest.raises(data.CorpusError) as err:
        data.read_pairs(path, max_chars=20)
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

    with caplog.at_level("INFO", logger="data"):
        result = data.load_splits(path, ["train"], on_bad_line="skip", max_chars=20)["train"]
    assert result.pairs == [data.Pair("打开文件", "Open file", "gedit")] and result.lines == 16
    assert result.counts == {"invalid_json": 3, "not_utf8": 2, "not_object": 2, "missing_field": 1,
                             "not_string": 1, "empty_field": 1, "too_long": 1, "source_equals_target": 1,
                             "not_chinese": 1, "not_english": 1, "duplicate": 1}
    assert set(result.counts) <= set(data.REASONS)
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: kept 1 of 16 lines, skipped invalid_json=3 not_object=2 not_utf8=2 missing_field=1 "
        "not_string=1 empty_field=1 too_long=1 source_equals_target=1 not_chinese=1 not_english=1 duplicate=1"]


def test_english_may_quote_an_ideograph_per_ten_letters(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("中字\tThe character 中 means middle\n"  # 1 ideograph, 23 letters
                    "中文\tChinese (中文)\n", encoding="utf-8")  # 2 ideographs, 7 letters
    result = data.check_file(path)
    assert [p.en for p in result.pairs] == ["The character 中 means middle"]
    assert [(b.where, b.problem.reason) for b in result.bad] == [(f"{path}:2", "not_english")]


def test_tsv_columns_and_byte_order_mark(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_bytes("\ufeff打开\tOpen\r\n保存\n关闭\tClose\textra\n".encode())
    result = data.check_file(path)
    assert result.pairs == [data.Pair("打开", "Open", "pairs")]
    assert [str(b) for b in result.bad] == [
        f"{path}:2: 1 tab-separated column(s), expected 2 (zh, en); remove stray tabs or join the line",
        f"{path}:3: 3 tab-separated column(s), expected 2 (zh, en); remove stray tabs or join the line"]


def test_error_lists_twenty_and_counts_all_across_splits(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(f'{{"zh": "第{n}行", "en": ""}}\n' for n in range(25)),
                                          encoding="utf-8")
    (tmp_path / "valid.tsv").write_text("保存\tSave\n保存\tSave\n", encoding="utf-8")
    with pytest.raises(data.CorpusError) as err:
        data.load_splits(tmp_path, ["train", "valid"])
    text = str(err.value).splitlines()
    assert text[0] == (f"26 bad line(s) ({tmp_path / 'train.jsonl'}: empty_field=25; "
                       f"{tmp_path / 'valid.tsv'}: duplicate=1):")
    assert text[20] == f"  {tmp_path / 'train.jsonl'}:20: field 'en' is empty; translate it or remove the line"
    assert text[21] == "  ... and 6 more" and len(text) == 23
    skipped = data.load_splits(tmp_path, ["train", "valid"], on_bad_line="skip")
    assert skipped["train"].pairs == [] and skipped["valid"].pairs == [data.Pair("保存", "Save", "valid")]
    assert data.load_split(tmp_path, "valid", "skip") == skipped["valid"].pairs


def test_unreadable_sources_and_policy_are_corpus_errors(tmp_path):
    with pytest.raises(data.CorpusError, match="missing.jsonl: cannot read"):
        data.read_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "train.jsonl").write_text('{"zh": "打开", "en": "Open"}\n', encoding="utf-8")
    with pytest.raises(data.CorpusError, match="on_bad_line='drop'; use 'error' or 'skip'"):
        data.read_pairs(tmp_path / "train.jsonl", on_bad_line="drop")


# Random input: the loaders must either succeed or raise CorpusError, and account for every non-blank line.

def _assert_loads_or_corpus_error(path, blob: bytes) -> None:
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(blob)
    result = data.check_file(path)
    assert result.lines == sum(1 for line in blob.removeprefix(b"\xef\xbb\xbf").split(b"\n") if line.strip())
    assert all(data.problem_with(p.zh, p.en, data.MAX_CHARS) is None for p in result.pairs)
    assert len({(p.zh.strip(), p.en.strip()) for p in result.pairs}) == len(result.pairs)
    assert {b.problem.reason for b in result.bad} <= set(data.REASONS)
    assert data.read_pairs(path, on_bad_line="skip") == result.pairs
    try:
        pairs = data.load_split(path.parent, "train")
    except data.CorpusError as exc:
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


# ---------------------------------------------------------------- vocabulary trimming

def test_trimmed_vocabulary_keeps_bytes_and_specials(tokenizer, small_corpus):
    pairs = data.read_pairs(small_corpus / "train.jsonl")
    vocab = data.build_vocab_map(tokenizer, [p.zh for p in pairs] + [p.en for p in pairs], 400, 832)
    assert 256 + 3 < vocab.size <= 400
    assert set(data.byte_token_ids(tokenizer)) <= set(vocab.teacher_ids)
    builder = data.ExampleBuilder(tokenizer, vocab, 200, 200)
    text = "Ünïcode ✓ 未登录词 🙂"
    ids = builder.student_ids(text)
    assert max(ids) < vocab.size and builder.decode(ids) == text


def test_real_qwen_vocabulary(small_corpus):
    qwen = load_real_qwen_tokenizer()
    assert qwen.encode("打开文件", add_special_tokens=False) == [104089, 26898]
    pairs = data.read_pairs(small_corpus / "train.jsonl")
    texts = ["打开文件"] * 50 + [p.zh for p in pairs] + [p.en for p in pairs]
    vocab = data.build_vocab_map(qwen, texts, 300, 151936)
    assert vocab.size == 300 and vocab.teacher_vocab_size == 151936
    assert {104089, 26898, 151643, 151644, 151645} <= set(vocab.teacher_ids)
    builder = data.ExampleBuilder(qwen, vocab, 64, 64)
    assert builder.teacher_ids("打开文件") == [104089, 26898]
    rare = "鬱金香 Xylophone"  # tokens outside the 300 kept ids are spelled with byte tokens
    assert builder.decode(builder.student_ids(rare)) == rare


def test_vocab_map_refuses_another_tokenizer(tokenizer, tmp_path):
    vocab = data.build_vocab_map(tokenizer, ["打开文件 Open file"], 300, 832)
    vocab.save(tmp_path)
    with pytest.raises(data.VocabMismatchError, match="tokenizer differs"):
        data.VocabMap.load(tmp_path).check_tokenizer(load_real_qwen_tokenizer(), "teacher")


# ---------------------------------------------------------------- examples and batches

@pytest.fixture(scope="module")
def builder(tokenizer, small_corpus):
    pairs = data.read_pairs(small_corpus / "train.jsonl")
    vocab = data.build_vocab_map(tokenizer, [p.zh for p in pairs] + [p.en for p in pairs], 600, 832)
    return data.ExampleBuilder(tokenizer, vocab, 48, 48)


def test_spliced_prompt_equals_rendered_template(builder, small_corpus):
    pairs = data.read_pairs(small_corpus / "train.jsonl")[:200]
    examples, _ = builder.examples(pairs, ["zh-en", "en-zh"])
    for ex in examples:
        direction = ("zh-en", "en-zh")[ex.direction]
        rendered = builder.prompt_text(ex.source_text, direction)
        assert ex.prompt_ids == builder.tokenizer.encode(rendered, add_special_tokens=False)


# Chat templates in the style of each Qwen generation, written for these tests: what differs between them is what
# the teacher is conditioned on. Qwen1.5 and Qwen2 add a default system turn, Qwen2.5 another default system text,
# Qwen3 none, but its assistant turn opens in thinking mode unless enable_thinking is false (then an empty think
# block is closed at once).
_TURNS = ("{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{%- endfor %}")
_DEFAULT_SYSTEM = ("{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\n{SYSTEM}<|im_end|>\\n' }}"
                   "{%- endif %}")
QWEN_TEMPLATES = {
    "qwen1.5": _DEFAULT_SYSTEM.replace("{SYSTEM}", "You are a helpful assistant.") + _TURNS
    + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
    "qwen2": _DEFAULT_SYSTEM.replace("{SYSTEM}", "You are a helpful assistant.") + _TURNS
    + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
    "qwen2.5": _DEFAULT_SYSTEM.replace("{SYSTEM}", "You are Qwen, created by Alibaba Cloud. You are a helpful "
                                                  "assistant.") + _TURNS
    + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
    "qwen3": _TURNS + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}",
}
INSTRUCTION = "<|im_start|>user\nTranslate the following text from Chinese to English.\n打开文件<|im_end|>\n"
EXPECTED_PROMPTS = {
    "qwen1.5": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + INSTRUCTION
    + "<|im_start|>assistant\n",
    "qwen2": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + INSTRUCTION + "<|im_start|>assistant\n",
    "qwen2.5": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    + INSTRUCTION + "<|im_start|>assistant\n",
    "qwen3": INSTRUCTION + "<|im_start|>assistant\n<think>\n\n</think>\n\n",
}


@pytest.mark.parametrize("style", sorted(QWEN_TEMPLATES))
def test_every_qwen_generation_prompts_the_teacher_to_translate_at_once(style, small_corpus):
    """The real Qwen tokenizer with each generation's template style: the teacher sees exactly the expected prompt
    (Qwen3: thinking closed), the spliced prompt ids equal the rendered prompt's, and every target id, the first
    included, is one the student keeps: no target position asks the teacher for a thinking token."""
    import copy
    tokenizer = copy.deepcopy(load_real_qwen_tokenizer())
    tokenizer.chat_template = QWEN_TEMPLATES[style]
    if style == "qwen3":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    pairs = data.read_pairs(small_corpus / "train.jsonl")[:40]
    vocab = data.build_vocab_map(tokenizer, [p.zh for p in pairs] + [p.en for p in pairs], 400, 151936)
    builder = data.ExampleBuilder(tokenizer, vocab, 48, 48)
    assert builder.prompt_text("打开文件", "zh-en") == EXPECTED_PROMPTS[style]
    assert builder.has_thinking_switch == (style == "qwen3")
    examples, _ = builder.examples(pairs, ["zh-en", "en-zh"])
    think = {tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>")} if style == "qwen3" else set()
    for ex in examples:
        rendered = builder.prompt_text(ex.source_text, ("zh-en", "en-zh")[ex.direction])
        assert ex.prompt_ids == tokenizer.encode(rendered, add_special_tokens=False)
        assert all(t in vocab.student_of for t in ex.target_ids) and not think & set(ex.target_ids)
        if style == "qwen3":
            assert ex.prompt_ids[-4:-1] == tokenizer.encode("<think>\n\n</think>", add_special_tokens=False)
    fingerprints = {builder.prompt_fingerprint()}
    tokenizer.chat_template = QWEN_TEMPLATES["qwen2.5" if style == "qwen3" else "qwen3"]
    assert data.ExampleBuilder(tokenizer, vocab, 48, 48).prompt_fingerprint() not in fingerprints


def test_teacher_and_student_targets_align(builder, small_corpus):
    pairs = data.read_pairs(small_corpus / "train.jsonl")[:16]
    examples, _ = builder.examples(pairs, ["zh-en", "en-zh"])
    batch = data.collate(examples, builder.pad_id, builder.bos_id, builder.vocab.student_of,
                         builder.tokenizer.pad_token_id)
    width = len(batch["labels"][0])
    flat = [label for row in batch["labels"] for label in row]
    assert batch["target_positions"] == [i for i, label in enumerate(flat) if label != data.IGNORE_INDEX]
    for row, ex in enumerate(examples):
        teacher_row = batch["teacher_input_ids"][row]
        prompt_end = len(teacher_row) - (width - 1)  # P: the teacher predicts label j at position P - 1 + j
        n = len(ex.target_ids)
        assert batch["labels"][row][:n] == [builder.vocab.student_of[t] for t in ex.target_ids]
        assert batch["teacher_labels"][row][:n] == ex.target_ids
        # the teacher reads label j-1 at position P + j - 1, the student reads it at decoder position j
        for j in range(1, n):
            assert teacher_row[prompt_end + j - 1] == ex.target_ids[j - 1]
            assert batch["decoder_input_ids"][row][j] == batch["labels"][row][j - 1]
        assert teacher_row[prompt_end - 1] == ex.prompt_ids[-1]
        assert batch["decoder_input_ids"][row][0] == builder.bos_id
        positions = [p for p, m in zip(batch["teacher_position_ids"][row], batch["teacher_attention_mask"][row]) if m]
        assert positions == list(range(len(positions)))


def test_batches_are_deterministic_and_even(builder, small_corpus):
    examples, _ = builder.examples(data.read_pairs(small_corpus / "train.jsonl"), ["zh-en", "en-zh"])
    first = data.make_batches(examples, 8, 0, seed=1, epoch=0, world_size=3)
    assert first == data.make_batches(examples, 8, 0, seed=1, epoch=0, world_size=3)
    assert first != data.make_batches(examples, 8, 0, seed=1, epoch=1, world_size=3)
    assert len(first) % 3 == 0 and all(len(b) <= 8 for b in first)
    budget = data.make_batches(examples, 1, 400, seed=1, epoch=0, world_size=2)
    for batch in budget:
        longest = max(len(examples[i].source_ids) + len(examples[i].target_ids) for i in batch)
        assert longest * len(batch) <= 400 or len(batch) == 1


# --------------------------------------------------------------------------- streaming a large Arrow corpus

def rss_mib() -> float:
    """Resident memory now (not the peak), from /proc."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.fixture(scope="module")
def arrow_corpus(tmp_path_factory) -> Path:
    """200,000 distinct synthetic pairs saved with datasets.save_to_disk (train) plus a small validation split."""
    import datasets
    count = 200_000
    zh = [f"第{i}号文件已保存到磁盘" for i in range(count)]
    en = [f"File number {i} was saved to disk" for i in range(count)]
    out = tmp_path_factory.mktemp("arrow") / "corpus"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"zh": zh, "en": en}),
        "validation": datasets.Dataset.from_dict({"zh": zh[:50], "en": en[:50]}),
    }).save_to_disk(str(out))
    return out


def stream_for(path: Path, tokenizer, rank: int = 0) -> data.ExampleStream:
    vocab = data.VocabMap.full(tokenizer, len(tokenizer))
    builder = data.ExampleBuilder(tokenizer, vocab, 48, 48)
    return data.ExampleStream(path, builder, ["zh-en"], window_rows=10_000, micro_batch_size=64,
                              tokens_per_batch=0, seed=3, world_size=2, rank=rank)


def test_stream_memory_stays_flat_over_200k_pairs(arrow_corpus, tokenizer):
    stream = stream_for(arrow_corpus, tokenizer)
    assert len(stream) == 200_000 and stream.windows == 20
    readings, sentences = {}, 0
    for position, batch in stream.batches():
        sentences += len(batch)
        if position.batch == 1:  # the first batch of each window
            readings[position.window] = rss_mib()
        if position.epoch == 1:
            break
    assert sentences >= 99_000  # this rank's half of one epoch (batches are a multiple of the world size)
    assert readings[19] - readings[2] < 40, readings  # MiB over 17 windows (170,000 rows) read after warm-up


def test_stream_resumes_at_its_saved_position(arrow_corpus, tokenizer):
    first = stream_for(arrow_corpus, tokenizer).batches()
    for _ in range(160):  # past the first window (10,000 rows -> 78 batches of 64 per rank)
        position, _ = next(first)
    expected = [[ex.source_ids for ex in batch] for _, batch in (next(first) for _ in range(3))]
    resumed = stream_for(arrow_corpus, tokenizer).batches(position)
    assert [[ex.source_ids for ex in batch] for _, batch in (next(resumed) for _ in range(3))] == expected
    other_rank = next(stream_for(arrow_corpus, tokenizer, rank=1).batches())[1]
    first_rank = next(stream_for(arrow_corpus, tokenizer).batches())[1]
    assert {ex.source_text for ex in other_rank}.isdisjoint(ex.source_text for ex in first_rank)
