"""Distil a Qwen teacher into a tiny zh<->en student with DeepSpeed ZeRO-3, teacher and student in one job.

    # fine-tune the teacher on the parallel corpus first (a stock Qwen is a poor translator of UI strings)
    deepspeed --num_gpus 4 train_ds.py --stage sft --teacher models/Qwen1.5-1.8B --data data/catalogs --out runs/sft
    # distil: the frozen teacher is sharded beside the student; its logits exist only per micro-batch
    deepspeed --num_gpus 4 train_ds.py --stage distill --teacher runs/sft/final --data data/catalogs \
        --preset balanced --out runs/distill
    # consolidate a checkpoint into a Hugging Face folder
    python train_ds.py export --ckpt runs/distill/checkpoints --out runs/distill/exported

With no GPU, `deepspeed --num_gpus 2` starts two CPU ranks (gloo). Outputs: RUN/config.json, RUN/train.log,
RUN/checkpoints/ (resume with --resume), RUN/tb/ (TensorBoard), RUN/best/ and RUN/final/ (student folders).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import checkpoint
import config as config_lib
import corpus
import data
import engine
import faults
import seq_kd
import stages
import vocabulary
from progress import Progress, quiet_unless_terminal
from step_log import MicroBatch, StepLog, StepRecord, StepTimer, batch_counts, skip_reason

log = logging.getLogger("train_ds")


def main(argv: list[str] | None = None) -> None:
    quiet_unless_terminal()
    args, cfg = config_lib.parse_run_args(sys.argv[1:] if argv is None else argv, __doc__, engine.has_gpu)
    config_lib.check_run_paths(args, cfg)
    if args.stage == "export":
        out = Path(cfg.train.out)
        print(f"exported {checkpoint.export(Path(args.ckpt), args.tag, out)} model to {out}")
        return
    stage = stages.STAGES[args.stage](cfg)

    # ---- set-up: processes, run folder, logging
    from deepspeed.accelerator import get_accelerator
    procs = engine.start_processes()
    world, device, on_gpu = procs.world, procs.device, procs.on_gpu
    accelerator = get_accelerator()
    use_bf16 = cfg.train.bf16 == "on" or (cfg.train.bf16 == "auto" and on_gpu and accelerator.is_bf16_supported())
    cfg.train.ds_config = engine.resolve_ds_config(cfg, stage.name, on_gpu)
    run = Path(cfg.train.out)
    checkpoints = checkpoint.Checkpoints(run / "checkpoints", cfg.train.keep)
    engine.setup_logging(run)
    log.info("stage %s | %d rank(s) on %s | bf16 %s | run %s", stage.name, world, device, use_bf16, run)
    if engine.is_main():
        if args.resume:
            checkpoint.check_same_config(run, cfg)
        cfg.save(run / "config.json")
        (run / "run.json").write_text(json.dumps({"stage": stage.name, "world_size": world}) + "\n")
    dist.barrier()

    # ---- data: tokenizer of the teacher, the vocabulary, aligned examples
    prepared = data.prepare_run_data(cfg, run, procs.rank, world, stage.trims_vocabulary)
    if prepared.builder.has_thinking_switch:
        log.info("chat template: the teacher's has a thinking switch (Qwen3-style); thinking is off, so its "
                 "answer starts with the translation")
    if engine.is_main():
        prepared.vocab.save(run)
        prepared.tokenizer.save_pretrained(run / "tokenizer")
        prepared.teacher_config.save_pretrained(run / "teacher_config")
        if Path(cfg.train.teacher, "generation_config.json").is_file():
            shutil.copy(Path(cfg.train.teacher, "generation_config.json"), run / "teacher_config")
    stage.check_targets_cache(prepared, run)  # a stale seq-KD cache is refused before any model loads

    # ---- models: the teacher (frozen and placed by memory, or trained in sft) and the student
    resume_tag = checkpoints.resume_tag(args.resume, world, run)
    if resume_tag and not cfg.train.max_steps:  # --epochs: the schedule keeps the length in steps it started with
        saved_total = checkpoints.saved_total_steps(resume_tag)
        if saved_total and saved_total != prepared.total_steps:
            log.info("schedule: %d steps, as the run started (%d ranks would make it %d); --grad_accum keeps the "
                     "global batch, and so the epochs", saved_total, world, prepared.total_steps)
            prepared.total_steps = saved_total
    models = stage.build_models(prepared, run, world, use_bf16, on_gpu, device,
                                load_universal=bool(resume_tag) and resume_tag.endswith("_universal"))
    targets = stage.training_targets(prepared, models, device)

    # ---- resume: weights, optimiser, scheduler and the data position
    state = (checkpoints.load(models.engine, args.resume, resume_tag, cfg.train.grad_accum, world) if args.resume
             else checkpoint.TrainState())

    # ---- the loop, then the best model as the final one
    stopped_by = train(stage, cfg, procs, accelerator, prepared, models, targets, state, checkpoints, run,
                       args.halt_at)
    if engine.is_main():
        (run / "history.json").write_text(json.dumps(state.history, indent=2, ensure_ascii=False) + "\n")
        if not stopped_by and (run / "best").is_dir():
            shutil.rmtree(run / "final", ignore_errors=True)
            shutil.copytree(run / "best", run / "final")
            log.info("best model (BLEU %.2f) exported to %s", state.best_bleu, run / "final")
    dist.barrier()


class StopRequest:
    """SIGTERM or SIGINT (a pre-empted job), or --halt_at: the loop saves a checkpoint, then goes."""

    def __init__(self):
        self.reason: str | None = None
        signal.signal(signal.SIGTERM, self.handle)
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, _frame) -> None:
        self.reason = signal.Signals(signum).name


def micro_batches(prepared: data.RunData, cfg: config_lib.Config, rank: int, world: int,
                  state: checkpoint.TrainState, targets: dict):
    """This rank's (epoch, position, examples) after the first state.batches_done micro-batches of all ranks together
    (epochs reshuffle by seed): a run resumed on another number of ranks goes on where the data stopped, repeating
    fewer than `world` batches. A streamed corpus goes on from its saved StreamPosition."""
    if prepared.stream:
        for at, examples in prepared.stream.batches(data.StreamPosition(**(state.stream or {}))):
            yield at.epoch, at, examples
    epoch, offset = divmod(state.batches_done // world, prepared.batches_per_epoch)
    while True:
        global_batches = data.make_batches(prepared.train_examples, cfg.train.micro_batch_size,
                                           cfg.data.tokens_per_batch, cfg.train.seed, epoch, world)
        for position, indices in enumerate(global_batches[rank::world][offset:prepared.batches_per_epoch], offset):
            yield epoch, position, seq_kd.with_targets([prepared.train_examples[i] for i in indices], targets)
        epoch, offset = epoch + 1, 0


def train(stage: stages.Stage, cfg: config_lib.Config, procs: engine.Processes, accelerator, prepared: data.RunData,
          models: stages.Models, targets: dict, state: checkpoint.TrainState, checkpoints: checkpoint.Checkpoints,
          run: Path, halt_at: int) -> str | None:
    """Step until the schedule ends, an early stop, or a stop request (then returns what requested it)."""
    rank, world, device, on_gpu = procs.rank, procs.world, procs.device, procs.on_gpu
    model, total_steps = models.engine, prepared.total_steps
    stop = StopRequest()
    batches = micro_batches(prepared, cfg, rank, world, state, targets)
    # in a file, no bar: the step log line says it all
    progress = Progress(total_steps, stage.name, "step", shown=engine.is_main(), initial=state.step)
    steps = StepLog(run, total_steps, state.step, cfg.train.log_every, models.flops, accelerator, device, on_gpu,
                    progress)
    bad_steps, skipped_total = 0, 0
    while state.step < total_steps:
        # dropout and any sampling are seeded by (seed, step, rank): a resumed run replays the same noise
        torch.manual_seed(cfg.train.seed + state.step * world + rank)
        timer = StepTimer(accelerator, on_gpu)
        micro: list[MicroBatch] = []
        on_policy = stage.is_on_policy_step(state.step + 1)
        for _ in range(cfg.train.grad_accum):
            epoch, position, examples = next(batches)
            parts, host = stage.micro_batch_loss(models, examples, prepared.builder, on_policy, device, timer)
            if faults.fault("loss", state.step + 1) and rank == 0:
                parts = parts._replace(total=parts.total * float("nan"))
            with timer.region(stage.trained_region):
                # a non-finite loss is not checked here (a host sync every micro-batch): its gradient norm is not
                # finite either, and DeepSpeed then skips the update on every rank (its norm is all-reduced)
                model.backward(parts.total)
                faults.fault("in_step", state.step + 1)
                model.step()
            micro.append(MicroBatch(epoch, position, parts, batch_counts(host)))
            if prepared.stream:  # where this rank's stream goes on: the batch after the last one trained
                state.stream = dataclasses.asdict(position)
        state.step += 1
        step = state.step
        state.batches_done += cfg.train.grad_accum * world
        skipped = None if model.was_step_applied() else skip_reason(micro, step, device)
        bad_steps = bad_steps + 1 if skipped else 0
        skipped_total += bool(skipped)
        steps.add(StepRecord(step, epoch, on_policy, micro, model.get_lr()[0], model.get_global_grad_norm(), timer,
                             skipped, skipped_total))
        if skipped and engine.is_main():
            log.warning("skipped the update: %s (%d in a row, %d in all)", skipped, bad_steps, skipped_total)
        if bad_steps >= cfg.train.max_bad_steps:
            steps.flush()
            raise SystemExit(f"train_ds.py: {bad_steps} steps in a row skipped, the last: {skipped}. The last "
                             f"checkpoint in {checkpoints.folder} is untouched; resume from it with a lower --lr, or "
                             "look at that batch's data.")

        last_step = step >= total_steps
        if halt_at and step >= halt_at:
            stop.reason = stop.reason or f"--halt_at {halt_at}"
        # agreed on over the host group: a pre-empted rank saves with the others, and no GPU work is waited for
        stopping = engine.any_rank(stop.reason is not None, "cpu", procs.host_group)
        evaluating = step % cfg.train.eval_every == 0 or last_step
        if step % cfg.train.log_every == 0 or step == 1 or evaluating or stopping or last_step:
            steps.flush()
        if evaluating:
            evaluate(stage, models, prepared, state, steps, run, device, on_gpu)
            if cfg.train.patience and state.evals_without_gain >= cfg.train.patience:
                log.info("early stop: no BLEU gain in %d evaluations", state.evals_without_gain)
                last_step = True
        if step % cfg.train.save_every == 0 or last_step or stopping:
            checkpoints.save(model, state, stage.name, total_steps)
        if stopping and not last_step:
            log.info("%s received: saved step %d to %s; resume with --resume", stop.reason, step, checkpoints.folder)
            break
        if last_step:
            break
    steps.close()
    return stop.reason


def evaluate(stage: stages.Stage, models: stages.Models, prepared: data.RunData, state: checkpoint.TrainState,
             steps: StepLog, run: Path, device, on_gpu: bool) -> None:
    """Validate at state.step; a better BLEU than any before is exported to RUN/best."""
    result = stage.evaluate(models, prepared.builder, prepared.valid_examples, device, on_gpu)
    entry = {"step": state.step, **{k: result[k] for k in ("loss", "kd", "ce", "bleu", "chrf")},
             "directions": result["directions"]}
    state.history.append(entry)
    improved = result["bleu"] > state.best_bleu
    if improved:
        state.best_bleu, state.evals_without_gain = result["bleu"], 0
        weights = checkpoint.consolidated_state(models.engine)  # a collective: every rank takes part
        if engine.is_main():
            stage.save_folder(weights, run, run / "best", {"step": state.step, **entry})
    else:
        state.evals_without_gain += 1
    steps.write_eval(state.step, result, entry, improved)


if __name__ == "__main__":
    try:
        main()
    except (config_lib.ConfigError, corpus.CorpusError, vocabulary.VocabMismatchError) as exc:
        # a start-up problem the message explains: no traceback, one line from the first rank
        sys.exit(f"train_ds.py: {exc}" if engine.is_main() else 1)
    # Every file is written and closed and every rank has passed the last barrier. Leave without the C++ teardown
    # at interpreter exit: in it a finished CPU rank sometimes aborts ("terminate called without an active
    # exception", 2 of 3 full test runs here), which fails a job whose work is complete.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
