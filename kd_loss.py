"""Distillation losses, fused with both models' output layers and computed chunk by chunk over tokens.

The teacher's and the student's next-token distributions both live on the student's trimmed vocabulary of
K ids: the teacher's output-layer rows for the kept ids are gathered once at start-up (teacher.split_teacher_head), so
neither model's logits are ever computed over the full 151,936-id vocabulary.

    loss = alpha * T^2 * D(teacher_T, student_T) + (1 - alpha) * CE(student, labels)

over target positions only (labels != -100). D, with p the teacher's and q the student's softened
distribution (`--kd_loss`):

    forward_kl       KL(p || q)                                 mode-covering, the classic choice
    reverse_kl       KL(q || p)                                 mode-seeking
    jsd              beta KL(p || m) + (1-beta) KL(q || m),     m = beta p + (1-beta) q (TRL's GKD; beta 0 is
                                                                forward KL, 1 reverse KL)
    skew_forward_kl  KL(p || skew p + (1-skew) q)               DistiLLM's SKL: bounded where q has no mass
    skew_reverse_kl  KL(q || skew q + (1-skew) p)               DistiLLM's SRKL
    tvd              1/2 sum |p - q|                            total variation

`fused_distill_loss` takes hidden states and output weights instead of logits. For each chunk of tokens it
builds both models' logits, the loss and the loss's gradient with respect to the student's hidden states and
output weights, then drops the chunk: peak extra memory follows the chunk size, not the number of tokens,
and backward only scales the stored gradients (no second pass). The chunk loop runs no collective, so
ranks with different numbers of chunks cannot hang ZeRO-3: the student's output weight arrives gathered
(the module that owns it calls this function) and the teacher's rows are a plain tensor on every rank.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from config import DistillConfig
from data import IGNORE_INDEX

KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
CHUNK_BUDGET_BYTES = 256 * 2 ** 20  # float32 working set of one chunk's logits (both models, grads included)
LOGIT_COPIES = 8                    # [C, K] float32 tensors alive at once inside a chunk (measured peak)


class LossParts(NamedTuple):
    """A named tuple, so ZeRO-3 hooks the tensors inside when a module returns it (it skips other objects)."""
    total: torch.Tensor  # what backward() sees
    kd: torch.Tensor     # divergence per target token (before alpha and T^2), detached
    ce: torch.Tensor     # cross-entropy per target token, detached
    tokens: int          # target tokens counted


def _mix(logp_a: torch.Tensor, logp_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b) from log-probabilities, stably."""
    return torch.logaddexp(logp_a + math.log(weight_a), logp_b + math.log1p(-weight_a))


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    return (logp.exp() * (logp - logq)).sum(-1)


def divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, kind: str, beta: float = 0.5,
               skew: float = 0.1) -> torch.Tensor:
    """Per-token divergence [N] between log-distributions [N, K] (see the module docstring)."""
    if kind == "forward_kl" or (kind == "jsd" and beta <= 0.0) or (kind == "skew_forward_kl" and skew <= 0.0):
        return _kl(teacher_logp, student_logp)
    if kind == "reverse_kl" or (kind == "jsd" and beta >= 1.0) or (kind == "skew_reverse_kl" and skew <= 0.0):
        return _kl(student_logp, teacher_logp)
    if kind == "jsd":
        mixture = _mix(teacher_logp, student_logp, beta)
        return beta * _kl(teacher_logp, mixture) + (1 - beta) * _kl(student_logp, mixture)
    if kind == "skew_forward_kl":
        return _kl(teacher_logp, _mix(teacher_logp, student_logp, skew))
    if kind == "skew_reverse_kl":
        return _kl(student_logp, _mix(student_logp, teacher_logp, skew))
    if kind == "tvd":
        return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)
    raise ValueError(f"unknown kd_loss {kind!r}; choose one of {', '.join(KINDS)}")


def _chunk_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                cfg: DistillConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed divergence and cross-entropy over one chunk of target tokens (float32)."""
    temperature = cfg.temperature
    kd = divergence(F.log_softmax(student_logits / temperature, -1),
                    F.log_softmax(teacher_logits / temperature, -1), cfg.kd_loss, cfg.beta, cfg.skew).sum()
    ce = F.cross_entropy(student_logits, targets, reduction="sum")
    return kd, ce


def chunk_size(cfg: DistillConfig, vocab: int) -> int:
    """Tokens per chunk: cfg.chunk_tokens, or (0) as many as fit CHUNK_BUDGET_BYTES at this vocabulary."""
    return cfg.chunk_tokens or max(1, CHUNK_BUDGET_BYTES // (LOGIT_COPIES * 4 * vocab))


class _FusedDistill(torch.autograd.Function):
    """Loss and its gradients in one pass over chunks; backward scales what forward stored."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, targets, cfg):
        tokens = student_hidden.shape[0]
        kd_scale, ce_scale = cfg.alpha * cfg.temperature ** 2 / tokens, (1 - cfg.alpha) / tokens
        trained = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]  # False in evaluation (no_grad)
        grad_hidden = torch.empty_like(student_hidden)
        grad_weight = torch.zeros(student_weight.shape if trained else (0,), dtype=torch.float32,
                                  device=student_weight.device)
        kd_sum = ce_sum = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
        step = chunk_size(cfg, student_weight.shape[0])
        for start in range(0, tokens, step):
            piece = slice(start, start + step)
            hidden = student_hidden[piece]
            teacher_logits = (teacher_hidden[piece] @ teacher_weight.T).float()
            with torch.enable_grad():
                logits = (hidden @ student_weight.T).float().requires_grad_(trained)
                kd, ce = _chunk_sums(logits, teacher_logits, targets[piece], cfg)
                if trained:
                    (grad_logits,) = torch.autograd.grad(kd_scale * kd + ce_scale * ce, logits)
            if trained:
                grad_logits = grad_logits.to(hidden.dtype)
                grad_hidden[piece] = grad_logits @ student_weight
                grad_weight += grad_logits.T @ hidden
            kd_sum, ce_sum = kd_sum + kd.detach(), ce_sum + ce.detach()
        ctx.save_for_backward(grad_hidden, grad_weight.to(student_weight.dtype))
        total = kd_scale * kd_sum + ce_scale * ce_sum
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return total, kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_total, _grad_kd, _grad_ce):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), grad_weight * grad_total.to(grad_weight.dtype), \
            None, None, None, None


def _target_rows(labels: torch.Tensor, *tensors: torch.Tensor,
                 positions: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The target positions' labels and rows. positions (flat indices of the targets, made on the host by
    data.ExampleBuilder.collate) select them without a host sync; a boolean mask would wait for the GPU to count
    them."""
    if positions is None:
        positions = (labels.reshape(-1) != IGNORE_INDEX).nonzero()[:, 0]
    return (labels.reshape(-1).index_select(0, positions),
            *(t.reshape(-1, t.shape[-1]).index_select(0, positions) for t in tensors))


def fused_distill_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                       teacher_weight: torch.Tensor, labels: torch.Tensor, cfg: DistillConfig,
                       target_positions: torch.Tensor | None = None) -> LossParts:
    """student_hidden [..., Hs] and student_weight [K, Hs]; teacher_hidden [..., Ht] at the same positions and
    teacher_weight [K, Ht] (its output rows for the student's K ids); labels [...] with IGNORE_INDEX;
    target_positions: the flat indices of labels that are not IGNORE_INDEX, when known (no host sync).

    A batch without target tokens gives a zero loss that still reaches the student's tensors, so every
    rank runs the same backward.
    """
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student output layer has {student_weight.shape[0]} rows, teacher rows "
                         f"{teacher_weight.shape[0]}: both must be on the student's vocabulary")
    if student_hidden.shape[:-1] != labels.shape or teacher_hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden states {tuple(student_hidden.shape)} / {tuple(teacher_hidden.shape)} do not "
                         f"match labels {tuple(labels.shape)}")
    targets, s_hidden, t_hidden = _target_rows(labels, student_hidden, teacher_hidden.detach(),
                                               positions=target_positions)
    if targets.numel() == 0:
        zero = student_hidden.sum() * 0.0 + student_weight.sum() * 0.0
        return LossParts(zero, zero.detach(), zero.detach(), 0)
    total, kd_sum, ce_sum = _FusedDistill.apply(s_hidden, student_weight, t_hidden, teacher_weight.detach(),
                                                targets, cfg)
    tokens = int(targets.numel())
    return LossParts(total, kd_sum / tokens, ce_sum / tokens, tokens)


def plain_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                       cfg: DistillConfig) -> LossParts:
    """The same loss from full logits [..., K] in one piece: the baseline bench/kd_loss.py compares against."""
    targets, student, teacher = _target_rows(labels, student_logits, teacher_logits.detach())
    tokens = max(int(targets.numel()), 1)
    kd, ce = _chunk_sums(student.float(), teacher.float(), targets, cfg)
    total = cfg.alpha * cfg.temperature ** 2 * kd / tokens + (1 - cfg.alpha) * ce / tokens
    return LossParts(total, kd.detach() / tokens, ce.detach() / tokens, int(targets.numel()))
