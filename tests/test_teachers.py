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


def test_load_teachers_reads_each_declared_role(tmp_path):
    from vitshrink.io import save_model
    from vitshrink.pipeline import load_teachers
    from vitshrink.recipes.base import Recipe

    class TwoTeachers(Recipe):
        name = "two"
        teacher_roles = {"teacher": "", "cnn": "cnn_teacher"}

    main, second = _vit(32), _vit(32, depth=1)
    save_model(second, tmp_path / "second.safetensors")
    loaded = load_teachers(TwoTeachers(), main, {"cnn_teacher": str(tmp_path / "second.safetensors")})
    assert loaded["teacher"] is main and len(loaded["cnn"].blocks) == 1
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded["cnn"](x), second(x))
    import pytest

    from vitshrink.errors import UserError
    with pytest.raises(UserError, match="--cnn-teacher: recipe two needs a SPEC for its cnn teacher"):
        load_teachers(TwoTeachers(), main, {"cnn_teacher": None})


def test_multi_token_kd_one_term_per_head_and_teacher():
    from vitshrink.distill.tasks import MultiTokenKDTask

    torch.manual_seed(0)

    class ThreeHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = torch.nn.ModuleList(torch.nn.Linear(3 * 32 * 32, 10) for _ in range(3))

        def forward(self, x):
            return tuple(head(x.flatten(1)) for head in self.heads)

    student = ThreeHeads()
    a, b = _vit(32), _vit(32, depth=1)
    teachers = Teachers.live({"cnn": a, "inn": b}, data_config(a))
    task = MultiTokenKDTask(student, teachers, pairs=[(1, "cnn", 0.25), (2, "inn", 0.25)], distill_type="hard")
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    out = task(x, y)
    heads = student(x)
    expected = 0.5 * F.cross_entropy(heads[0], y) + 0.25 * F.cross_entropy(heads[1], a(x).argmax(-1)) \
        + 0.25 * F.cross_entropy(heads[2], b(x).argmax(-1))
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)
    assert set(out) >= {"kd_loss_cnn", "kd_loss_inn", "task_loss", "output"}


def test_feature_kd_projects_student_tokens_onto_a_cnn_map():
    from vitshrink.distill.tasks import FeatureKDTask, feature_mse

    torch.manual_seed(0)
    cnn = create_model("cifar_resnet20", num_classes=10)
    student = _vit(32)
    task = FeatureKDTask(student, cnn, pairs=[("blocks.0", "layer1")], widths=[(48, 16)], feature_weight=2.0,
                         kd_weight=1.0, temperature=4.0)
    x = torch.randn(2, 3, 32, 32)
    out = task(x)
    with torch.no_grad():
        from vitshrink.distill.taps import forward_with_taps

        _, feats = forward_with_taps(student, x, ["blocks.0"])
        _, t_feats = forward_with_taps(cnn, task.teacher.to_teacher_input(x), ["layer1"])
        projected = task.trainable_module.projections[0](feats["blocks.0"])[:, 1:]  # 16 patch tokens (4 x 4)
        target = F.interpolate(t_feats["layer1"], size=(4, 4), mode="bilinear", align_corners=False)
        expected = F.mse_loss(projected, target.flatten(2).transpose(1, 2))
    torch.testing.assert_close(out["feature_loss"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feature_mse(projected, target.flatten(2).transpose(1, 2)), expected)
    out["loss"].backward()
    assert task.trainable_module.projections[0].weight.grad.abs().sum() > 0
    assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in cnn.parameters())
