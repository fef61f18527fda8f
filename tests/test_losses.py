"""Losses of a training step: label smoothing, mixup/hard scores, AlphaNet's adaptive alpha-divergence, teacher."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from evit.config import ConfigError, TeacherParams
from evit.errors import CheckpointError
from evit.train.losses import AdaptiveAlphaDivergence, _f_divergence, hard_ce, label_smoothed_ce, load_teacher, soft_ce
from evit.train.step import HardMixup



def test_label_smoothed_ce_matches_torch_and_soft_targets() -> None:
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g)
    assert torch.allclose(label_smoothed_ce(logits, y, 0.1), F.cross_entropy(logits, y, label_smoothing=0.1))
    onehot = F.one_hot(y, 5).float()
    assert torch.allclose(label_smoothed_ce(logits, onehot, 0.1), F.cross_entropy(logits, y))
    assert hard_ce(logits, y) == pytest.approx(float(F.cross_entropy(logits, y)))


def test_mixup_hard_target_gives_the_lambda_weighted_hard_ce() -> None:
    import numpy as np

    np.random.seed(3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 4, (6,), generator=g)
    mix = HardMixup(mixup_alpha=0.8, cutmix_alpha=0.0, prob=1.0, mode="batch", label_smoothing=0.1, num_classes=4)
    x0 = x.clone()
    xm, soft, hard = mix(x, y)
    # x is mixed in place as lam * x + (1 - lam) * x.flip(0): recover lam from the images
    lam = float((xm[0] - x0.flip(0)[0]).abs().sum() / (x0[0] - x0.flip(0)[0]).abs().sum())
    assert 0.0 < lam <= 1.0
    logits = torch.randn(6, 4, generator=g)
    ref = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y.flip(0))
    assert hard_ce(logits, hard) == pytest.approx(float(ref), rel=1e-5)
    assert torch.allclose(soft.sum(1), torch.ones(6)) and soft.min() > 0  # smoothed
    with pytest.raises(ValueError, match="even batch"):
        mix(x[:5], y[:5])


def _true_alpha_div(logits: torch.Tensor, p: torch.Tensor, alpha: float) -> torch.Tensor:
    q = torch.softmax(logits, 1)
    if abs(alpha - 1) < 1e-6:
        return (p * (p.log() - q.log())).sum(1)
    return ((q * ((p / q) ** alpha - 1)) / (alpha * (alpha - 1))).sum(1)


@pytest.mark.parametrize("alpha", [-1.0, 0.5, 1.0])
def test_alpha_divergence_surrogate_has_the_divergence_gradient(alpha: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, generator=g, dtype=torch.float64)
    p = torch.softmax(logits + 0.3 * torch.randn(4, 6, generator=g, dtype=torch.float64), 1)  # ratios well inside clip
    a = logits.clone().requires_grad_(True)
    div, sur = _f_divergence(a, p, alpha, clip=1e6)
    sur.sum().backward()
    b = logits.clone().requires_grad_(True)
    ref = _true_alpha_div(b, p, alpha)
    ref.sum().backward()
    assert torch.allclose(div.double(), ref.detach(), atol=1e-5)
    assert torch.allclose(a.grad.double(), b.grad, atol=1e-5)


def test_adaptive_alpha_divergence_keeps_the_larger_and_is_zero_at_the_target() -> None:
    kd = AdaptiveAlphaDivergence(-1.0, 1.0, 5.0)
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 7, generator=g)
    p = torch.softmax(torch.randn(5, 7, generator=g), 1)
    loss, value = kd(logits.clone().requires_grad_(True), p)
    d_lo, _ = _f_divergence(logits, p, -1.0, 5.0)
    d_hi, _ = _f_divergence(logits, p, 1.0, 5.0)
    assert float(value) == pytest.approx(float(torch.maximum(d_lo, d_hi).mean()), rel=1e-6)
    # at the target the divergence and its gradient vanish
    x = logits.clone().requires_grad_(True)
    loss0, value0 = kd(x, torch.softmax(logits, 1))
    loss0.backward()
    assert abs(float(value0)) < 1e-6 and float(x.grad.abs().max()) < 1e-6


def test_alpha_divergence_is_finite_with_zero_probabilities_and_extreme_ratios() -> None:
    kd = AdaptiveAlphaDivergence(-1.0, 1.0, 5.0)
    logits = torch.tensor([[30.0, -30.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    p = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, value = kd(logits, p)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(value) and torch.isfinite(logits.grad).all()


def test_soft_ce_against_teacher_probs() -> None:
    g = torch.Generator().manual_seed(4)
    logits, t = torch.randn(3, 4, generator=g), torch.softmax(torch.randn(3, 4, generator=g), 1)
    assert float(soft_ce(logits, t)) == pytest.approx(float(-(t * F.log_softmax(logits, 1)).sum(1).mean()))


def test_teacher_loads_local_timm_weights_and_rejects_bad_ones(tmp_path) -> None:
    import timm

    model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    weights = tmp_path / "teacher.pth"
    torch.save({"state_dict": model.state_dict()}, weights)
    teacher = load_teacher(TeacherParams(model="test_resnet", weights=str(weights), temperature=0.5), 10)
    x = torch.randn(2, 3, 32, 32)
    probs = teacher.probs(x)
    model.eval()
    with torch.no_grad():
        ref = torch.softmax(model(x) / 0.5, -1)
    assert torch.allclose(probs, ref, atol=1e-6)
    assert not teacher.train().training and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(CheckpointError, match="do not fit"):
        load_teacher(TeacherParams(model="test_resnet", weights=str(weights)), 7)
    with pytest.raises(ConfigError, match="does not exist"):
        load_teacher(TeacherParams(model="test_resnet", weights=str(tmp_path / "missing.pth")), 10)
    with pytest.raises(ConfigError, match="not a timm model"):
        load_teacher(TeacherParams(model="no_such_model_xyz", weights=str(weights)), 10)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_teacher(TeacherParams(model="test_resnet", weights=str(tmp_path / "junk.pth")), 10)


def test_teachers_are_averaged_and_a_class_mismatch_is_named(tmp_path) -> None:
    import timm

    from evit.train.losses import load_teachers

    a = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    b = timm.create_model("test_efficientnet", pretrained=False, num_classes=10)
    torch.save(a.state_dict(), tmp_path / "a.pth")
    torch.save(b.state_dict(), tmp_path / "b.pth")
    both = load_teachers([TeacherParams(model="test_resnet", weights=str(tmp_path / "a.pth"), temperature=0.2),
                          TeacherParams(model="test_efficientnet", weights=str(tmp_path / "b.pth"), temperature=2.0)],
                         10)
    x = torch.randn(2, 3, 32, 32)
    a.eval(), b.eval()
    with torch.no_grad():
        want = (torch.softmax(a(x) / 0.2, -1) + torch.softmax(b(x) / 2.0, -1)) / 2
    assert torch.allclose(both.probs(x), want, atol=1e-6)
    assert load_teachers([], 10) is None
    with pytest.raises(CheckpointError, match="predicts 10 classes, the data has 3"):
        load_teachers([TeacherParams(model="test_resnet", weights=str(tmp_path / "a.pth"))], 3)
    with pytest.raises(ConfigError, match=r"train.teachers\[1\].weights .* does not exist"):
        load_teachers([TeacherParams(model="test_resnet", weights=str(tmp_path / "a.pth")),
                       TeacherParams(model="test_resnet", weights=str(tmp_path / "nope.pth"))], 10)
