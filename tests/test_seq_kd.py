"""Sequence-level KD (--seq_kd) and on-policy KD (--on_policy_ratio): seq_kd.py and its use in train_ds.py.

In-process: the teacher's cached greedy decoding and beam search over the student vocabulary equal decoding
each example alone without a cache; the per-step and per-example choices are fixed by the seed; a cache made by
another teacher or decoding is refused. On a real 2-rank ZeRO-3 CPU run (beam search, 2 beams; the other
distillation tests run the default greedy seq_kd): the teacher translations are made in lockstep, written to
the cache, topped up, reused with no teacher generation, swapped in as targets, refused when the data changes;
on-policy steps run in lockstep; resume stays exact with both on.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import config as config_lib
import data
import engine
import seq_kd
import vocabulary
from conftest import ROOT, launch
from corpus import read_pairs

RUN_ARGS = ["--stage", "distill", "--max_steps", "6", "--save_every", "3", "--eval_every", "100", "--keep", "5",
            "--micro_batch_size", "8", "--data.tokens_per_batch", "0", "--data.valid_subset", "4",
            "--data.vocab_size", "600", "--lr", "3e-3", "--warmup_steps", "2", "--log_every", "1",
            "--seq_kd", "--distill.seq_kd_beams", "2", "--on_policy_ratio", "0.5"]


def losses(run: Path) -> dict[int, float]:
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in entries if "eval" not in e}


def on_policy_steps(run: Path) -> list[int]:
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e["step"] for e in entries if e.get("on_policy")]


@pytest.fixture
def single_process_group():
    """A one-rank gloo group, so the lockstep helpers' all-reduces run in this process."""
    import torch.distributed as dist
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{engine.free_port()}", rank=0, world_size=1)
    yield
    if started:
        dist.destroy_process_group()


def teacher_and_examples(tiny_teacher: Path, corpus: Path, max_target_len: int, pairs: int):
    """The tiny teacher, a 600-id student vocabulary, the first `pairs` training pairs as examples in both
    directions, the kept teacher ids and their output rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    train = read_pairs(corpus / "train.jsonl")
    vocab = vocabulary.build_vocab_map(tokenizer, [p.zh for p in train] + [p.en for p in train], 600,
                                       teacher.config.vocab_size)
    builder = data.ExampleBuilder(tokenizer, vocab, 48, max_target_len)
    examples, _ = builder.examples(train[:pairs], ["zh-en", "en-zh"])
    kept = torch.tensor(vocab.teacher_ids)
    return teacher, builder, examples, kept, teacher.lm_head.weight.detach()[kept]


def test_cached_teacher_decoding_equals_decoding_each_example_alone(tiny_teacher, small_corpus,
                                                                  single_process_group):
    """KV cache, left padding and position ids: the batched greedy decode over the K kept rows gives, for every
    example, what a plain uncached loop over that example alone gives."""
    teacher, builder, examples, kept, rows = teacher_and_examples(tiny_teacher, small_corpus, 12, 5)
    vocab, tokenizer = builder.vocab, builder.tokenizer
    made = seq_kd.teacher_translate(teacher.model, rows, builder, examples, examples[0], 4, "cpu",
                                    all_done=lambda done: done)
    assert len(made) == len(examples)
    bos, pad, eos = (tokenizer.convert_tokens_to_ids(t)
                     for t in (vocabulary.BOS_TOKEN, vocabulary.PAD_TOKEN, vocabulary.EOS_TOKEN))
    for example, (ids, finished) in zip(examples, made):
        sequence, alone, ended = list(example.prompt_ids), [], False
        with torch.no_grad():
            for _ in range(builder.max_target_len - 1):
                logits = teacher(torch.tensor([sequence])).logits[0, -1][kept]
                logits[vocab.student_of[bos]] = float("-inf")
                token = int(kept[logits.argmax()])
                if token in (eos, pad):
                    ended = True
                    break
                alone.append(token)
                sequence.append(token)
        assert (ids, finished) == (alone, ended)
        assert all(t in vocab.student_of for t in ids)


def test_cached_teacher_beam_search_equals_beam_search_over_each_example_alone(tiny_teacher, small_corpus,
                                                                               single_process_group):
    """--distill.seq_kd_beams: the batched beam decode (KV cache reordered with the beams, left padding, position
    ids) gives, for every example, what the same search over that example alone, without a cache, gives."""
    from model import beam_search
    teacher, builder, examples, kept, rows = teacher_and_examples(tiny_teacher, small_corpus, 8, 4)
    vocab, beams = builder.vocab, 3
    made = seq_kd.teacher_translate(teacher.model, rows, builder, examples, examples[0], 3, "cpu",
                                    all_done=lambda done: done, beams=beams)
    greedy = seq_kd.teacher_translate(teacher.model, rows, builder, examples, examples[0], 3, "cpu",
                                      all_done=lambda done: done)
    assert made != greedy  # the search is wider than greedy here, or this test would prove little
    for example, (ids, finished) in zip(examples, made):
        sequences = [list(example.prompt_ids)] * beams

        def step(last, origin, position):
            nonlocal sequences
            if origin is not None:
                sequences = [sequences[i] + [vocab.teacher_ids[t]] for i, t in zip(origin.tolist(), last.tolist())]
            with torch.no_grad():
                logits = torch.stack([teacher(torch.tensor([s])).logits[0, -1][kept] for s in sequences])
            logits[:, builder.bos_id] = float("-inf")
            logprobs = torch.log_softmax(logits, dim=-1)
            logprobs[:, builder.eos_id] = torch.logaddexp(logprobs[:, builder.eos_id], logprobs[:, builder.pad_id])
            logprobs[:, builder.pad_id] = float("-inf")
            return logprobs

        [(alone, ended)] = beam_search(step, 1, beams, builder.max_target_len - 1, builder.bos_id, builder.eos_id,
                                       builder.pad_id, "cpu")
        assert (ids, finished) == ([vocab.teacher_ids[t] for t in alone], ended)


def test_step_and_example_choices_are_fixed_by_the_seed():
    steps = [seq_kd.is_on_policy_step(7, s, 0.3) for s in range(1, 2001)]
    assert steps == [seq_kd.is_on_policy_step(7, s, 0.3) for s in range(1, 2001)]
    assert 0.25 < sum(steps) / len(steps) < 0.35
    assert steps != [seq_kd.is_on_policy_step(8, s, 0.3) for s in range(1, 2001)]
    assert not any(seq_kd.is_on_policy_step(7, s, 0.0) for s in range(1, 100))
    assert all(seq_kd.is_on_policy_step(7, s, 1.0) for s in range(1, 100))
    examples = [data.Example(i % 2, [1], [1], [1], f"source {i}") for i in range(2000)]
    chosen = [seq_kd.uses_teacher_translation(7, e, 0.5) for e in examples]
    assert 0.45 < sum(chosen) / len(chosen) < 0.55
    assert chosen == [seq_kd.uses_teacher_translation(7, e, 0.5) for e in examples]


def test_a_cache_made_by_another_teacher_is_refused(tiny_teacher, tmp_path):
    from safetensors.torch import load_file, save_file
    header = {"seq_kd_cache": 1, "teacher": seq_kd.teacher_fingerprint(tiny_teacher), "data": "d", "vocab": "v",
              "prompt": "p", "max_target_len": 48, "decoding": seq_kd.decoding(1)}
    cache = tmp_path / "cache.jsonl"
    seq_kd.write_cache(cache, header, {"zh-en\t打开": {"ids": [5, 6], "finished": True, "text": "x"}}, None)
    assert seq_kd.read_cache(cache, header) == {"zh-en\t打开": {"ids": [5, 6], "finished": True}}
    other = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, other)
    weights = load_file(other / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.01  # a fine-tuned teacher: same size, new bytes
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    assert seq_kd.teacher_fingerprint(other) != header["teacher"]
    with pytest.raises(seq_kd.SeqKDCacheError, match="stale seq_kd cache, made with another teacher"):
        seq_kd.read_cache(cache, {**header, "teacher": seq_kd.teacher_fingerprint(other)})
    with pytest.raises(seq_kd.SeqKDCacheError, match="made with another decoding"):  # greedy, now 4 beams
        seq_kd.read_cache(cache, {**header, "decoding": seq_kd.decoding(4)})
    with pytest.raises(seq_kd.SeqKDCacheError, match="made with another chat prompt"):  # e.g. thinking switched
        seq_kd.read_cache(cache, {**header, "prompt": "q"})


def test_a_teacher_pass_cut_short_keeps_its_finished_rounds(tiny_teacher, small_corpus, tmp_path, monkeypatch,
                                                              single_process_group):
    """The cache grows round by round, flushed: a run killed in the teacher pass (here: an error in its third
    round, and a line half written) keeps the first two rounds, and the next run translates only the rest."""
    from transformers import AutoModelForCausalLM
    monkeypatch.setattr(seq_kd, "ROUND_BATCHES", 1)
    _, cfg = config_lib.parse_run_args([*RUN_ARGS, "--teacher", str(tiny_teacher), "--data", str(small_corpus),
                                        "--out", str(tmp_path / "run"), "--micro_batch_size", "4", "--max_steps",
                                        "20", "--distill.seq_kd_beams", "1", "--distill.seq_kd_batch", "16"],
                                       "", engine.has_gpu)
    prepared = data.prepare_run_data(cfg, tmp_path / "run", 0, 1, trimmed_vocabulary=True)
    header = seq_kd.cache_header(cfg, prepared.train_examples, prepared.builder)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    rows = teacher.lm_head.weight.detach()[torch.tensor(prepared.vocab.teacher_ids)]
    cache = tmp_path / "cache.jsonl"
    translate, asked, first_run = seq_kd.teacher_translate, [], [True]

    def counted(teacher, rows, builder, examples, *args):  # the first run fails in its third round
        asked.append(len(examples))
        if first_run[0] and len(asked) == 3:
            first_run[0] = False
            raise RuntimeError("killed")
        return translate(teacher, rows, builder, examples, *args)

    monkeypatch.setattr(seq_kd, "teacher_translate", counted)
    targets = lambda: seq_kd.teacher_targets(cfg, prepared, teacher.model, rows, header,  # noqa: E731
                                             seq_kd.read_cache(cache, header), cache, "cpu")
    with pytest.raises(RuntimeError, match="killed"):
        targets()
    kept = seq_kd.read_cache(cache, header)
    assert len(kept) == asked[0] + asked[1] == 2 * 16  # rounds of one batch of --distill.seq_kd_batch sources
    with cache.open("a") as handle:
        handle.write('{"key": "zh-en\\tcut')  # the crash came in the middle of the next append
    assert seq_kd.read_cache(cache, header) == kept
    scheduled = {seq_kd.example_key(prepared.train_examples[i]) for i in seq_kd.scheduled_indices(
        prepared.train_examples, cfg, 1, prepared.batches_per_epoch, prepared.total_steps)}
    asked.clear()
    targets()
    assert sum(asked) == len(scheduled) - len(kept)  # the finished rounds are not translated again
    done = seq_kd.read_cache(cache, header)
    assert set(done) == scheduled and all(done[key] == kept[key] for key in kept)


def test_seq_kd_and_on_policy_cache_reuse_resume_and_staleness(tiny_teacher, small_corpus, tmp_path):
    cache = tmp_path / "teacher_translations.jsonl"

    def args(run: Path, corpus: Path = small_corpus) -> list[str]:
        return [*RUN_ARGS, "--teacher", str(tiny_teacher), "--data", str(corpus), "--out", str(run),
                "--distill.seq_kd_cache", str(cache)]

    # Half of the run's examples already have a (hand-made) translation in the cache: the run must translate only
    # the other half with the teacher, train on the cached ones, and write the union back.
    _, cfg = config_lib.parse_run_args(args(tmp_path / "full"), "", engine.has_gpu)
    prepared = data.prepare_run_data(cfg, tmp_path / "prep", 0, 2, trimmed_vocabulary=True)
    header = seq_kd.cache_header(cfg, prepared.train_examples, prepared.builder)
    scheduled = seq_kd.scheduled_indices(prepared.train_examples, cfg, 2, prepared.batches_per_epoch,
                                         prepared.total_steps)
    keys = sorted({seq_kd.example_key(prepared.train_examples[i]) for i in scheduled})
    kept = prepared.vocab.teacher_ids
    hand_made = {key: {"ids": kept[300 + n % 50:305 + n % 50], "finished": True} for n, key in enumerate(keys[::2])}
    seq_kd.write_cache(cache, header, hand_made, prepared.tokenizer)

    result = launch(*args(tmp_path / "full"))
    assert f"seq_kd: the teacher translates {len(keys) - len(hand_made)} training sources" in result.stdout
    assert f"seq_kd: {len(hand_made)} of {len(scheduled)} scheduled examples train on the teacher's" in result.stdout
    entries = [json.loads(line) for line in cache.read_text().splitlines()[1:]]
    assert sorted(e["key"] for e in entries) == keys
    assert all(e["ids"] == hand_made[e["key"]]["ids"] for e in entries if e["key"] in hand_made)
    uninterrupted = losses(tmp_path / "full")
    assert sorted(uninterrupted) == list(range(1, 7)) and on_policy_steps(tmp_path / "full")
    assert len(on_policy_steps(tmp_path / "full")) < 6  # ratio 0.5: some steps of each kind

    # Halted at step 3 and resumed: the cache is reused (no teacher generation) and the losses are the same
    run = tmp_path / "halted"
    result = launch(*args(run), "--halt_at", "3")
    assert f"seq_kd: all {len(keys)} teacher translations found in cache {cache}; no teacher generation" \
        in result.stdout
    result = launch(*args(run), "--resume")
    assert "no teacher generation" in result.stdout
    resumed = losses(run)
    assert all(resumed[s] == uninterrupted[s] for s in range(1, 7)), (resumed, uninterrupted)

    # Another corpus (one training pair fewer) with the same cache: refused before any model loads, in one line
    # (one process without the launcher: the refusal comes before any collective)
    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    lines = (corpus / "train.jsonl").read_text().splitlines(keepends=True)
    (corpus / "train.jsonl").write_text("".join(lines[1:]))
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(engine.free_port())}
    result = subprocess.run([sys.executable, "train_ds.py", *args(tmp_path / "stale", corpus)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"train_ds.py: {cache}: stale seq_kd cache, made with another training corpus" in result.stderr
    assert "Traceback" not in result.stderr
