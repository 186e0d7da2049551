"""Sequence-level and on-policy distillation: what the student trains on besides the reference.

seq_kd: the student trains on the teacher's own translation of each source (greedy, or beam search with
--distill.seq_kd_beams) instead of the reference. The translations are made once, before step 1, by the frozen
teacher decoding over the student's K kept ids (its body, a KV cache, and the kept output rows: each token it
picks is a student id), in length-sorted batches of --distill.seq_kd_batch sources, shared out across ranks,
gathered, and written by rank 0 to a JSONL cache keyed by example. A resident teacher is a plain module on each
rank, so each rank decodes its share alone with no collective per token; a sharded (ZeRO-3) teacher gathers its
layers through ZeRO-3's hooks on every forward, so all ranks decode in lockstep (the documented fallback: a teacher
that does not fit whole on one device cannot decode hook-free without a per-layer forward of its own). Training then only reads it, so a
target is a pure function of its example: a resumed run (or a later epoch) reads the very ids the uninterrupted
run read, whatever batch each translation was decoded in. (Decoding per training batch instead would redo the
teacher's work every epoch and on every resume, and make a target depend on its batch's padding numerics.)

on-policy: on a share of steps, chosen from (seed, step) so every rank and every resume agree, the student
samples its own translation of each source (temperature 1, in evaluation mode, every rank stepping together),
the teacher scores it token by token (prompt + sample, teacher forcing), and the KD term is taken on the sample;
the (1 - alpha) CE term stays on the reference target, so on-policy steps change where the KD term is measured,
not the mix of the loss (CE against the student's own sample would only teach it to repeat itself).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

import config as config_lib
import data
import engine as engine_lib
import teacher as teacher_lib
from kd_loss import LossParts, fused_distill_loss
from model import beam_search
from progress import Progress
from step_log import StepTimer

if TYPE_CHECKING:
    import stages

log = logging.getLogger("train_ds")


SEQ_KD_CACHE_VERSION = 1
ROUND_BATCHES = 50  # teacher batches per rank between cache appends: all that a crash can lose of the pass
FINGERPRINT_SAMPLES, FINGERPRINT_BLOCK = 64, 1 << 16


class SeqKDCacheError(config_lib.ConfigError):
    """A seq_kd cache made for another teacher, corpus, vocabulary or decoding length (one line)."""


def teacher_fingerprint(folder: str | Path) -> str:
    """sha256 of the teacher's config.json and, for every weight file, its name, size and 64 evenly spaced 64 KiB
    blocks (4 MiB read per file however large: any fine-tuning changes every tensor, so every block)."""
    folder = Path(folder)
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    weights = sorted(p for pattern in ("*.safetensors", "*.bin", "*.pt") for p in folder.glob(pattern))
    for path in weights:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as handle:
            for k in range(FINGERPRINT_SAMPLES):
                handle.seek(k * max(0, size - FINGERPRINT_BLOCK) // (FINGERPRINT_SAMPLES - 1))
                digest.update(handle.read(FINGERPRINT_BLOCK))
    return digest.hexdigest()


def example_key(example: data.Example) -> str:
    """What a teacher translation depends on besides the teacher: direction and source text."""
    return f"{config_lib.DIRECTIONS[example.direction]}\t{example.source_text}"


def cache_header(cfg: config_lib.Config, train_examples: list, builder: data.ExampleBuilder) -> dict:
    """What a cache must have been made with to be reused: teacher, corpus sources, vocabulary, the teacher's chat
    prompt (template and thinking switch), decoding."""
    sources = hashlib.sha256("\n".join(example_key(e) for e in train_examples).encode()).hexdigest()
    vocab = builder.vocab
    vocab_sha = hashlib.sha256(json.dumps([vocab.teacher_ids, vocab.tokenizer_sha256]).encode()).hexdigest()
    return {"seq_kd_cache": SEQ_KD_CACHE_VERSION, "teacher": teacher_fingerprint(cfg.train.teacher),
            "data": sources, "vocab": vocab_sha, "prompt": builder.prompt_fingerprint(),
            "max_target_len": cfg.model.max_target_len, "decoding": decoding(cfg.distill.seq_kd_beams)}


def decoding(beams: int) -> str:
    """How the cached translations were searched for (part of the cache's key)."""
    if beams == 1:
        return "greedy over the student vocabulary"
    return f"beam search ({beams} beams, length-normalised) over the student vocabulary"


def cache_path(cfg: config_lib.Config, run: Path) -> Path:
    return Path(cfg.distill.seq_kd_cache) if cfg.distill.seq_kd_cache else run / "seq_kd_cache.jsonl"


def read_cache(path: Path, header: dict) -> dict[str, dict]:
    """Entries {key: {"ids": teacher ids, "finished": bool}} of a cache made like header says; {} when absent.
    A cache made otherwise is refused: its translations would silently train on another teacher's outputs."""
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as handle:
        first = handle.readline()
        try:
            saved = json.loads(first)
        except ValueError:
            saved = None
        if not isinstance(saved, dict) or saved.get("seq_kd_cache") != SEQ_KD_CACHE_VERSION:
            raise SeqKDCacheError(f"{path}: not a seq_kd cache (version {SEQ_KD_CACHE_VERSION}); delete it or give "
                                  "another --distill.seq_kd_cache")
        stale = [name for name in ("teacher", "data", "vocab", "prompt", "max_target_len", "decoding")
                 if saved.get(name) != header[name]]
        if stale:
            what = {"teacher": "another teacher", "data": "another training corpus", "vocab": "another vocabulary",
                    "prompt": "another chat prompt (the teacher's chat template or its thinking switch)",
                    "max_target_len": "another model.max_target_len",
                    "decoding": "another decoding (--distill.seq_kd_beams)"}
            raise SeqKDCacheError(f"{path}: stale seq_kd cache, made with {' and '.join(what[s] for s in stale)} "
                                  f"({', '.join(stale)} fingerprint differs); delete it or pass another "
                                  "--distill.seq_kd_cache")
        entries = {}
        for number, line in enumerate(handle, start=2):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                if not line.endswith("\n"):  # cut by a crash while appending: that round is translated again
                    break
                raise SeqKDCacheError(f"{path}:{number}: not a cache entry; delete the cache or pass another "
                                      "--distill.seq_kd_cache") from None
            entries[entry["key"]] = {"ids": entry["ids"], "finished": entry["finished"]}
    return entries


def write_cache(path: Path, header: dict, entries: dict[str, dict], tokenizer) -> None:
    """Header line, then one line per example (ids in teacher space and the text, for reading); atomic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(json.dumps(header) + "\n")
        handle.writelines(entry_line(key, entries[key], tokenizer) for key in sorted(entries))
    os.replace(tmp, path)


def append_cache(path: Path, entries: dict[str, dict], tokenizer) -> None:
    """One round's translations added at the end of the cache and flushed to disk: a later crash loses none."""
    with path.open("a", encoding="utf-8") as handle:
        handle.writelines(entry_line(key, entries[key], tokenizer) for key in sorted(entries))
        handle.flush()
        os.fsync(handle.fileno())


def entry_line(key: str, entry: dict, tokenizer) -> str:
    text = entry.get("text")
    if text is None:
        text = tokenizer.decode(entry["ids"], skip_special_tokens=True)
    return json.dumps({"key": key, "ids": entry["ids"], "finished": entry["finished"], "text": text},
                      ensure_ascii=False) + "\n"


def unit_fraction(*parts) -> float:
    """A number in [0, 1) fixed by parts (the same on every rank, run and Python process)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def uses_teacher_translation(seed: int, example: data.Example, ratio: float) -> bool:
    return ratio >= 1.0 or (ratio > 0.0 and unit_fraction("seq_kd", seed, example_key(example)) < ratio)


def is_on_policy_step(seed: int, step: int, ratio: float) -> bool:
    """Whether step (1-based) trains on the student's own samples; a function of (seed, step) alone."""
    return ratio >= 1.0 or (ratio > 0.0 and unit_fraction("on_policy", seed, step) < ratio)


def scheduled_indices(examples: list, cfg: config_lib.Config, world: int, batches_per_epoch: int,
                      total_steps: int) -> list[int]:
    """Indices of the training examples some rank trains on in steps 1..total_steps (the loop's own schedule)."""
    positions, epoch, used = total_steps * cfg.train.grad_accum, 0, set()
    while positions > 0 and len(used) < len(examples):
        take = min(positions, batches_per_epoch)  # rank r's offset o is global batch o * world + r
        for batch in data.make_batches(examples, cfg.train.micro_batch_size, cfg.data.tokens_per_batch,
                                       cfg.train.seed, epoch, world)[:take * world]:
            used.update(batch)
        positions, epoch = positions - take, epoch + 1
    return sorted(used)


def teacher_translate(teacher, teacher_rows: torch.Tensor, builder: data.ExampleBuilder, examples: list,
                      filler: data.Example, batch_size: int, device, all_done=None, beams: int = 1,
                      progress=None) -> list[tuple[list[int], bool]]:
    """Translations (teacher ids, without the end token; finished = the end token came) of this rank's examples,
    decoded by the teacher body with a KV cache over the student's K kept ids: greedy, or beam search.

    all_done=None: the teacher is a plain module (resident), and each rank decodes its share alone. Otherwise each
    teacher forward is a collective (ZeRO-3 shards), so every rank calls this with its own share (possibly none),
    all ranks run the same number of batches (a rank out of work decodes `filler`) and the same number of steps
    per batch: all_done(local_done) -> bool says whether every rank is done (as in the student's generate).
    progress: a progress.Progress to advance by the sources of each batch.
    """
    chunks = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    count = torch.tensor([len(chunks)], device=device)
    if all_done is None:
        all_done = bool  # alone: done when this rank's batch is
    else:
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    teacher_of = torch.tensor(builder.vocab.teacher_ids, device=device)
    rows = teacher_rows.float()
    pad = builder.tokenizer.pad_token_id
    results: list[tuple[list[int], bool]] = []
    for index in range(int(count.item())):
        real = index < len(chunks)
        chunk = chunks[index] if real else [filler]
        width = max(len(e.prompt_ids) for e in chunk)
        prompt = {"input_ids": torch.tensor([[pad] * (width - len(e.prompt_ids)) + e.prompt_ids for e in chunk],
                                            device=device),
                  "attention_mask": torch.tensor([[0] * (width - len(e.prompt_ids)) + [1] * len(e.prompt_ids)
                                                  for e in chunk], device=device)}
        prompt["position_ids"] = (prompt["attention_mask"].cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            if beams == 1:
                found = greedy_decode(teacher, rows, teacher_of, builder, prompt, not real, all_done)
            else:
                found = beam_decode(teacher, rows, teacher_of, builder, prompt, beams, all_done)
        if real:
            results += [([builder.vocab.teacher_ids[t] for t in ids], ended) for ids, ended in found]
            if progress is not None:
                progress.update(len(chunk))
    return results


def greedy_decode(teacher, rows: torch.Tensor, teacher_of: torch.Tensor, builder: data.ExampleBuilder, prompt: dict,
                  idle: bool, all_done) -> list[tuple[list[int], bool]]:
    """(student ids without the end token, finished) per prompt row; idle rows (a filler) start done."""
    mask, lengths = prompt["attention_mask"], prompt["attention_mask"].sum(1)
    done = torch.full((mask.shape[0],), idle, dtype=torch.bool, device=mask.device)
    steps: list[torch.Tensor] = []
    out = teacher(**prompt, use_cache=True)
    for step in range(builder.max_target_len - 1):  # room for the end token in the example
        logits = out.last_hidden_state[:, -1].float() @ rows.T
        logits[:, builder.bos_id] = float("-inf")
        token = logits.argmax(-1)
        token = torch.where(token == builder.pad_id, builder.eos_id, token)  # Qwen's other stop token
        token = token.masked_fill(done, builder.pad_id)
        steps.append(token)
        done |= token == builder.eos_id
        if all_done(bool(done.all())):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = teacher(input_ids=teacher_of[token][:, None], attention_mask=mask,
                      position_ids=(lengths + step)[:, None], past_key_values=out.past_key_values, use_cache=True)
    found = []
    for row in torch.stack(steps, dim=1).tolist():
        ended = builder.eos_id in row
        found.append((row[:row.index(builder.eos_id)] if ended else row, ended))
    return found


def beam_decode(teacher, rows: torch.Tensor, teacher_of: torch.Tensor, builder: data.ExampleBuilder, prompt: dict,
                beams: int, all_done) -> list[tuple[list[int], bool]]:
    """model.beam_search driven by the teacher: each prompt row becomes `beams` rows sharing one KV cache, which
    is reordered with the beams. Qwen's other stop token (the student's pad id) counts as the end token."""
    expand = lambda t: t.repeat_interleave(beams, dim=0)  # noqa: E731
    mask, lengths = expand(prompt["attention_mask"]), expand(prompt["attention_mask"].sum(1))
    cache = None

    def step(last: torch.Tensor, origin: torch.Tensor | None, position: int) -> torch.Tensor:
        nonlocal mask, cache
        if origin is None:
            out = teacher(**{k: expand(v) for k, v in prompt.items()}, use_cache=True)
        else:
            cache.reorder_cache(origin)
            mask = torch.cat([mask[origin], torch.ones_like(mask[:, :1])], dim=1)
            out = teacher(input_ids=teacher_of[last][:, None], attention_mask=mask,
                          position_ids=(lengths + position - 1)[:, None], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.last_hidden_state[:, -1].float() @ rows.T
        logits[:, builder.bos_id] = float("-inf")
        logprobs = torch.log_softmax(logits, dim=-1)
        logprobs[:, builder.eos_id] = torch.logaddexp(logprobs[:, builder.eos_id], logprobs[:, builder.pad_id])
        logprobs[:, builder.pad_id] = float("-inf")
        return logprobs

    return beam_search(step, prompt["input_ids"].shape[0], beams, builder.max_target_len - 1, builder.bos_id,
                       builder.eos_id, builder.pad_id, mask.device, all_done)


def teacher_targets(cfg: config_lib.Config, prepared, teacher, teacher_rows: torch.Tensor, header: dict,
                    cached: dict[str, dict], path: Path, device, all_done=None) -> dict[str, list[int]]:
    """{example key: the teacher's translation as target ids (end token included)} for the scheduled examples
    seq_kd picks (with_targets swaps them in; the others, and those whose teacher translation is empty or never
    ended, keep the reference). Translations the cache lacks are made now, before step 1, sharded across
    ranks; rank 0 rewrites the cache with them. prepared: data.RunData (examples, builder and schedule).
    all_done: None for a plain (resident) teacher, else the lockstep test of teacher_translate."""
    rank, world = dist.get_rank(), dist.get_world_size()
    examples, builder = prepared.train_examples, prepared.builder
    scheduled = scheduled_indices(examples, cfg, world, prepared.batches_per_epoch, prepared.total_steps)
    chosen = [i for i in scheduled if uses_teacher_translation(cfg.train.seed, examples[i], cfg.distill.seq_kd_ratio)]
    first_of: dict[str, int] = {}
    for i in chosen:
        first_of.setdefault(example_key(examples[i]), i)
    missing = sorted((i for key, i in first_of.items() if key not in cached),
                     key=lambda i: (len(examples[i].prompt_ids), i))
    if missing:
        log.info("seq_kd: the teacher translates %d training sources (%d of %d in cache %s) ...", len(missing),
                 len(first_of) - len(missing), len(first_of), path)
        start = time.perf_counter()
        batch = cfg.distill.seq_kd_batch
        chunks = [missing[i:i + batch] for i in range(0, len(missing), batch)]
        if rank == 0:  # the header and what is cached already (a line cut by a crash is dropped)
            write_cache(path, header, cached, builder.tokenizer)
        # rank 0's share (sources), so the bar's rate is rank 0's sources/s: the whole pass runs world times that
        # in a log file, a line a minute: this pass can run for hours with nothing else to say
        progress = Progress(sum(len(c) for c in chunks[::world]), "seq_kd: teacher translations (rank 0)", "src",
                            log, every=60.0, shown=rank == 0)
        for first in range(0, len(chunks), ROUND_BATCHES * world):
            mine = [i for chunk in chunks[first:first + ROUND_BATCHES * world][rank::world] for i in chunk]
            made = teacher_translate(teacher, teacher_rows, builder, [examples[i] for i in mine],
                                     examples[missing[0]], batch, device, all_done, cfg.distill.seq_kd_beams,
                                     progress)
            gathered: list = [None] * world
            dist.all_gather_object(gathered, [(example_key(examples[i]), ids, done)
                                              for i, (ids, done) in zip(mine, made)])
            new = {key: {"ids": ids, "finished": done} for part in gathered for key, ids, done in part}
            cached.update(new)
            if rank == 0:
                append_cache(path, new, builder.tokenizer)
        progress.close()
        dist.barrier()
        seconds = time.perf_counter() - start
        log.info("seq_kd: %d teacher translations in %.1f s (%.1f sources/s on %d rank(s), batches of %d), cached "
                 "in %s", len(missing), seconds, len(missing) / seconds, world, batch, path)
    else:
        log.info("seq_kd: all %d teacher translations found in cache %s; no teacher generation", len(first_of), path)
    targets = {}
    for key in first_of:
        entry = cached[key]
        if entry["ids"] and entry["finished"]:
            targets[key] = entry["ids"] + [builder.eos_teacher_id]
    log.info("seq_kd: %d of %d scheduled examples train on the teacher's translation (ratio %.2f); %d keep the "
             "reference because the teacher's was empty or never ended",
             sum(example_key(examples[i]) in targets for i in chosen), len(scheduled), cfg.distill.seq_kd_ratio,
             sum(example_key(examples[i]) not in targets for i in chosen))
    return targets


def with_targets(examples: list, targets: dict[str, list[int]]) -> list:
    """examples with the target ids targets holds for their key (seq_kd), the others as they are."""
    if not targets:
        return examples
    return [dataclasses.replace(e, target_ids=targets[k]) if (k := example_key(e)) in targets else e
            for e in examples]


# ----------------------------------------------------------------------------- on-policy steps

def on_policy_loss(models: stages.Models, examples: list, builder: data.ExampleBuilder, cfg: config_lib.DistillConfig,
                   device, timer: StepTimer) -> tuple[LossParts, dict]:
    """alpha * T^2 * D(teacher, student) on the student's own samples + (1 - alpha) * CE on the reference, in one
    student forward over [samples; references] (one forward and backward per micro-batch, as on other steps).
    Returns the loss and the host lists of the batch it trained on (for counting its tokens)."""
    engine = models.engine
    reference = engine_lib.to_device(builder.collate(examples), device)
    with timer.region("student"):
        engine.module.eval()  # sample from the student's distribution, not a dropout-perturbed one
        with engine_lib.whole_model(engine) as whole, torch.no_grad():
            samples = engine.module.generate(reference["source_ids"], reference["source_mask"],
                                             reference["direction"],
                                             all_done=None if whole else engine_lib.lockstep(device), temperature=1.0)
        engine.module.train()
    ended = [builder.eos_teacher_id]  # a sample shorter than the limit ended with the end token
    sampled = [dataclasses.replace(e, target_ids=[builder.vocab.teacher_ids[t] for t in ids] +
                                   (ended if len(ids) < builder.max_target_len else []))
               for e, ids in zip(examples, samples)]
    with timer.region("teacher"):
        scored = engine_lib.to_device(builder.collate(sampled), device)
        with torch.no_grad():
            hidden = teacher_lib.teacher_hidden(models.teacher, scored, scored["labels"].shape[1])
    with timer.region("student"):
        host = builder.collate(sampled + list(examples))
        both = engine_lib.to_device(host, device)
        labels, n = both["labels"], len(examples)
        kd_labels, ce_labels = labels.clone(), labels.clone()
        kd_labels[n:], ce_labels[:n] = data.IGNORE_INDEX, data.IGNORE_INDEX
        teacher_full = hidden.new_zeros(labels.shape + hidden.shape[-1:])
        teacher_full[:n, :hidden.shape[1]] = hidden
        no_teacher = hidden.new_zeros(labels.shape + (1,))  # the CE part: a teacher term weighted 0
        no_rows = models.teacher_rows.new_zeros(models.teacher_rows.shape[0], 1)
        kd_cfg, ce_cfg = dataclasses.replace(cfg, alpha=1.0), dataclasses.replace(cfg, alpha=0.0)

        def output_loss(s_hidden, s_weight):
            kd = fused_distill_loss(s_hidden, s_weight, teacher_full, models.teacher_rows, kd_labels, kd_cfg)
            ce = fused_distill_loss(s_hidden, s_weight, no_teacher, no_rows, ce_labels, ce_cfg)
            return LossParts(cfg.alpha * kd.total + (1 - cfg.alpha) * ce.total, kd.kd, ce.ce, kd.tokens + ce.tokens)

        out = engine(source_ids=both["source_ids"], source_mask=both["source_mask"], direction=both["direction"],
                     decoder_input_ids=both["decoder_input_ids"], output_loss=output_loss)
    return out.loss_parts, host
