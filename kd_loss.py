"""Distillation losses between the teacher's and the student's next-token distributions.

Both distributions live on the student's trimmed vocabulary: the teacher's logits are restricted to the
kept ids before they reach here and renormalised by the softmax below. Everything is computed in float32
over target positions only (labels != -100), chunk by chunk over tokens so that the float32 copies of
both models' logits never exist for the whole batch at once.

    loss = alpha * T^2 * D(teacher_T, student_T) + (1 - alpha) * CE(student, labels)

D is forward KL(teacher || student), reverse KL(student || teacher), or the generalised JSD with mixture
weight beta (beta -> 0 approaches forward KL, beta -> 1 reverse KL), as in TRL's GKD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
KINDS = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class LossParts:
    total: torch.Tensor  # what backward() sees
    kd: torch.Tensor     # divergence per target token (before alpha and T^2), detached
    ce: torch.Tensor     # cross-entropy per target token, detached
    tokens: int          # target tokens counted


def divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """Per-token divergence [N] between log-distributions [N, V]."""
    if kind == "forward_kl":
        return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    if kind == "reverse_kl":
        return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)
    if kind == "jsd":
        if beta <= 0.0:
            return divergence(student_logp, teacher_logp, "forward_kl", beta)
        if beta >= 1.0:
            return divergence(student_logp, teacher_logp, "reverse_kl", beta)
        mixture = torch.logsumexp(torch.stack([student_logp + math.log(beta),
                                               teacher_logp + math.log(1 - beta)]), dim=0)
        to_teacher = (teacher_logp.exp() * (teacher_logp - mixture)).sum(-1)
        to_student = (student_logp.exp() * (student_logp - mixture)).sum(-1)
        return beta * to_teacher + (1 - beta) * to_student
    raise ValueError(f"unknown kd_loss {kind!r}; choose one of {', '.join(KINDS)}")


def _chunk_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, kind: str,
                temperature: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    student = student_logits.float()
    kd = divergence(F.log_softmax(student / temperature, -1),
                    F.log_softmax(teacher_logits.float() / temperature, -1), kind, beta).sum()
    ce = F.cross_entropy(student, labels, reduction="sum")
    return kd, ce


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, kind: str,
                 alpha: float, temperature: float, beta: float = 0.5, chunk_tokens: int = 4096) -> LossParts:
    """student_logits/teacher_logits [..., V] (same V, same positions), labels [...] with IGNORE_INDEX.

    Chunks are recomputed in backward (activation checkpointing), so peak extra memory follows
    chunk_tokens, not the number of tokens. A batch without target tokens gives a zero loss that still
    depends on the student's logits, so every rank runs the same backward.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: both must be on the student's vocabulary")
    vocab = student_logits.shape[-1]
    keep = labels.reshape(-1) != IGNORE_INDEX
    student = student_logits.reshape(-1, vocab)[keep]
    teacher = teacher_logits.reshape(-1, vocab)[keep].detach()
    targets = labels.reshape(-1)[keep]
    tokens = int(targets.numel())
    if tokens == 0:
        zero = student_logits.sum() * 0.0
        return LossParts(zero, zero.detach(), zero.detach(), 0)
    kd_sum = ce_sum = student.new_zeros((), dtype=torch.float32)
    for start in range(0, tokens, chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        args = (student[piece], teacher[piece], targets[piece], kind, temperature, beta)
        kd, ce = (torch.utils.checkpoint.checkpoint(_chunk_sums, *args, use_reentrant=False)
                  if student.requires_grad else _chunk_sums(*args))
        kd_sum, ce_sum = kd_sum + kd, ce_sum + ce
    kd_mean, ce_mean = kd_sum / tokens, ce_sum / tokens
    total = alpha * temperature ** 2 * kd_mean + (1 - alpha) * ce_mean
    return LossParts(total, kd_mean.detach(), ce_mean.detach(), tokens)
