import pytest

import corpus
import data
import vocabulary
from qwen_real_tokenizer import load_real_qwen_tokenizer


# ---------------------------------------------------------------- vocabulary trimming

def test_trimmed_vocabulary_keeps_bytes_and_specials(tokenizer, small_corpus):
    pairs = corpus.read_pairs(small_corpus / "train.jsonl")
    vocab = vocabulary.build_vocab_map(tokenizer, [p.zh for p in pairs] + [p.en for p in pairs], 400, 832)
    assert 256 + 3 < vocab.size <= 400
    assert set(vocabulary.byte_token_ids(tokenizer)) <= set(vocab.teacher_ids)
    builder = data.ExampleBuilder(tokenizer, vocab, 200, 200)
    text = "Ünïcode ✓ 未登录词 🙂"
    ids = builder.student_ids(text)
    assert max(ids) < vocab.size and builder.decode(ids) == text


def test_real_qwen_vocabulary(small_corpus):
    qwen = load_real_qwen_tokenizer()
    assert qwen.encode("打开文件", add_special_tokens=False) == [104089, 26898]
    pairs = corpus.read_pairs(small_corpus / "train.jsonl")
    texts = ["打开文件"] * 50 + [p.zh for p in pairs] + [p.en for p in pairs]
    vocab = vocabulary.build_vocab_map(qwen, texts, 300, 151936)
    assert vocab.size == 300 and vocab.teacher_vocab_size == 151936
    assert {104089, 26898, 151643, 151644, 151645} <= set(vocab.teacher_ids)
    builder = data.ExampleBuilder(qwen, vocab, 64, 64)
    assert builder.teacher_ids("打开文件") == [104089, 26898]
    rare = "鬱金香 Xylophone"  # tokens outside the 300 kept ids are spelled with byte tokens
    assert builder.decode(builder.student_ids(rare)) == rare


def test_vocab_map_refuses_another_tokenizer(tokenizer, tmp_path):
    vocab = vocabulary.build_vocab_map(tokenizer, ["打开文件 Open file"], 300, 832)
    vocab.save(tmp_path)
    with pytest.raises(vocabulary.VocabMismatchError, match="tokenizer differs"):
        vocabulary.VocabMap.load(tmp_path).check_tokenizer(load_real_qwen_tokenizer(), "teacher")
