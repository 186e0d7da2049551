"""teacher.py: the teacher's forward at the target positions, its ZeRO-3 buckets and where it is placed."""

import json

import torch

import corpus
import data
import engine
import teacher
import vocabulary
from conftest import ROOT


def test_teacher_logits_are_aligned_with_padding(tiny_teacher, small_corpus):
    """Left-padded batched teacher logits equal each example's logits computed alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    builder = data.ExampleBuilder(tokenizer, vocabulary.VocabMap.full(tokenizer, model.config.vocab_size), 48,
                                  48)
    examples, _ = builder.examples(corpus.read_pairs(small_corpus / "valid.jsonl")[:6], ["zh-en", "en-zh"])
    batch = engine.to_device(builder.collate(examples), "cpu")
    with torch.no_grad():
        batched = teacher.teacher_logits(model, batch, batch["labels"].shape[1])
        for row, ex in enumerate(examples):
            alone = model(torch.tensor([ex.prompt_ids + ex.target_ids[:-1]])).logits[0, len(ex.prompt_ids) - 1:]
            torch.testing.assert_close(batched[row, :len(ex.target_ids)], alone, atol=1e-4, rtol=1e-4)


def test_teacher_buckets_follow_its_width_and_placement_follows_free_memory():
    ds = json.loads((ROOT / "ds_configs" / "teacher_zero3.json").read_text())
    zero = teacher.teacher_zero3_config(ds, "offload", 4096)["zero_optimization"]  # Qwen3-8B's width
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (4096 ** 2, int(0.9 * 4096 ** 2), 40960)
    assert zero["offload_param"]["device"] == "cpu"
    gib = 2 ** 30  # 8B bf16 teacher (16 GiB) on 80 GiB cards, 8 ranks; then on 24 GiB cards
    assert teacher.place_teacher("auto", 8 * 10 ** 9, torch.bfloat16, 8, 76 * gib)[0] == "resident"
    assert teacher.place_teacher("auto", 8 * 10 ** 9, torch.bfloat16, 8, 20 * gib)[0] == "sharded"
    assert teacher.place_teacher("auto", 8 * 10 ** 9, torch.bfloat16, 1, 20 * gib)[0] == "offload"
