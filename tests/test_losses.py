"""The distillation losses against autograd and against their closed forms (vitshrink/losses.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitshrink.distill import losses


def _grad_of_kd(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float) -> torch.Tensor:
    z_s = z_s.clone().requires_grad_(True)
    # kd_kl is a batch mean; times B it is the per-sample sum, whose gradient is per sample.
    (losses.kd_kl(z_s, z_t, temperature) * z_s.shape[0]).backward()
    return z_s.grad


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0, 4.0, 20.0])
def test_kd_gradient_is_T_times_softmax_difference(temperature):
    torch.manual_seed(0)
    z_s, z_t = torch.randn(6, 10, dtype=torch.float64) * 3, torch.randn(6, 10, dtype=torch.float64) * 3
    grad = _grad_of_kd(z_s.float(), z_t.float(), temperature)
    # Our convention: loss = T^2 * KL(p_t(T) || p_s(T)); per sample d/dz_s_j = T * (p_s_j(T) - p_t_j(T)).
    expected = temperature * (F.softmax(z_s / temperature, -1) - F.softmax(z_t / temperature, -1))
    torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-6)


def test_kd_gradient_tends_to_logit_matching_for_large_T():
    torch.manual_seed(1)
    k = 10
    z_s, z_t = torch.randn(4, k, dtype=torch.float64), torch.randn(4, k, dtype=torch.float64)
    z_s, z_t = z_s - z_s.mean(-1, keepdim=True), z_t - z_t.mean(-1, keepdim=True)  # zero-mean logits
    limit = (z_s - z_t) / k
    zmax2 = float(torch.cat([z_s, z_t]).abs().max() ** 2)
    errors = []
    for temperature in (100.0, 1000.0):
        z = z_s.clone().requires_grad_(True)
        (losses.kd_kl(z, z_t, temperature) * z.shape[0]).backward()  # float64 throughout: no rounding floor
        error = float((z.grad - limit).abs().max())
        # Expanding softmax(z/T) = (1/K)(1 + z/T + (z^2 - mean z^2)/(2T^2) + O(T^-3)) for zero-mean z gives
        # T(p_s - p_t) = (z_s - z_t)/K + [(z_s^2 - mean z_s^2) - (z_t^2 - mean z_t^2)]/(2KT) + O(T^-2):
        # the error is at most max|z|^2 / (K T) to first order; allow 10% for the O(T^-2) rest.
        assert error <= 1.1 * zmax2 / (k * temperature), (temperature, error)
        errors.append(error)
    # And it shrinks like 1/T: ten times larger T, about ten times smaller error.
    assert 7 < errors[0] / errors[1] < 13


def test_kd_kl_zero_for_identical_logits_and_positive_otherwise():
    z = torch.randn(5, 7)
    assert float(losses.kd_kl(z, z, 4.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.kd_kl(z, torch.randn(5, 7), 4.0)) > 0
    with pytest.raises(ValueError):
        losses.kd_kl(z, z, 0.0)


def test_cross_entropy_label_smoothing_matches_definition():
    torch.manual_seed(2)
    logits, target, eps, k = torch.randn(8, 5), torch.randint(0, 5, (8,)), 0.1, 5
    log_p = F.log_softmax(logits, -1)
    smoothed = torch.full((8, k), eps / k).scatter_add_(1, target[:, None], torch.full((8, 1), 1 - eps))
    expected = -(smoothed * log_p).sum(-1).mean()
    torch.testing.assert_close(losses.cross_entropy(logits, target, eps), expected)


def test_mse_and_cosine():
    a = torch.tensor([[1.0, 2.0, 3.0]])
    assert float(losses.logit_mse(a, a + 2)) == pytest.approx(4.0)
    assert float(losses.cosine_loss(a, 3 * a)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.cosine_loss(a, -a)) == pytest.approx(2.0)
    assert float(losses.cosine_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))) == pytest.approx(1.0)


def test_kd_loss_is_the_convex_combination():
    torch.manual_seed(3)
    s, t, y = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    for w in (0.0, 0.3, 0.9, 1.0):
        out = losses.kd_loss(s, t, y, kd_weight=w, temperature=4.0)
        expected = (1 - w) * F.cross_entropy(s, y) + w * losses.kd_kl(s, t, 4.0)
        torch.testing.assert_close(out["loss"], expected)
    # kd_weight 1 never reads the labels (label-free distillation).
    out = losses.kd_loss(s, t, None, kd_weight=1.0, temperature=2.0)
    torch.testing.assert_close(out["loss"], losses.kd_kl(s, t, 2.0))
    with pytest.raises(ValueError):
        losses.kd_loss(s, t, None, kd_weight=0.5, temperature=2.0)
    with pytest.raises(ValueError):
        losses.kd_loss(s, t, y, kd_weight=1.5, temperature=2.0)


def test_kd_kl_agrees_with_timm_token_distillation_formula():
    # timm's TokenDistillationTask soft loss, written out: the same number as ours.
    s, t, temperature = torch.randn(4, 10), torch.randn(4, 10), 3.0
    timm_value = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                          reduction="batchmean", log_target=True) * temperature**2
    torch.testing.assert_close(losses.kd_kl(s, t, temperature), timm_value)
