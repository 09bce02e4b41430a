"""Live teachers: the student's batch converted to the teacher's normalisation and input size; frozen; roles."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vitshrink.distill.tasks import LogitKDTask
from vitshrink.distill.teachers import LiveTeacher, Teachers
from vitshrink.io import create_model, data_config, set_data_config


def _vit(img_size: int, depth: int = 2):
    return create_model("vit_tiny_patch16_224", img_size=img_size, patch_size=8, embed_dim=48, depth=depth,
                        num_heads=3, mlp_ratio=2.0, num_classes=10)


def test_live_teacher_converts_normalisation_and_resizes():
    torch.manual_seed(0)
    teacher = _vit(32)
    set_data_config(teacher, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
    student = _vit(16)
    set_data_config(student, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    live = LiveTeacher(teacher, data_config(student))
    assert live.renormalise and live.module is teacher and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 16, 16)  # a student batch: 16 px, student normalisation
    pixels = x * 0.5 + 0.5
    mean, std = (torch.tensor(data_config(teacher)[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    expected = teacher(F.interpolate((pixels - mean) / std, size=(32, 32), mode="bilinear", align_corners=False,
                                     antialias=True))
    torch.testing.assert_close(live.logits(x), expected, rtol=1e-5, atol=1e-5)
    logits, feats = live.features(x, ["blocks.1"])
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert feats["blocks.1"].shape == (2, 1 + 16, 48) and not feats["blocks.1"].requires_grad
    live.train()
    assert not live.training and not teacher.training  # never trained


def test_same_normalisation_is_passed_through_and_roles_reach_the_task():
    torch.manual_seed(0)
    teacher, student = _vit(32, depth=3), _vit(32)
    live = LiveTeacher(teacher, data_config(student))
    assert not live.renormalise
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(live.logits(x), teacher(x).detach())
    other = _vit(32, depth=1)
    teachers = Teachers.live({"teacher": teacher, "second": other}, data_config(student))
    assert list(teachers) == ["teacher", "second"] and teachers.main.module is teacher
    task = LogitKDTask(student, teachers, kd_weight=1.0, temperature=2.0, role="second")
    out = task(x, None)
    expected = F.kl_div(F.log_softmax(student(x) / 2, -1), F.log_softmax(other(x) / 2, -1), reduction="batchmean",
                        log_target=True) * 4
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)
    out["loss"].backward()
    assert all(p.grad is None for p in list(teacher.parameters()) + list(other.parameters()))
    assert list(task.get_trainable_module().parameters())[0] is next(student.parameters())
