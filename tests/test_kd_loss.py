"""kd_loss.py: every divergence against a plain float64 reference, and the fused, chunked loss against the
plain loss in value and gradients (float32 and bf16), on CPU."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from config import DistillConfig
from data import IGNORE_INDEX
from kd_loss import KINDS, chunk_size, fused_distill_loss, plain_distill_loss

VOCAB, STUDENT_WIDTH, TEACHER_WIDTH = 50, 16, 24


def reference_divergence(s: torch.Tensor, t: torch.Tensor, cfg: DistillConfig) -> torch.Tensor:
    """Per-token divergence written from the definitions with probabilities (not log-space tricks)."""
    p, q = t.exp(), s.exp()

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if cfg.kd_loss == "forward_kl":
        return kl(p, q)
    if cfg.kd_loss == "reverse_kl":
        return kl(q, p)
    if cfg.kd_loss == "jsd":
        m = cfg.beta * p + (1 - cfg.beta) * q
        return cfg.beta * kl(p, m) + (1 - cfg.beta) * kl(q, m)
    if cfg.kd_loss == "skew_forward_kl":
        return kl(p, cfg.skew * p + (1 - cfg.skew) * q)
    if cfg.kd_loss == "skew_reverse_kl":
        return kl(q, cfg.skew * q + (1 - cfg.skew) * p)
    return 0.5 * (p - q).abs().sum(-1)


def reference_loss(student_logits, teacher_logits, labels, cfg: DistillConfig) -> torch.Tensor:
    keep = labels != IGNORE_INDEX
    s = F.log_softmax(student_logits[keep].double() / cfg.temperature, -1)
    t = F.log_softmax(teacher_logits[keep].double() / cfg.temperature, -1)
    ce = F.cross_entropy(student_logits[keep].double(), labels[keep])
    return cfg.alpha * cfg.temperature ** 2 * reference_divergence(s, t, cfg).mean() + (1 - cfg.alpha) * ce


def make_inputs(dtype=torch.float32):
    """Hidden states and output weights of both models, with some ignored positions."""
    gen = torch.Generator().manual_seed(0)
    s_hidden = torch.randn(3, 7, STUDENT_WIDTH, generator=gen).to(dtype).requires_grad_()
    s_weight = (torch.randn(VOCAB, STUDENT_WIDTH, generator=gen) * 0.5).to(dtype).requires_grad_()
    t_hidden = torch.randn(3, 7, TEACHER_WIDTH, generator=gen).to(dtype)
    t_weight = (torch.randn(VOCAB, TEACHER_WIDTH, generator=gen) * 0.5).to(dtype)
    labels = torch.randint(0, VOCAB, (3, 7), generator=gen)
    labels[0, 4:] = IGNORE_INDEX
    labels[2, 1:] = IGNORE_INDEX
    return s_hidden, s_weight, t_hidden, t_weight, labels


def config(kind: str, chunk: int = 0) -> DistillConfig:
    return DistillConfig(kd_loss=kind, alpha=0.7, temperature=2.0, beta=0.3, skew=0.2, chunk_tokens=chunk)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk", [1, 4, 0])
def test_fused_loss_matches_the_reference_in_value_and_gradients(kind, chunk):
    s_hidden, s_weight, t_hidden, t_weight, labels = make_inputs()
    cfg = config(kind, chunk)
    parts = fused_distill_loss(s_hidden, s_weight, t_hidden, t_weight, labels, cfg)
    expected = reference_loss(s_hidden @ s_weight.T, t_hidden @ t_weight.T, labels, cfg)
    assert abs(parts.total.item() - expected.item()) < 1e-5
    assert parts.tokens == int((labels != IGNORE_INDEX).sum())
    grads = torch.autograd.grad(parts.total, (s_hidden, s_weight))
    expected_grads = torch.autograd.grad(expected, (s_hidden, s_weight))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-4)


# tvd is left out: its gradient is sign(p - q), which flips where bf16 rounding moves p past q
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl"])
def test_fused_loss_in_bf16_is_within_one_percent(kind):
    cfg = config(kind, chunk=5)
    bf16 = make_inputs(torch.bfloat16)
    parts = fused_distill_loss(*bf16, cfg)
    grads = torch.autograd.grad(parts.total, bf16[:2])
    fp32 = [t.detach().float().requires_grad_(t.requires_grad) for t in bf16[:4]] + [bf16[4]]
    expected = reference_loss(fp32[0] @ fp32[1].T, fp32[2] @ fp32[3].T, fp32[4], cfg)
    expected_grads = torch.autograd.grad(expected, fp32[:2])
    assert abs(parts.total.item() - expected.item()) <= 1e-2 * abs(expected.item())
    for got, want in zip(grads, expected_grads):
        assert got.dtype == torch.bfloat16
        assert (got.float() - want).norm() <= 1e-2 * want.norm()


def test_target_positions_from_the_host_select_what_the_mask_selects():
    """data.ExampleBuilder.collate's target_positions (no host sync on a GPU) give the loss and gradients the mask
    gives."""
    s_hidden, s_weight, t_hidden, t_weight, labels = make_inputs()
    positions = torch.tensor([i for i, label in enumerate(labels.flatten().tolist()) if label != IGNORE_INDEX])
    cfg = config("forward_kl", chunk=4)
    masked = fused_distill_loss(s_hidden, s_weight, t_hidden, t_weight, labels, cfg)
    given = fused_distill_loss(s_hidden, s_weight, t_hidden, t_weight, labels, cfg, target_positions=positions)
    assert given.tokens == masked.tokens == len(positions) and torch.equal(given.total, masked.total)
    for a, b in zip(torch.autograd.grad(given.total, (s_hidden, s_weight)),
                    torch.autograd.grad(masked.total, (s_hidden, s_weight))):
        assert torch.equal(a, b)


def test_plain_loss_equals_fused_loss():
    s_hidden, s_weight, t_hidden, t_weight, labels = make_inputs()
    cfg = config("skew_reverse_kl", chunk=3)
    fused = fused_distill_loss(s_hidden, s_weight, t_hidden, t_weight, labels, cfg)
    plain = plain_distill_loss(s_hidden @ s_weight.T, t_hidden @ t_weight.T, labels, cfg)
    for a, b in ((fused.total, plain.total), (fused.kd, plain.kd), (fused.ce, plain.ce)):
        assert abs(a.item() - b.item()) < 1e-5


def test_limits_of_the_mixed_divergences_are_the_kls():
    inputs = make_inputs()
    kd = {kind: fused_distill_loss(*inputs, config(kind)).kd for kind in ("forward_kl", "reverse_kl")}
    for kind, field, value, expected in (("jsd", "beta", 0.0, "forward_kl"), ("jsd", "beta", 1.0, "reverse_kl"),
                                         ("skew_forward_kl", "skew", 0.0, "forward_kl"),
                                         ("skew_reverse_kl", "skew", 0.0, "reverse_kl")):
        cfg = dataclasses.replace(config(kind), **{field: value})
        assert fused_distill_loss(*inputs, cfg).kd == kd[expected], (kind, field, value)


@pytest.mark.parametrize("kind", KINDS)
def test_identical_distributions_give_zero_divergence(kind):
    s_hidden, s_weight, _, _, labels = make_inputs()
    parts = fused_distill_loss(s_hidden, s_weight, s_hidden.detach(), s_weight.detach(), labels, config(kind))
    assert abs(parts.kd.item()) < 1e-6


def test_no_target_tokens_is_a_zero_loss_with_a_gradient_path():
    s_hidden, s_weight, t_hidden, t_weight, labels = make_inputs()
    parts = fused_distill_loss(s_hidden, s_weight, t_hidden, t_weight, torch.full_like(labels, IGNORE_INDEX),
                               config("forward_kl"))
    assert parts.total.item() == 0.0 and parts.tokens == 0
    parts.total.backward()
    assert s_hidden.grad is not None and not s_hidden.grad.any()
    assert s_weight.grad is not None and not s_weight.grad.any()


def test_evaluation_under_no_grad_gives_the_same_value():
    inputs = make_inputs()
    trained = fused_distill_loss(*inputs, config("jsd", chunk=2))
    with torch.no_grad():
        evaluated = fused_distill_loss(*inputs, config("jsd", chunk=2))
    assert evaluated.total.item() == pytest.approx(trained.total.item(), abs=1e-7)
    assert not evaluated.total.requires_grad


def test_mismatched_vocabularies_are_refused():
    s_hidden, s_weight, t_hidden, t_weight, labels = make_inputs()
    with pytest.raises(ValueError, match="student's vocabulary"):
        fused_distill_loss(s_hidden, s_weight, t_hidden, t_weight[:40], labels, config("forward_kl"))


def test_auto_chunk_size_shrinks_with_the_vocabulary():
    cfg = config("forward_kl")
    assert chunk_size(cfg, 8000) > chunk_size(cfg, 151936) >= 1
    assert chunk_size(dataclasses.replace(cfg, chunk_tokens=64), 151936) == 64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak memory is read from the CUDA allocator")
def test_peak_memory_follows_the_chunk_not_the_tokens():
    """At one chunk size (auto: ~55 tokens at this vocabulary), 4x the tokens adds only the inputs' own
    gradient, never [tokens, vocab] logits."""
    vocab, width = 151936, 512
    cfg = DistillConfig(kd_loss="forward_kl", alpha=0.5, temperature=1.0)
    weight = (torch.randn(vocab, width, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    t_weight = torch.randn(vocab, width, device="cuda", dtype=torch.bfloat16) * 0.02
    extra = {}
    for tokens in (2048, 8192):
        hidden = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        t_hidden = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
        labels = torch.randint(0, vocab, (tokens,), device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fused_distill_loss(hidden, weight, t_hidden, t_weight, labels, cfg).total.backward()
        torch.cuda.synchronize()
        extra[tokens] = torch.cuda.max_memory_allocated() - base
        weight.grad = None
    grad_growth = (8192 - 2048) * width * 2 * 2  # grad of the hidden states, saved and returned (bf16)
    assert extra[8192] - extra[2048] <= grad_growth + 2 ** 20
    assert extra[8192] < 2 ** 30  # the bound at 8,192 tokens
