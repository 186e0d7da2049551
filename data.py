"""Aligned teacher/student examples, their padded batches, and deterministic batching, in memory or streamed; and a
run's data as a whole (prepare_run_data: tokenizer, vocabulary, examples and the schedule they give).

The teacher (a Qwen causal LM) sees each pair as a chat: an instruction plus the source as the user turn,
the target as the assistant turn. The student (an encoder-decoder) sees the source plus a direction id.
Both predict the *same* target token ids at the same positions, so their logits can be compared
position by position (see `ExampleBuilder.collate`).

Batches are nested lists and nothing here imports torch, so the losses (kd_loss.py, model.py) take the label
padding value, IGNORE_INDEX, from the module that writes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from config import DIRECTIONS, Config, ConfigError
from corpus import MAX_CHARS, Pair, arrow_sample, check_rows, enforce, load_splits, saved_dataset_split
from vocabulary import (BOS_TOKEN, CHAR_TO_BYTE, EOS_TOKEN, PAD_TOKEN, VocabMap, VocabMismatchError, build_vocab_map,
                        byte_token_ids)

log = logging.getLogger(__name__)

LANGUAGE_NAMES = {"zh": "Chinese", "en": "English"}
IGNORE_INDEX = -100  # a padded label; the value torch's and transformers' losses skip by default


# --------------------------------------------------------------------------- examples

@dataclass
class Example:
    direction: int          # index into DIRECTIONS
    source_ids: list[int]   # student ids of the source
    prompt_ids: list[int]   # teacher ids: chat-template prompt ending with the assistant header
    target_ids: list[int]   # teacher ids of the target followed by eos; every id is in the student vocabulary
    source_text: str = ""
    reference: str = ""


def direction_index(direction: str) -> int:
    return DIRECTIONS.index(direction)


def instruction(direction: str) -> str:
    src, tgt = direction.split("-")
    return f"Translate the following text from {LANGUAGE_NAMES[src]} to {LANGUAGE_NAMES[tgt]}."


class ExampleBuilder:
    """Turns pairs into aligned teacher/student examples with one tokenizer and one vocabulary map."""

    def __init__(self, tokenizer, vocab: VocabMap, max_source_len: int, max_target_len: int):
        self.tokenizer, self.vocab = tokenizer, vocab
        self.max_source_len, self.max_target_len = max_source_len, max_target_len
        bytes_ids = byte_token_ids(tokenizer)
        self._bytes_of_token = {}
        for token, tid in tokenizer.get_vocab().items():
            if tid not in vocab.student_of and all(c in CHAR_TO_BYTE for c in token):
                self._bytes_of_token[tid] = [bytes_ids[CHAR_TO_BYTE[c]] for c in token]
        self.pad_id = vocab.student_of[tokenizer.convert_tokens_to_ids(PAD_TOKEN)]
        self.bos_id = vocab.student_of[tokenizer.convert_tokens_to_ids(BOS_TOKEN)]
        self.eos_teacher_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
        self.eos_id = vocab.student_of[self.eos_teacher_id]
        self._parts: dict[str, tuple[list[int], list[int]]] = {}

    def _restrict(self, natural: list[int]) -> list[int]:
        out: list[int] = []
        for tid in natural:
            if tid in self.vocab.student_of:
                out.append(tid)
            elif tid in self._bytes_of_token:
                out.extend(self._bytes_of_token[tid])
            else:
                raise VocabMismatchError(f"teacher token id {tid} is neither kept nor spellable in bytes")
        return out

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []

    def teacher_ids(self, text: str) -> list[int]:
        """Teacher-space ids restricted to the student vocabulary (unkept tokens spelled in bytes)."""
        return self._restrict(self._encode([text])[0])

    def student_ids(self, text: str) -> list[int]:
        return [self.vocab.student_of[t] for t in self.teacher_ids(text)]

    def prompt_text(self, source: str, direction: str, thinking: bool = False) -> str:
        """The teacher's chat prompt, ending where the translation starts. Qwen3-style templates open the
        assistant turn in thinking mode unless told otherwise (the next token would be `<think>`, which no
        translation starts with), so thinking is switched off; older Qwen templates ignore the switch."""
        messages = [{"role": "user", "content": f"{instruction(direction)}\n{source}"}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                  enable_thinking=thinking)

    @property
    def has_thinking_switch(self) -> bool:
        """Whether the chat template renders differently with thinking on (a Qwen3-style template)."""
        return self.prompt_text("x", DIRECTIONS[0], thinking=True) != self.prompt_text("x", DIRECTIONS[0])

    def prompt_fingerprint(self) -> str:
        """sha256 of the prompt ids around the source in every direction: what the teacher is conditioned on."""
        parts = [self._prompt_parts(direction) for direction in DIRECTIONS]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def _prompt_parts(self, direction: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the source in the rendered chat prompt.

        The source is tokenized on its own and spliced in: the prefix ends with a newline and the suffix
        starts with a special token, both pre-tokenizer boundaries in Qwen's split pattern, so the splice
        gives the same ids as tokenizing the whole prompt (tests check it on the corpus) at a fraction of
        the cost of rendering the template for every example.
        """
        if direction not in self._parts:
            marker = "\u2063SOURCE\u2063"
            rendered = self.prompt_text(marker, direction)
            if rendered.count(marker) != 1:
                raise VocabMismatchError("the teacher's chat template does not place the user message verbatim")
            before, after = rendered.split(marker)
            self._parts[direction] = (self._encode([before])[0], self._encode([after])[0])
        return self._parts[direction]

    def examples(self, pairs: Sequence[Pair], directions: Sequence[str]) -> tuple[list[Example], int]:
        """One example per pair and direction; returns (examples, number dropped as too long)."""
        built: list[Example] = []
        too_long = 0
        for direction in directions:
            src_lang, tgt_lang = direction.split("-")
            before, after = self._prompt_parts(direction)
            sources = [p.side(src_lang).strip() for p in pairs]
            references = [p.side(tgt_lang).strip() for p in pairs]
            for text, reference, natural, target in zip(sources, references, self._encode(sources),
                                                        self._encode(references)):
                source = [self.vocab.student_of[t] for t in self._restrict(natural)]
                target = self._restrict(target) + [self.eos_teacher_id]
                if len(source) > self.max_source_len or len(target) > self.max_target_len:
                    too_long += 1
                    continue
                built.append(Example(direction_index(direction), source, before + natural + after, target,
                                     text, reference))
        return built, too_long

    def collate(self, examples: Sequence[Example]) -> dict[str, list[list[int]] | list[int]]:
        """Pad examples built here into aligned student and teacher tensors (as nested lists; torch-free).

        Student: `source_ids`/`source_mask`, `direction`, `decoder_input_ids` ([bos] + target[:-1]) and
        `labels` (target, student ids, IGNORE_INDEX on padding).
        Teacher: prompts are *left*-padded to one length P and targets right-padded, so logits at positions
        P-1 .. P-1+T-1 predict the same `labels` column by column (`teacher_labels` holds them in teacher ids);
        `teacher_position_ids` skip the padding. `target_positions`: the flat indices into `labels` of the real
        targets (what the losses select, computed here so that selecting them on a GPU needs no host sync).
        """
        pad_id, bos_id, student_of = self.pad_id, self.bos_id, self.vocab.student_of
        teacher_pad_id = self.tokenizer.pad_token_id
        src_len = max(len(e.source_ids) for e in examples)
        tgt_len = max(len(e.target_ids) for e in examples)
        prompt_len = max(len(e.prompt_ids) for e in examples)
        batch: dict[str, list] = {k: [] for k in ("source_ids", "source_mask", "direction", "decoder_input_ids",
                                                  "labels", "teacher_labels", "teacher_input_ids",
                                                  "teacher_attention_mask", "teacher_position_ids")}
        for e in examples:
            target = [student_of[t] for t in e.target_ids]
            n_src, n_tgt, n_prompt = len(e.source_ids), len(target), len(e.prompt_ids)
            batch["source_ids"].append(e.source_ids + [pad_id] * (src_len - n_src))
            batch["source_mask"].append([1] * n_src + [0] * (src_len - n_src))
            batch["direction"].append(e.direction)
            batch["decoder_input_ids"].append([bos_id] + target[:-1] + [pad_id] * (tgt_len - n_tgt))
            batch["labels"].append(target + [IGNORE_INDEX] * (tgt_len - n_tgt))
            batch["teacher_labels"].append(e.target_ids + [IGNORE_INDEX] * (tgt_len - n_tgt))
            left = prompt_len - n_prompt
            body = e.prompt_ids + e.target_ids[:-1]
            batch["teacher_input_ids"].append([teacher_pad_id] * left + body + [teacher_pad_id] * (tgt_len - n_tgt))
            mask = [0] * left + [1] * len(body) + [0] * (tgt_len - n_tgt)
            batch["teacher_attention_mask"].append(mask)
            positions, seen = [], 0
            for m in mask:
                positions.append(seen if m else 0)
                seen += m
            batch["teacher_position_ids"].append(positions)
        batch["target_positions"] = [row * tgt_len + j for row, e in enumerate(examples)
                                     for j in range(len(e.target_ids))]
        return batch

    def decode(self, student_ids: Iterable[int]) -> str:
        special = {self.pad_id, self.bos_id, self.eos_id}
        teacher = [self.vocab.teacher_ids[i] for i in student_ids if i not in special]
        return self.tokenizer.decode(teacher, skip_special_tokens=True)


# --------------------------------------------------------------------------- batches

def make_batches(examples: Sequence[Example], micro_batch_size: int, tokens_per_batch: int, seed: int,
                 epoch: int, world_size: int) -> list[list[int]]:
    """Example indices per global micro-batch, identical on every rank, a multiple of world_size long.

    Examples are shuffled per (seed, epoch), grouped into buckets of similar length so little padding is
    needed, then batches are shuffled. With tokens_per_batch > 0 a batch grows until its padded size
    (sentences x longest source+target) would pass the budget.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    bucket = max(micro_batch_size, 1) * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), bucket):
        chunk = sorted(order[start:start + bucket],
                       key=lambda i: (len(examples[i].target_ids), len(examples[i].source_ids)))
        current: list[int] = []
        longest = 0
        for i in chunk:
            size = len(examples[i].target_ids) + len(examples[i].source_ids)
            full = (len(current) >= micro_batch_size if tokens_per_batch <= 0
                    else current and max(longest, size) * (len(current) + 1) > tokens_per_batch)
            if full:
                batches.append(current)
                current, longest = [], 0
            current.append(i)
            longest = max(longest, size)
        if current:
            batches.append(current)
    rng.shuffle(batches)
    usable = len(batches) - len(batches) % world_size  # every rank must run the same number of steps
    return batches[:usable]


@dataclass(frozen=True)
class StreamPosition:
    """Where a stream resumes: the epoch, the index into that epoch's window order, and this rank's next batch
    within the window. Saved with every checkpoint (checkpoint.TrainState) so a resumed run reads on from there."""
    epoch: int = 0
    window: int = 0
    batch: int = 0


# --------------------------------------------------------------------------- streaming a large Arrow corpus

class ExampleStream:
    """Micro-batches of a large corpus in a `datasets` folder (save_to_disk: memory-mapped Arrow), read one
    window of rows at a time, so a rank's memory follows the window, not the corpus (WMT19 zh-en is 26M pairs).

    Windows are visited in a shuffled order per epoch. Every rank reads the same window and builds the same
    batches (make_batches is deterministic) and keeps its own share: every rank runs the same number of
    steps, which ZeRO-3 needs, and a rank tokenizes only one window at a time. Bad rows are checked window by
    window under the same rules and policy as files (check the whole corpus first with `corpus.load_splits`
    when it fits in memory).
    """

    def __init__(self, path: str | Path, builder: ExampleBuilder, directions: Sequence[str], window_rows: int,
                 micro_batch_size: int, tokens_per_batch: int, seed: int, world_size: int, rank: int,
                 on_bad_line: str = "error", max_chars: int = MAX_CHARS):
        self.table = saved_dataset_split(path, "train")
        self.origin, self.builder, self.directions = str(path), builder, list(directions)
        self.window_rows, self.micro_batch_size, self.tokens_per_batch = window_rows, micro_batch_size, \
            tokens_per_batch
        self.seed, self.world_size, self.rank = seed, world_size, rank
        self.on_bad_line, self.max_chars = on_bad_line, max_chars
        self.windows = max(1, -(-len(self.table) // window_rows))
        self.skipped: Counter = Counter()  # bad rows dropped so far, by reason (on_bad_line skip)

    def __len__(self) -> int:
        return len(self.table)

    def _window_order(self, epoch: int) -> list[int]:
        order = list(range(self.windows))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _window_examples(self, window: int) -> list[Example]:
        start = window * self.window_rows
        columns = self.table[start:start + self.window_rows]  # one slice of the memory map, as columns
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        result = check_rows(rows, self.origin, self.max_chars, first_row=start + 1)
        enforce([result], self.on_bad_line)
        self.skipped.update(result.counts)
        return self.builder.examples(result.pairs, self.directions)[0]

    def batches(self, start: StreamPosition = StreamPosition()) -> Iterator[tuple[StreamPosition, list[Example]]]:
        """This rank's micro-batches from `start` on, forever (epochs reshuffle), each with the position that
        follows it."""
        epoch, first_window, first_batch = start.epoch, start.window, start.batch
        while True:
            order = self._window_order(epoch)
            for slot in range(first_window, len(order)):
                examples = self._window_examples(order[slot])
                mine = make_batches(examples, self.micro_batch_size, self.tokens_per_batch, self.seed,
                                    epoch * self.windows + order[slot], self.world_size)[self.rank::self.world_size]
                for index in range(first_batch, len(mine)):
                    yield StreamPosition(epoch, slot, index + 1), [examples[i] for i in mine[index]]
                first_batch = 0
            epoch, first_window = epoch + 1, 0


# ----------------------------------------------------------------------------- a run's data

@dataclass
class RunData:
    """The tokenizer, trimmed vocabulary and aligned examples of a run, and the schedule they give."""
    tokenizer: object
    teacher_config: object
    vocab: VocabMap
    builder: ExampleBuilder
    train_examples: list
    valid_examples: list
    batches_per_epoch: int
    total_steps: int
    stream: ExampleStream | None = None  # --data.stream_window: train examples read window by window


STREAM_VOCAB_ROWS = 200_000  # rows of a streamed corpus counted for the student's vocabulary


def prepare_run_data(cfg: Config, run: Path, rank: int, world: int, trimmed_vocabulary: bool) -> RunData:
    """Teacher tokenizer, the vocabulary (trimmed for a student, reused from RUN when resuming; else the teacher's
    whole), aligned examples, and the schedule they give. Every problem in the splits is listed before step 1
    (CorpusError), not the first one at hour 30."""
    from transformers import AutoConfig, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(cfg.train.teacher, trust_remote_code=cfg.train.trust_remote_code)
    teacher_config = AutoConfig.from_pretrained(cfg.train.teacher, trust_remote_code=cfg.train.trust_remote_code)
    if len(tokenizer) > teacher_config.vocab_size:  # padded is normal (Qwen: 151,643 ids, 151,936 rows); short is not
        raise VocabMismatchError(
            f"{cfg.train.teacher}: the tokenizer has {len(tokenizer)} ids but the model has only "
            f"{teacher_config.vocab_size} output rows; the tokenizer files belong to another model: use the ones "
            "saved with this checkpoint")
    streaming = cfg.data.stream_window > 0
    if streaming and (not cfg.train.max_steps or cfg.distill.seq_kd):
        raise ConfigError("--data.stream_window needs --max_steps (a stream has no epoch length known in advance) "
                          "and --seq_kd false (seq_kd translates every scheduled example before step 1, which a "
                          "stream exists to avoid)")
    splits = load_splits(cfg.data.path, ("valid",) if streaming else ("train", "valid"), cfg.data.on_bad_line,
                         cfg.data.max_chars)
    train_pairs = (arrow_sample(cfg.data.path, STREAM_VOCAB_ROWS, cfg.data.max_chars) if streaming
                   else splits["train"].pairs)
    valid_pairs = splits["valid"].pairs[:cfg.data.valid_subset]
    if trimmed_vocabulary:
        if (run / VocabMap.FILE).is_file():
            vocab = VocabMap.load(run)
            vocab.check_tokenizer(tokenizer, f"teacher {cfg.train.teacher}")
        else:
            texts = [p.zh for p in train_pairs] + [p.en for p in train_pairs]
            vocab = build_vocab_map(tokenizer, texts, cfg.data.vocab_size, teacher_config.vocab_size)
    else:
        vocab = VocabMap.full(tokenizer, teacher_config.vocab_size)
    builder = ExampleBuilder(tokenizer, vocab, cfg.model.max_source_len, cfg.model.max_target_len)
    if streaming:
        stream = ExampleStream(cfg.data.path, builder, cfg.data.directions, cfg.data.stream_window,
                               cfg.train.micro_batch_size, cfg.data.tokens_per_batch, cfg.train.seed, world, rank,
                               cfg.data.on_bad_line, cfg.data.max_chars)
        log.info("data: streaming %d train rows in windows of %d; vocabulary from the first %d rows",
                 len(stream), cfg.data.stream_window, len(train_pairs))
        valid_examples, _ = builder.examples(valid_pairs, cfg.data.directions)
        return RunData(tokenizer, teacher_config, vocab, builder, [], valid_examples, 0, cfg.train.max_steps, stream)
    train_examples, dropped = builder.examples(train_pairs, cfg.data.directions)
    valid_examples, _ = builder.examples(valid_pairs, cfg.data.directions)
    log.info("data: %d train pairs -> %d examples (%d too long for the model), %d validation examples; "
             "vocabulary %d of the teacher's %d ids", len(train_pairs), len(train_examples), dropped,
             len(valid_examples), vocab.size, teacher_config.vocab_size)
    batches_per_epoch = len(make_batches(train_examples, cfg.train.micro_batch_size, cfg.data.tokens_per_batch,
                                         cfg.train.seed, 0, world)) // world
    steps_per_epoch = max(1, batches_per_epoch // cfg.train.grad_accum)
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    return RunData(tokenizer, teacher_config, vocab, builder, train_examples, valid_examples, batches_per_epoch,
                   total_steps)
