import pytest
import torch
import torch.nn.functional as F

from kd_loss import IGNORE_INDEX, distill_loss


def reference(student, teacher, labels, kind, alpha, temperature, beta):
    """Plain, unchunked: per-token divergence with torch's own kl_div, averaged over target tokens."""
    keep = labels != IGNORE_INDEX
    s = F.log_softmax(student[keep].double() / temperature, -1)
    t = F.log_softmax(teacher[keep].double() / temperature, -1)
    if kind == "forward_kl":
        kd = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    elif kind == "reverse_kl":
        kd = F.kl_div(t, s, log_target=True, reduction="none").sum(-1)
    else:
        m = (beta * s.exp() + (1 - beta) * t.exp()).log()
        kd = beta * F.kl_div(m, t, log_target=True, reduction="none").sum(-1) + \
            (1 - beta) * F.kl_div(m, s, log_target=True, reduction="none").sum(-1)
    ce = F.cross_entropy(student[keep].double(), labels[keep])
    return alpha * temperature ** 2 * kd.mean() + (1 - alpha) * ce


def inputs():
    torch.manual_seed(0)
    student = torch.randn(3, 7, 50, requires_grad=True)
    teacher = torch.randn(3, 7, 50) * 2
    labels = torch.randint(0, 50, (3, 7))
    labels[0, 4:] = IGNORE_INDEX
    labels[2, 1:] = IGNORE_INDEX
    return student, teacher, labels


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("chunk", [1, 4, 4096])
def test_matches_plain_reference_in_value_and_gradient(kind, chunk):
    student, teacher, labels = inputs()
    parts = distill_loss(student, teacher, labels, kind, alpha=0.7, temperature=2.0, beta=0.3, chunk_tokens=chunk)
    expected = reference(student, teacher, labels, kind, 0.7, 2.0, 0.3)
    assert abs(parts.total.item() - expected.item()) < 1e-5
    assert parts.tokens == int((labels != IGNORE_INDEX).sum())
    (grad,) = torch.autograd.grad(parts.total, student)
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad, expected_grad.float(), atol=1e-5, rtol=1e-4)


def test_jsd_limits_are_the_kls():
    student, teacher, labels = inputs()
    fkl = distill_loss(student, teacher, labels, "forward_kl", 1.0, 1.0).kd
    rkl = distill_loss(student, teacher, labels, "reverse_kl", 1.0, 1.0).kd
    assert distill_loss(student, teacher, labels, "jsd", 1.0, 1.0, beta=0.0).kd == fkl
    assert distill_loss(student, teacher, labels, "jsd", 1.0, 1.0, beta=1.0).kd == rkl


def test_identical_distributions_give_zero_kd():
    student, _, labels = inputs()
    parts = distill_loss(student, student.detach().clone(), labels, "forward_kl", 0.5, 2.0)
    assert abs(parts.kd.item()) < 1e-6


def test_no_target_tokens_is_a_zero_loss_with_a_gradient_path():
    student, teacher, labels = inputs()
    parts = distill_loss(student, teacher, torch.full_like(labels, IGNORE_INDEX), "forward_kl", 0.5, 2.0)
    assert parts.total.item() == 0.0 and parts.tokens == 0
    parts.total.backward()
    assert student.grad is not None and not student.grad.any()


def test_mismatched_vocabularies_are_refused():
    student, teacher, labels = inputs()
    with pytest.raises(ValueError, match="student's vocabulary"):
        distill_loss(student, teacher[..., :40], labels, "forward_kl", 0.5, 2.0)
