"""UVC's search holds on a hard teacher (issue 23): a bounded dual with an anti-windup reset, a scale-free loss, an
in-band stop and restarts on divergence, each checked against its formula, and the search itself run on a
deliberately hard tiny teacher (2 blocks, one head, briefly trained on real CIFAR-10 images)."""
from __future__ import annotations

import math

import pytest
import torch

from distill_support import eval_view_loader, train_hard_teacher
from vitshrink.prune.uvc_health import SearchWatch, dual_step
from vitshrink.prune.uvc_objective import TeacherScale, relative_kd_loss
from vitshrink.prune.uvc_search import UVCConfig, search_uvc

torch.set_num_threads(1)


@pytest.mark.parametrize("z,gap,kw,expected", [
    (0.0, 0.3, {}, 3.0),                                  # plain ascent: 0 + 10 * 0.3
    (2.0, 0.9, {}, 7.0),                                  # gap clipped to 0.5: 2 + 10 * 0.5
    (9.0, 0.4, {}, 10.0),                                 # bounded above at 10
    (4.0, -0.1, {}, -1.0),                                # R crossed the target: restart from 0, then 10 * -0.1
    (4.0, -0.1, {"reset_on_cross": False}, 3.0),          # UVC's integral keeps its wound-up value
    (-9.5, -0.3, {}, -10.0),                              # bounded below at -10 (two-sided)
    (0.5, -0.3, {"two_sided": False, "reset_on_cross": False}, 0.0),  # one-sided (UVC): clamped at 0
    (1.0, 0.2, {"bound": math.inf}, 3.0),                 # unbounded (the official objective)
])
def test_dual_step_follows_its_formula(z, gap, kw, expected):
    settings = {"lr": 10.0, "clip": 0.5, "bound": 10.0, **kw}
    got = dual_step(z, gap, **settings)
    # The formula: clamp(z0 + lr * clip(gap), lo, bound), z0 = 0 when z and gap disagree in sign (and reset is on).
    clipped = max(-0.5, min(0.5, gap))
    z0 = 0.0 if settings.get("reset_on_cross", True) and z * clipped < 0 else z
    low = -settings["bound"] if settings.get("two_sided", True) else 0.0
    assert got == pytest.approx(max(low, min(settings["bound"], z0 + settings["lr"] * clipped)), abs=1e-12)
    assert got == pytest.approx(expected, abs=1e-12)


def test_watch_stops_after_patience_steps_in_band_and_smooths_the_loss():
    watch = SearchWatch(target=0.5, tolerance=0.02, patience=4, loss_limit=1.0, runaway=0.2)  # window ceil(5)
    assert [watch.should_stop(r) for r in (0.49, 0.495, 0.51, 0.48, 0.5, 0.6, 0.485)] == [
        False, False, False, False, True, False, False]  # 4 of the last 5 at 0.5; 0.6 is out; then 3 of 5
    assert watch.divergence(0.9, 0.5) is None
    assert watch.divergence(1.4, 0.5) is None  # one spike: EMA 0.8 * 0.9 + 0.2 * 1.4 = 1.0, not above 1
    assert watch.loss_ema == pytest.approx(1.0)
    assert "above" in watch.divergence(1.2, 0.5)  # 0.8 * 1.0 + 0.2 * 1.2 = 1.04
    assert "ran below" in SearchWatch(0.5, 0.02, 3, 1.0, 0.2).divergence(0.1, 0.29)
    assert "above" in SearchWatch(0.5, 0.02, 3, 1.0, 0.2).divergence(float("nan"), 0.5)


def test_relative_kd_loss_is_scale_free_and_one_for_a_constant_guess():
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(16, 10, generator=gen, dtype=torch.float64) * 3
    student = teacher + torch.randn(16, 10, generator=gen, dtype=torch.float64)
    base = relative_kd_loss(student, teacher, TeacherScale.of(teacher))["loss"]
    for factor in (0.1, 7.0):  # a teacher with 70x larger logits gives the same search loss
        scaled = relative_kd_loss(student * factor, teacher * factor, TeacherScale.of(teacher * factor))["loss"]
        torch.testing.assert_close(scaled, base, rtol=1e-10, atol=0)
    scale = TeacherScale.of(teacher, temperature=2.0)
    uniform = relative_kd_loss(torch.zeros_like(teacher), teacher, scale)["loss"]
    torch.testing.assert_close(uniform, torch.tensor(1.0, dtype=torch.float64), rtol=1e-10, atol=0)
    # The formula: KL(p_t || p_s) at spread * T, divided by KL(p_t || uniform), the spread of centred logits.
    centred = teacher - teacher.mean(1, keepdim=True)
    t = float(centred.pow(2).mean().sqrt()) * 2.0
    p_t = torch.softmax(teacher / t, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(student / t, 1))).sum(1).mean()
    chance = (p_t * p_t.log()).sum(1).mean() + math.log(10)
    torch.testing.assert_close(relative_kd_loss(student, teacher, scale)["loss"], kl / chance, rtol=1e-10, atol=0)


@pytest.fixture(scope="module")
def hard_teacher():
    """2 blocks, ONE head of width 32, 16 px (16 patches of 4 px), one pass over 256 real images."""
    return train_hard_teacher(img_size=16, patch_size=4, n_train=256, batch=32)


@pytest.mark.parametrize("target", [0.5, 0.3])
def test_search_on_a_hard_teacher_ends_in_the_band_without_divergence(hard_teacher, target):
    torch.manual_seed(0)
    config = UVCConfig.for_objective("kd", flops_target=target, steps=200, log_every=0)  # default safeguards
    result = search_uvc(hard_teacher, eval_view_loader(hard_teacher, n=256, batch=16), config)
    health = result.health
    assert health["restarts"] == [], health["restarts"]  # never diverged
    assert health["decisions_in_band"], health["search_resource"]  # the search's own decisions, no greedy
    assert health["greedy_moves"] == 0 and not result.adjusted
    assert health["stopped_at"] is not None and health["stopped_at"] < 200  # stopped by the in-band rule
    trace = health["trace"]
    assert len(trace["resource"]) == len(trace["loss"]) == len(trace["z"]) == health["steps_run"]
    assert min(trace["resource"]) >= target - 0.2 and max(trace["loss"]) < 1.0
    assert max(abs(z) for z in trace["z"]) <= config.z_bound
    # Not the old runaway: at least 20 of the last 25 decisions sat in the band, the last one too.
    inside = [target - 0.02 - 1e-9 <= r <= target + 1e-9 for r in trace["decided"][-25:]]
    assert sum(inside) >= 20 and inside[-1]


def test_divergence_restores_the_snapshot_and_halves_the_steps(hard_teacher):
    torch.manual_seed(0)
    # A loss limit no search can keep under: every step diverges until the restarts are spent.
    config = UVCConfig.for_objective("kd", flops_target=0.5, steps=8, log_every=0, loss_limit=-1.0, max_restarts=2)
    result = search_uvc(hard_teacher, eval_view_loader(hard_teacher, n=64, batch=16), config)
    restarts = result.health["restarts"]
    assert [r["step"] for r in restarts] == [0, 1] and [r["rate_factor"] for r in restarts] == [0.5, 0.25]
    assert all(r["restored_step"] == 0 and "above" in r["reason"] for r in restarts)
    assert result.health["steps_run"] == 8  # after the last restart the search runs on
