"""The dearkd recipe: stage I (token KD + early CNN feature alignment) and stage II (labels only) switch at the
configured epoch; the feature projection and grid resize; the CNN teacher role."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import RESNET20, TEACHER_ARCH, TEACHER_KWARGS
from distill_support import small_data
from vitshrink.distill.taps import FeatureTaps
from vitshrink.distill.teachers import Teachers
from vitshrink.errors import UserError
from vitshrink.io import create_model, load_model
from vitshrink.pipeline import load_teachers, resolve_run_settings
from vitshrink.recipes import RecipeContext, get_recipe, load_preset

torch.set_num_threads(1)


def _resnet20():
    import vitshrink.models  # noqa: F401  (registers cifar_resnet20)

    if not RESNET20.exists():
        pytest.skip(f"{RESNET20} not present")
    return load_model(str(RESNET20), arch="cifar_resnet20").eval()


def _vit_teacher():
    torch.manual_seed(0)
    return create_model(TEACHER_ARCH, **TEACHER_KWARGS).eval()


def _setup(stage1_epochs: int = 1):
    """A tiny distilled student (2 blocks, 4x4 patch grid at 32 px), the ViT teacher and the ResNet-20."""
    recipe = get_recipe("dearkd")
    vit, cnn = _vit_teacher(), _resnet20()
    cfg = {**load_preset("dearkd"), "epochs": 2, "stage1_epochs": stage1_epochs}
    ctx = RecipeContext(cfg=cfg, device=torch.device("cpu"), data=None, train_loader=lambda *a: None)
    student = recipe.build_student(vit, None, ctx)
    from vitshrink.io import data_config

    teachers = Teachers.live({"teacher": vit, "cnn": cnn}, data_config(student))
    return recipe, student, teachers, vit, cnn, cfg


def _extras(epoch: int, n: int) -> dict:
    return {"key": torch.stack([torch.full((n,), epoch), torch.arange(n)], dim=1)}


def test_stage_one_then_labels_only_at_the_configured_epoch():
    recipe, student, teachers, vit, cnn, cfg = _setup(stage1_epochs=1)
    task = recipe.task(teachers, student, cfg).train()
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    one = task(x, y, _extras(0, 4))
    assert int(one["stage"]) == 1
    assert one["kd_loss"] > 0 and one["feature_loss"] > 0 and one["task_loss"] > 0
    # Stage I equals its formula on the same tensors: DeiT hard token KD + mean MSE of the projected early
    # blocks against the ResNet maps (layer1 32x32x16, layer2 16x16x32) resized to the 4x4 student grid.
    # (distilled training mode: two heads; the student has no dropout, so this forward repeats the task's)
    with FeatureTaps(student, ["blocks.0", "blocks.1"]) as feats:
        cls_logits, dist_logits = student(x)
    with torch.no_grad(), FeatureTaps(cnn, ["layer1", "layer2"]) as cnn_feats:
        # The student's normalisation (CIFAR mean/std) converted to the ResNet's own.
        t_input = teachers["cnn"].to_teacher_input(x)
        cnn(t_input)
    projections = task.trainable_module.projections
    mse = []
    for (point, teacher_point), projection in zip([("blocks.0", "layer1"), ("blocks.1", "layer2")], projections):
        tokens = projection(feats[point])[:, 2:]  # class and distillation tokens dropped
        target = F.interpolate(cnn_feats[teacher_point], size=(4, 4), mode="bilinear", align_corners=False)
        mse.append(F.mse_loss(tokens, target.flatten(2).transpose(1, 2)))
    hard = vit(teachers["teacher"].to_teacher_input(x)).argmax(-1)
    expected = 0.5 * F.cross_entropy(cls_logits, y, label_smoothing=0.1) + 0.5 * F.cross_entropy(dist_logits, hard) \
        + 1.0 * torch.stack(mse).mean()
    torch.testing.assert_close(one["loss"], expected, rtol=1e-4, atol=1e-5)

    two = task(x, y, _extras(1, 4))  # epoch 1 = stage1_epochs: stage II
    assert int(two["stage"]) == 2
    assert float(two["kd_loss"]) == 0.0 and float(two["feature_loss"]) == 0.0
    expected_two = (F.cross_entropy(cls_logits, y, label_smoothing=0.1)
                    + F.cross_entropy(dist_logits, y, label_smoothing=0.1)) / 2
    torch.testing.assert_close(two["loss"], expected_two, rtol=1e-4, atol=1e-5)
    # Stage II reads no teacher: a teacher that would fail is never called.
    task.teachers = Teachers({"teacher": None, "cnn": None})
    assert int(task(x, y, _extras(5, 4))["stage"]) == 2
    with pytest.raises((TypeError, AttributeError)):
        task(x, y, _extras(0, 4))


def test_stage_split_default_and_flag():
    _, settings = resolve_run_settings("dearkd", flags={"epochs": 10})
    assert settings.values["stage1_epochs"] == 8  # ceil(0.8 * 10)
    _, settings = resolve_run_settings("dearkd", flags={"epochs": 10, "stage1_epochs": 3})
    assert settings.values["stage1_epochs"] == 3
    with pytest.raises(UserError, match="--stage1-epochs"):
        resolve_run_settings("dearkd", flags={"stage1_epochs": -1})


def test_feature_alignment_shapes_and_grid_resize():
    recipe, student, teachers, _, _, cfg = _setup()
    task = recipe.task(teachers, student, cfg)
    # Default CNN points come from the ResNet's feature_info; widths from a dry forward.
    assert [c for _, c in task.pairs] == ["layer1", "layer2"]
    assert [(p.in_features, p.out_features) for p in task.trainable_module.projections] == [(48, 16), (48, 32)]
    from vitshrink.distill.tasks import feature_mse

    tokens = torch.randn(2, 2 + 16, 16)  # 2 prefix tokens + a 4x4 grid, width 16
    cnn_map = torch.randn(2, 16, 32, 32)
    expected = F.mse_loss(tokens[:, 2:], F.interpolate(cnn_map, size=(4, 4), mode="bilinear",
                                                       align_corners=False).flatten(2).transpose(1, 2))
    torch.testing.assert_close(feature_mse(tokens, cnn_map), expected)
    with pytest.raises(UserError, match="--student-points / --cnn-points"):
        recipe.task(teachers, student, {**cfg, "student_points": ["blocks.9"], "cnn_points": ["layer1"]})
    with pytest.raises(UserError, match="as many"):
        recipe.task(teachers, student, {**cfg, "cnn_points": ["layer1"]})


def test_cnn_teacher_role_missing_and_stand_in(tmp_path):
    from vitshrink.io import save_model

    recipe = get_recipe("dearkd")
    cfg = load_preset("dearkd")
    with pytest.raises(UserError, match="--cnn-teacher"):
        load_teachers(recipe, _vit_teacher(), cfg)  # a ViT TEACHER cannot stand in for the CNN
    cnn = _resnet20()
    assert load_teachers(recipe, cnn, cfg)["cnn"] is cnn  # a CNN TEACHER serves both roles
    # --cnn-teacher SPEC is loaded like a TEACHER (a foreign .th needs `vitshrink convert` first: no --arch here).
    save_model(cnn, tmp_path / "resnet20.safetensors")
    loaded = load_teachers(recipe, _vit_teacher(), {**cfg, "cnn_teacher": str(tmp_path / "resnet20.safetensors")})
    assert type(loaded["cnn"]).__name__ == "CifarResNet"


def test_stage_follows_the_sources_epoch_on_resume():
    """The loop restores ``source.set_epoch(epoch, batch)`` on --resume; the stage comes from the batch's key,
    so a run resumed in its stage-II epoch (mid-epoch) trains stage II from its first step."""
    from vitshrink.data.sources import labelled_source

    recipe, student, teachers, _, _, cfg = _setup(stage1_epochs=1)
    task = recipe.task(teachers, student, cfg)
    source = labelled_source(small_data(16, 4).train, student, {**cfg, "batch_size": 4, "workers": 0}, seed=0)
    stages = []
    for epoch, skip in ((0, 0), (0, 2), (1, 0), (1, 3)):
        source.set_epoch(epoch, skip)
        images, targets, extras = next(iter(source))
        assert extras["key"][:, 0].tolist() == [epoch] * 4
        stages.append(int(task(images, targets, extras)["stage"]))
    assert stages == [1, 1, 2, 2]
