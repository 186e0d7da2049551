"""What a run reports as it trains: per-region step times, model FLOPs and MFU, and the step log itself
(RUN/metrics.jsonl, TensorBoard under RUN/tb, the progress bar and rank 0's log line).

A step's losses stay on the device until the log is flushed, once per logging interval: the one host sync of that
interval (a per-step read would stall a GPU whose kernels are still queued).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from kd_loss import LossParts

log = logging.getLogger("train_ds")


# ----------------------------------------------------------------------------- timing and FLOPs

class StepTimer:
    """Time spent in each region (teacher, student) of a step. On a GPU each region is a pair of device events,
    read only when the log is flushed, so timing adds no host sync per step and the teacher's kernels count as
    teacher time however late they run; on CPU, where work is synchronous, the wall clock."""

    def __init__(self, accelerator, on_gpu: bool):
        self.accelerator, self.on_gpu = accelerator, on_gpu
        self.seconds = {"teacher": 0.0, "student": 0.0}
        self.events: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def region(self, name: str):
        if self.on_gpu:
            start, end = (self.accelerator.Event(enable_timing=True) for _ in range(2))
            start.record()
            yield
            end.record()
            self.events.append((name, start, end))
        else:
            began = time.perf_counter()
            yield
            self.seconds[name] += time.perf_counter() - began

    def ms(self) -> dict[str, float]:
        """Milliseconds per region; on a GPU this waits for the recorded events (call it when flushing)."""
        for name, start, end in self.events:
            end.synchronize()
            self.seconds[name] += start.elapsed_time(end) / 1000
        self.events.clear()
        return {name: 1000 * seconds for name, seconds in self.seconds.items()}


def batch_counts(batch: dict) -> tuple[int, int, int, int]:
    """Target, source, teacher and padded tokens of a collated batch, counted on the host lists (no sync)."""
    return (len(batch["target_positions"]), sum(map(sum, batch["source_mask"])),
            sum(map(sum, batch["teacher_attention_mask"])),
            len(batch["labels"]) * len(batch["labels"][0]) + len(batch["source_ids"]) * len(batch["source_ids"][0]))


# Dense bf16 peak per GPU (vendor data sheets, no sparsity), by a part of torch.cuda.get_device_name(). The first
# match wins, so a variant with another peak comes before the name it contains ("H100 PCIe" before "H100", "H200"
# before "H20", "A100" before "A10"; an SXM H100 reports "NVIDIA H100 80GB HBM3", a GH200 matches "H200"). None:
# a card whose peak we do not know for sure, so no MFU is shown for it rather than a wrong one.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                   ("H800", 989e12), ("H20", 148e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12),
                   ("L40S", 362e12), ("L40", 181e12), ("L20", 119e12), ("A10G", None), ("A10", 125e12),
                   ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 6000 Ada", 364e12), ("A6000", 155e12))


@dataclass
class StepFlops:
    """Model FLOPs of one distillation micro-batch, from parameter counts (attention's T^2 terms are left
    out: sequences here are short). Teacher: forward only; student: forward and backward (x3)."""
    teacher_per_token: float        # 2 x teacher parameters outside its embedding and output layer
    teacher_head_per_target: float  # 2 x K x teacher width: the kept rows, at target positions
    student_per_source: float       # 6 x encoder parameters
    student_per_target: float       # 6 x (decoder parameters + the K x width output layer)
    student_parameters: int

    @classmethod
    def of(cls, teacher_config, teacher_parameters: int, student, kept: int) -> "StepFlops":
        width = teacher_config.hidden_size
        embeddings = teacher_config.vocab_size * width * (1 if teacher_config.tie_word_embeddings else 2)
        encoder = sum(p.numel() for name, p in student.named_parameters() if name.startswith("encoder"))
        decoder = sum(p.numel() for name, p in student.named_parameters() if name.startswith("decoder"))
        out_layer = student.config.vocab_size * student.config.d_model
        return cls(2.0 * (teacher_parameters - embeddings), 2.0 * kept * width, 6.0 * encoder,
                   6.0 * (decoder + out_layer), sum(p.numel() for p in student.parameters()))

    def __call__(self, teacher_tokens: float, source_tokens: float, target_tokens: float) -> float:
        return (self.teacher_per_token * teacher_tokens + self.teacher_head_per_target * target_tokens
                + self.student_per_source * source_tokens + self.student_per_target * target_tokens)


def peak_flops(device_name: str | None) -> float | None:
    """Dense bf16 peak of the GPU named so (torch.cuda.get_device_name), for MFU; None on CPU (no name) or for a
    card not in PEAK_BF16_FLOPS: no MFU rather than a wrong one."""
    if not device_name:
        return None
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in device_name), None)


def gpu_name(on_gpu: bool) -> str | None:
    return torch.cuda.get_device_name() if on_gpu else None


def max_memory_gb(accelerator, on_gpu: bool) -> float:
    if on_gpu:
        return accelerator.max_memory_allocated() / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kB on Linux


# ----------------------------------------------------------------------------- the step log

@dataclass
class MicroBatch:
    """One micro-batch of a step: where it came from, its loss parts (on the device) and its token counts."""
    epoch: int
    position: object  # batch index in the epoch, or a StreamPosition
    parts: LossParts
    counts: tuple[int, int, int, int]  # target, source, teacher and padded tokens (batch_counts)


@dataclass
class StepRecord:
    """A trained step waiting for the next flush (StepLog): its values stay on the device until then."""
    step: int
    epoch: int
    on_policy: bool
    micro: list[MicroBatch]
    lr: float
    grad_norm: object  # a float or a device tensor, as DeepSpeed keeps it
    timer: StepTimer
    skipped: str | None
    skipped_total: int

    def device_values(self) -> list:
        """[loss, kd, ce] averaged over the micro-batches (device tensors), then the token counts summed."""
        n = len(self.micro)
        losses = [sum(m.parts[i].detach().double() for m in self.micro) / n for i in range(3)]
        return losses + [float(sum(m.counts[i] for m in self.micro)) for i in range(4)]


def skip_reason(micro: list[MicroBatch], step: int, device) -> str:
    """Why DeepSpeed skipped step's update (its gradient norm was not finite), naming the first micro-batch whose
    loss was not finite on any rank. Only a skipped step pays this sync; every rank skips together."""
    flags = torch.stack([(~torch.isfinite(m.parts.total.detach())).to(torch.float64) for m in micro]).to(device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad = [i for i, flag in enumerate(flags.tolist()) if flag]
    if not bad:
        return f"non-finite gradient at step {step}, epoch {micro[-1].epoch} batch {micro[-1].position}"
    first = micro[bad[0]]
    return f"non-finite loss at step {step}, epoch {first.epoch} batch {first.position}"


def record(run: Path, entry: dict) -> None:
    """Append one JSON line to RUN/metrics.jsonl (steps and evaluations; a resumed run appends again)."""
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps(entry, ensure_ascii=False) + "\n")


class StepLog:
    """The steps trained since the last flush, and where they are written. Every rank takes part in a flush (its
    losses are averaged over the ranks); rank 0 alone writes."""

    def __init__(self, run: Path, total_steps: int, first_step: int, log_every: int, flops: StepFlops | None,
                 accelerator, device, on_gpu: bool, progress):
        from torch.utils.tensorboard import SummaryWriter
        self.run, self.total_steps, self.first_step, self.log_every = run, total_steps, first_step, log_every
        self.flops, self.peak = flops, peak_flops(gpu_name(on_gpu))
        self.accelerator, self.device, self.on_gpu, self.progress = accelerator, device, on_gpu, progress
        self.world = dist.get_world_size()
        self.writer = SummaryWriter(str(run / "tb")) if dist.get_rank() == 0 else None
        self.pending: list[StepRecord] = []
        self.started = self.flushed_at = time.perf_counter()

    def add(self, record_: StepRecord) -> None:
        self.pending.append(record_)
        self.progress.update(1)

    def flush(self) -> None:
        """Write the steps since the last flush: metrics.jsonl, TensorBoard, the progress bar and (rank 0) the log
        line. Their losses stayed on the device until now: the one host sync of a logging interval, whose wall time
        is shared out evenly among its steps (a GPU step's own host time says nothing while kernels queue)."""
        if not self.pending:
            return
        rows = torch.stack([torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device)
                                         for v in r.device_values()]) for r in self.pending])
        dist.all_reduce(rows)
        now = time.perf_counter()
        seconds, self.flushed_at = now - self.flushed_at, now
        for record_, row in zip(self.pending, (rows / self.world).tolist()):
            self.write_step(record_, row, seconds / len(self.pending))
        self.progress.set_postfix(loss=f"{row[0]:.3f}", kd=f"{row[1]:.3f}", ce=f"{row[2]:.3f}")
        self.pending = []

    def write_step(self, r: StepRecord, row: list[float], seconds: float) -> None:
        world, peak = self.world, self.peak
        total, kd, ce, target, source, teacher, padded = row[:3] + [c * world for c in row[3:]]
        if not self.writer:
            return
        ms = r.timer.ms()
        tokens_per_s = (target + source) / seconds
        flops_per_s = self.flops(teacher, source, target) / seconds if self.flops else 0.0
        record(self.run, {"step": r.step, "loss": total, "kd": kd, "ce": ce, "lr": r.lr, "tokens_per_s": tokens_per_s,
                          "tflops": flops_per_s / 1e12, **({"on_policy": True} if r.on_policy else {}),
                          **({"skipped": r.skipped} if r.skipped else {})})
        scalars = [("loss/total", total), ("loss/kd", kd), ("loss/ce", ce), ("lr", r.lr),
                   ("grad_norm", float(r.grad_norm or 0.0)), ("throughput/tokens_per_s", tokens_per_s),
                   ("throughput/teacher_tokens_per_s", teacher / seconds),
                   ("data/padding_fraction", 1 - (target + source) / max(padded, 1)),
                   ("time/teacher_ms", ms["teacher"]), ("time/student_ms", ms["student"]),
                   ("memory/max_allocated_gb", max_memory_gb(self.accelerator, self.on_gpu)),
                   ("faults/skipped_steps", r.skipped_total)]
        if self.flops:
            scalars.append(("throughput/tflops_per_gpu", flops_per_s / world / 1e12))
            if peak:
                scalars.append(("throughput/mfu", flops_per_s / world / peak))
        for name, value in scalars:
            if math.isfinite(value):
                self.writer.add_scalar(name, value, r.step)
        if r.step % self.log_every == 0 or r.step == 1:
            eta = (time.perf_counter() - self.started) / (r.step - self.first_step) * (self.total_steps - r.step)
            log.info("step %d/%d | epoch %d | loss %.4f kd %.4f ce %.4f | lr %.2e | %.0f tok/s %s| "
                     "teacher %.0f ms student %.0f ms | eta %.0f s", r.step, self.total_steps, r.epoch, total, kd, ce,
                     r.lr, tokens_per_s, f"MFU {flops_per_s / world / peak:.1%} " if peak and self.flops else "",
                     ms["teacher"], ms["student"], eta)

    def write_eval(self, step: int, result: dict, entry: dict, improved: bool) -> None:
        """An evaluation's line in metrics.jsonl, its TensorBoard scalars and (rank 0) its log line."""
        if not self.writer:
            return
        record(self.run, {"eval": True, **entry})
        for name in ("loss", "kd", "ce", "bleu", "chrf"):
            self.writer.add_scalar(f"eval/{name}", result[name], step)
        for direction, s in result["directions"].items():
            self.writer.add_scalar(f"eval/bleu_{direction}", s["bleu"], step)
        log.info("eval step %d | loss %.4f | BLEU %.2f chrF %.2f %s| e.g. %s", step, result["loss"],
                 result["bleu"], result["chrf"], "(best) " if improved else "", result["examples"][:1])

    def close(self) -> None:
        self.progress.close()
        if self.writer:
            self.writer.close()
