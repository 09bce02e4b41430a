"""The ``probe`` recipe: the probe distillation loss against a hand computation, and label-free training."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from vitshrink.distill.attention_probe import probe_distillation_loss
from vitshrink.data import build_transform, make_loader, resolve_data
from vitshrink.errors import UserError
from vitshrink.io import create_model, data_config
from vitshrink.recipes import get_recipe, load_preset
from vitshrink.recipes.probe import ProbeTask, paired_blocks


def _hand_probe_loss(teacher_feats, student_feats):
    """The official formula written out with loops: L layers, B images, N tokens."""
    total, count = 0.0, 0
    for t, s in zip(teacher_feats, student_feats):
        b, n, _ = t.shape
        for i in range(b):
            tn = t[i] / t[i].norm(dim=0, keepdim=True)  # each channel normalised over the tokens
            sn = s[i] / s[i].norm(dim=0, keepdim=True)
            for j in range(1, n):
                diff = float(tn[0] @ tn[j]) - float(sn[0] @ sn[j])
                total += diff * diff
                count += 1
    return total / count


def test_probe_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(3, 5, 8, generator=g) for _ in range(3)]
    student = [torch.randn(3, 5, 4, generator=g) for _ in range(3)]  # narrower student: fine
    got = probe_distillation_loss(teacher, student)
    assert math.isclose(float(got), _hand_probe_loss(teacher, student), rel_tol=1e-5)
    assert float(probe_distillation_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-7)
    # Scaling a channel does not change the token-normalised similarity.
    scaled = [t * torch.linspace(0.5, 3.0, t.shape[-1]) for t in teacher]
    assert float(probe_distillation_loss(teacher, scaled)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        probe_distillation_loss(teacher, [torch.randn(3, 6, 4)] * 3)


def test_blocks_pair_by_relative_depth():
    assert paired_blocks(12, 12) == [(3, 3), (7, 7), (11, 11)]  # the official blocks
    assert paired_blocks(12, 6) == [(3, 1), (7, 3), (11, 5)]
    assert paired_blocks(4, 2) == [(0, 0), (2, 0), (3, 1)]


def _vit(depth: int, width: int = 48):
    return create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=width, depth=depth,
                        num_heads=3, num_classes=10)


@pytest.fixture(scope="module")
def batch():
    data = resolve_data()  # the bundled CIFAR-10 subset: real images
    data.train.transform = build_transform(data_config(_vit(1)), is_training=False)
    images, targets, _ = next(iter(make_loader(data.train, 16, shuffle=True, workers=0)))
    return images, targets


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core box, 1 thread trains much faster than 2 contending ones
    yield
    torch.set_num_threads(threads)


def test_task_ignores_labels_and_trains_the_student(batch, one_thread):
    torch.manual_seed(0)
    images, targets = batch
    preset = load_preset("probe")
    assert preset["temperature"] == 4.0 and preset["probe_weight"] == 0.8
    teacher, student = _vit(4, 96), _vit(2)
    recipe = get_recipe("probe")
    assert recipe.uses_labels is False
    task = recipe.task(teacher, student, preset)
    out = task(images, targets)
    assert set(out) >= {"loss", "output", "kd_loss", "probe_loss"}
    assert float(out["loss"].detach()) == pytest.approx(float(out["kd_loss"]) + 0.8 * float(out["probe_loss"]), rel=1e-5)
    assert task(images, None)["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-6)
    assert task(images, (targets + 3) % 10)["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-6)
    assert not teacher.blocks[0]._forward_hooks and not student.blocks[0]._forward_hooks  # hooks removed
    # The probe term reaches the student's blocks, never the frozen teacher.
    task.zero_grad()
    task(images)["loss"].backward()
    assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    # A few optimiser steps on real images bring the student's probe rows towards the teacher's.
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    first = float(task(images)["probe_loss"])
    for _ in range(8):
        optimizer.zero_grad()
        task(images)["loss"].backward()
        optimizer.step()
    assert float(task(images)["probe_loss"]) < 0.5 * first


def test_student_copy_of_teacher_has_zero_loss(batch):
    images, _ = batch
    teacher = _vit(3)
    out = ProbeTask(copy.deepcopy(teacher), teacher, temperature=4.0, probe_weight=0.8)(images)
    assert float(out["probe_loss"]) == pytest.approx(0.0, abs=1e-7)
    assert float(out["kd_loss"]) == pytest.approx(0.0, abs=1e-5)


def test_mismatched_patch_grid_is_a_user_error():
    teacher = _vit(2)
    student = create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                           num_classes=10)
    with pytest.raises(UserError, match="same tokens"):
        ProbeTask(student, teacher, temperature=4.0, probe_weight=0.8)
