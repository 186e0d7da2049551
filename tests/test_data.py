import json

import pytest

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
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "validation": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "ds"))
    assert [p.en for p in data.load_split(tmp_path / "ds", "valid")] == ["Open file", "Save"]


def test_bad_lines_name_file_line_and_reason(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes("\n".join([
        '{"zh": "打开文件", "en": "Open file"}',
        '{"zh": "打开文件", "en": ',
        '{"zh": "", "en": "Empty"}',
        '{"zh": "Open file", "en": "Open file"}',
        '{"zh": "打开文件", "en": "Open file"}',
    ]).encode() + b"\n\xff\xfe\n")
    with pytest.raises(data.CorpusError) as err:
        data.read_pairs(path)
    text = str(err.value)
    assert f"{path}:2: invalid JSONL" in text
    assert f"{path}:3: field 'zh' is empty" in text
    assert f"{path}:4: field 'zh' has no Chinese characters" in text
    assert f"{path}:5: exact duplicate of line 1" in text
    assert f"{path}:6: not UTF-8" in text
    assert "--on_bad_line skip" in text
    assert len(data.read_pairs(path, on_bad_line="skip")) == 1


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


def test_teacher_and_student_targets_align(builder, small_corpus):
    pairs = data.read_pairs(small_corpus / "train.jsonl")[:16]
    examples, _ = builder.examples(pairs, ["zh-en", "en-zh"])
    batch = data.collate(examples, builder.pad_id, builder.bos_id, builder.vocab.student_of,
                         builder.tokenizer.pad_token_id)
    width = len(batch["labels"][0])
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
