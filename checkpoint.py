"""Checkpoints that resume exactly and survive a crash at any point: every rank writes its shards under a partial
name, rank 0 then renames the folder and only then moves `latest`, so the previous checkpoint stays the latest until
the new one is whole. The client state saved beside the shards is the loop's TrainState.

    RUN/checkpoints/step200/      ZeRO shards + client state     RUN/checkpoints/latest   "step200"
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

import config as config_lib
import engine as engine_lib
import faults
import stages

log = logging.getLogger("train_ds")

PARTIAL = ".partial"  # suffix of a checkpoint folder still being written


class ResumeError(config_lib.ConfigError):
    """--resume names a checkpoint this run cannot continue from (one line that says what to do)."""


@dataclass
class TrainState:
    """Where the loop stands: what a checkpoint saves beside the shards and a resumed run starts from."""
    step: int = 0
    best_bleu: float = -1.0
    evals_without_gain: int = 0
    history: list = field(default_factory=list)
    batches_done: int = 0  # micro-batches consumed by all ranks together: the data position, whatever the rank count
    stream: dict | None = None  # streamed corpora: where this rank's stream goes on (a StreamPosition's fields)


def check_resume(ckpt_dir: Path, tag: str) -> None:
    """One ResumeError line unless ckpt_dir holds the checkpoint --resume names (checked before anything loads)."""
    found = ((ckpt_dir / "latest").is_file() or (ckpt_dir / "latest_universal").is_file() if tag == "latest"
             else (ckpt_dir / tag).is_dir())
    if not found:
        raise ResumeError(f"--resume {tag}: no such checkpoint in {ckpt_dir}; drop --resume to start a new run, or "
                          "give the --out of the run to continue")


def check_export_source(ckpt: str | None) -> None:
    """One ConfigError line unless --ckpt is a run's checkpoints folder (what `train_ds.py export` reads)."""
    if not ckpt:
        raise config_lib.ConfigError("export: --ckpt RUN/checkpoints is required")
    if not (Path(ckpt).parent / "run.json").is_file():
        raise config_lib.ConfigError(f"--ckpt {ckpt}: not a run's checkpoints folder (no run.json beside it); "
                                     "give RUN/checkpoints of a train_ds.py run")


def export(ckpt: Path, tag: str | None, out: Path) -> str:
    """Consolidate a run's ZeRO shards offline (one process, no GPU) into a Hugging Face folder at out; returns the
    stage that trained it."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    run = ckpt.parent
    stage = json.loads((run / "run.json").read_text())["stage"]
    saved = config_lib.from_json_file(run / "config.json")
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
    stages.STAGES[stage](saved).save_folder(state, run, out, {"exported_from": str(ckpt), "tag": tag or "latest"})
    return stage


def check_same_config(run: Path, cfg: config_lib.Config) -> None:
    """A resumed run must train what it started with: one ResumeError line naming the fields that differ from
    RUN/config.json (model, data and distill; train fields such as --max_steps may change)."""
    if not (run / "config.json").is_file():
        return
    saved = json.loads((run / "config.json").read_text())
    defaults = config_lib.Config().to_dict()  # a field newer than the run's config.json: its default
    changed = [f"{s}.{k}" for s, v in cfg.to_dict().items() for k, x in v.items()
               if s in ("model", "data", "distill") and saved.get(s, {}).get(k, defaults[s][k]) != x]
    if changed:
        raise ResumeError(f"--resume with a different config ({', '.join(changed)}); resume with the flags of the "
                          f"original run (see {run}/config.json)")


class Checkpoints:
    """RUN/checkpoints of one run: which checkpoint a resume loads, saving and loading the engine with TrainState."""

    def __init__(self, folder: Path, keep: int):
        self.folder, self.keep = folder, keep

    def resume_tag(self, requested: str | None, world: int, run: Path) -> str | None:
        """The tag --resume loads (`latest` read from its pointer), refused in one line when its ZeRO shards were
        saved by another number of ranks than this run has (they load only on as many)."""
        tag = requested
        if tag == "latest" and (self.folder / "latest").is_file():
            tag = (self.folder / "latest").read_text().strip()
        if tag and not tag.endswith("_universal"):
            saved_ranks = len(list((self.folder / tag).glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")))
            if saved_ranks and saved_ranks != world:
                raise ResumeError(f"--resume: {self.folder / tag} was saved by {saved_ranks} ranks and this run has "
                                  f"{world}; convert it first (RUN={run} TAG={tag} bash "
                                  "scripts/convert_checkpoint.sh), then --resume with any number of ranks")
        return tag

    def saved_total_steps(self, tag: str) -> int | None:
        return saved_client_state(self.folder / tag).get("total_steps")

    def load(self, engine, requested: str, tag: str, grad_accum: int, world: int) -> TrainState:
        """Weights, optimiser and scheduler into engine; the loop's state back."""
        # the tag `latest` named: under load_universal DeepSpeed would read its own pointer, latest_universal
        path, client = engine.load_checkpoint(str(self.folder), tag=None if tag == "latest" else tag)
        if path is None:
            raise ResumeError(f"--resume {requested}: no checkpoint in {self.folder}")
        log.info("resumed from %s at step %d", path, client["step"])
        step = client["step"]
        # checkpoints saved before batches_done was: on as many ranks as now (others were refused by resume_tag)
        return TrainState(step, client["best_bleu"], client["evals_without_gain"], client["history"],
                          client.get("batches_done", step * grad_accum * world), client.get("stream"))

    def save(self, engine, state: TrainState, stage: str, total_steps: int) -> None:
        """Every rank writes its shards under a partial name; once all are done rank 0 renames the folder and only
        then moves `latest`: a crash at any point leaves the previous checkpoint the latest."""
        client = {**dataclasses.asdict(state), "stage": stage, "total_steps": total_steps}
        if state.stream is None:  # a corpus in memory: its position is batches_done
            del client["stream"]
        tag = f"step{state.step}"
        engine.save_checkpoint(str(self.folder), tag=tag + PARTIAL, client_state=client, save_latest=False)
        faults.fault("in_save", state.step)
        dist.barrier()
        if engine_lib.is_main():
            publish_checkpoint(self.folder, tag)
            prune_checkpoints(self.folder, self.keep)
        dist.barrier()


def saved_client_state(folder: Path) -> dict:
    """A checkpoint's client state (step, total_steps, ...) before any engine exists: the first model-states file,
    memory-mapped (under ZeRO-3 it holds shapes and buffers, not weights); {} when there is none."""
    files = sorted(folder.glob("*model_states.pt"))
    return torch.load(files[0], map_location="cpu", weights_only=False, mmap=True) if files else {}


def publish_checkpoint(folder: Path, tag: str) -> None:
    """Rename folder/<tag>.partial to folder/<tag>, then point `latest` at it (atomically, fsynced)."""
    final = folder / tag
    shutil.rmtree(final, ignore_errors=True)  # a step saved again after a resume
    os.replace(folder / (tag + PARTIAL), final)
    pointer = folder / "latest.tmp"
    with pointer.open("w") as handle:
        handle.write(tag)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(pointer, folder / "latest")


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and any partial folder a crash left."""
    for partial in folder.glob("step*" + PARTIAL):
        shutil.rmtree(partial, ignore_errors=True)
    tags = sorted((p for p in folder.glob("step*") if p.is_dir() and p.name[4:].isdigit()),
                  key=lambda p: int(p.name[4:]))
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def consolidated_state(engine) -> dict:
    """Full weights gathered from every rank's shards (all ranks must call it); rank 0 gets them all. Below
    ZeRO-3 (ds_configs/zero2.json) every rank already holds them whole."""
    state = (engine._consolidated_16bit_state_dict() if engine.zero_optimization_stage() == 3
             else engine.module.state_dict())
    return {k: v.detach().cpu().clone() for k, v in state.items()} if engine_lib.is_main() else {}
