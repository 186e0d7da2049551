import os
from pathlib import Path

import pytest

import corpus
import data
import vocabulary
from qwen_real_tokenizer import load_real_qwen_tokenizer


# ---------------------------------------------------------------- examples and batches

@pytest.fixture(scope="module")
def builder(tokenizer, small_corpus):
    pairs = corpus.read_pairs(small_corpus / "train.jsonl")
    vocab = vocabulary.build_vocab_map(tokenizer, [p.zh for p in pairs] + [p.en for p in pairs], 600, 832)
    return data.ExampleBuilder(tokenizer, vocab, 48, 48)


def test_spliced_prompt_equals_rendered_template(builder, small_corpus):
    pairs = corpus.read_pairs(small_corpus / "train.jsonl")[:200]
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
    pairs = corpus.read_pairs(small_corpus / "train.jsonl")[:40]
    vocab = vocabulary.build_vocab_map(tokenizer, [p.zh for p in pairs] + [p.en for p in pairs], 400, 151936)
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
    pairs = corpus.read_pairs(small_corpus / "train.jsonl")[:16]
    examples, _ = builder.examples(pairs, ["zh-en", "en-zh"])
    batch = builder.collate(examples)
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
    examples, _ = builder.examples(corpus.read_pairs(small_corpus / "train.jsonl"), ["zh-en", "en-zh"])
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
    vocab = vocabulary.VocabMap.full(tokenizer, len(tokenizer))
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
