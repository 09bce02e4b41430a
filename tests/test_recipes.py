"""Recipes, students and presets: registry, student derivation/initialisation, DeiT heads and ONNX export."""
from __future__ import annotations

import re

import onnx
import pytest
import torch

from conftest import RESNET20, TEACHER_ARCH, TEACHER_KWARGS
from distill_support import small_data
from vitshrink.errors import UserError
from vitshrink.io import create_model, data_config, load_model, set_data_config
from vitshrink.recipes import RecipeContext, get_recipe, load_preset, recipe_names
from vitshrink.config import PRESETS
from vitshrink.distill.teachers import TeacherInput
from vitshrink.students import derive_student, kept_blocks, parse_student_spec, resolve_student



def _teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(TEACHER_ARCH, **TEACHER_KWARGS)
    return model.eval()


def _ctx(recipe: str) -> RecipeContext:
    return RecipeContext(cfg=load_preset(recipe), device=torch.device("cpu"), data=None, train_loader=lambda *a: None)


def test_registry_and_unknown_recipe():
    assert {"vanilla", "deit", "ce"} <= set(recipe_names())
    with pytest.raises(UserError, match="unknown recipe"):
        get_recipe("hinton2")


def test_every_preset_key_has_a_citing_comment():
    for preset in ("base", "vanilla", "deit", "ce", "probe", "uvc"):
        lines = (PRESETS / f"{preset}.yaml").read_text().splitlines()
        keys = [i for i, line in enumerate(lines) if re.match(r"^[a-z_]+:", line)]
        assert keys, preset
        for i in keys:
            # the key's own block of comment lines sits directly above it (or above its block of keys)
            j = i - 1
            while j >= 0 and re.match(r"^[a-z_]+:", lines[j]):
                j -= 1
            assert j >= 0 and lines[j].startswith("#"), f"{preset}.yaml: {lines[i]!r} has no comment above"
    deit = (PRESETS / "deit.yaml").read_text()
    assert "alpha 0.5" in deit and "tau 1.0" in deit and "lambda = 0.1" in deit  # official vs paper noted
    assert load_preset("deit")["temperature"] == 3.0 and load_preset("deit")["distill_type"] == "hard"


def test_parse_student_spec():
    name, kwargs = parse_student_spec("vit_tiny_patch16_224:img_size=32,patch_size=4,depth=6,mlp_ratio=2.5,"
                                      "qkv_bias=false,global_pool=token")
    assert name == "vit_tiny_patch16_224"
    assert kwargs == {"img_size": 32, "patch_size": 4, "depth": 6, "mlp_ratio": 2.5, "qkv_bias": False,
                      "global_pool": "token"}
    with pytest.raises(UserError):
        parse_student_spec("vit_tiny_patch16_224:depth")


def test_derived_student_half_depth_half_flops_and_teacher_blocks():
    from vitshrink.measure import count_flops

    teacher = _teacher()
    student = derive_student(teacher)
    assert len(student.blocks) == 2 and kept_blocks(4, 2) == [0, 3] and kept_blocks(12, 6) == [0, 2, 4, 7, 9, 11]
    for j, i in enumerate(kept_blocks(4, 2)):
        for (name, a), (_, b) in zip(student.blocks[j].state_dict().items(), teacher.blocks[i].state_dict().items()):
            assert torch.equal(a, b), name
    assert torch.equal(student.head.weight, teacher.head.weight)
    assert data_config(student)["mean"] == data_config(teacher)["mean"]
    ratio = count_flops(student).macs / count_flops(teacher).macs
    assert 0.4 < ratio < 0.6


def test_student_wider_than_teacher_is_refused_but_can_start_from_scratch():
    teacher = _teacher()
    wide = "vit_tiny_patch16_224:img_size=32,patch_size=8,embed_dim=96,depth=2,num_heads=3,num_classes=10"
    with pytest.raises(UserError, match="wider than the teacher"):
        resolve_student(wide, teacher, init=True)
    deeper = "vit_tiny_patch16_224:img_size=32,patch_size=8,embed_dim=48,depth=6,num_heads=3,mlp_ratio=2.0"
    with pytest.raises(UserError, match="deeper"):
        resolve_student(deeper, teacher, init=True)
    assert resolve_student(wide, teacher, init=False).embed_dim == 96


def test_student_at_lower_resolution_gets_resampled_position_embeddings():
    teacher = _teacher()
    student = resolve_student("vit_tiny_patch16_224:img_size=16,patch_size=8,embed_dim=48,depth=2,num_heads=3,"
                              "mlp_ratio=2.0", teacher)
    assert student.pos_embed.shape[1] == 1 + 4
    torch.testing.assert_close(student.pos_embed[:, :1], teacher.pos_embed[:, :1])  # class-token position kept


def test_teacher_input_resizes_to_the_teachers_resolution():
    teacher = _teacher()
    wrapper = TeacherInput(teacher, (16, 16))
    x = torch.randn(2, 3, 16, 16)
    up = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(wrapper(x), teacher(up))


def test_vanilla_task_with_cnn_teacher_of_other_normalisation():
    teacher = load_model(str(RESNET20), arch="cifar_resnet20")
    student = resolve_student("vit_tiny_patch16_224:img_size=32,patch_size=8,embed_dim=48,depth=2,num_heads=3",
                              teacher)  # a CNN shares no weights with a ViT: init copies nothing, no error
    set_data_config(student, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    recipe = get_recipe("vanilla")
    task = recipe.task(teacher, student, {**load_preset("vanilla"), "kd_weight": 1.0})
    x = torch.randn(3, 3, 32, 32)
    out = task(x, None)  # kd_weight 1: no labels needed
    # The teacher saw the batch in its own normalisation (ImageNet mean/std), not the student's.
    pixels = x * 0.5 + 0.5
    t_mean, t_std = (torch.tensor(data_config(teacher)[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    expected = torch.nn.functional.kl_div(
        torch.log_softmax(student(x) / 4, -1), torch.log_softmax(teacher((pixels - t_mean) / t_std) / 4, -1),
        reduction="batchmean", log_target=True) * 16
    torch.testing.assert_close(out["loss"], expected, rtol=1e-4, atol=1e-5)
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is frozen


def test_deit_student_heads_training_and_single_output_onnx(tmp_path):
    from vitshrink.export import export_onnx

    teacher = _teacher()
    recipe = get_recipe("deit")
    student = recipe.build_student(teacher, None, _ctx("deit"))
    x = torch.randn(4, 3, 32, 32)
    # Converted from the derived student: dist token and head start as copies of the class ones.
    student.set_distilled_training(True)
    start_cls, start_dist = student.train()(x)
    torch.testing.assert_close(start_cls, start_dist)
    assert torch.equal(student.head_dist.weight, derive_student(teacher).head.weight)
    cfg = {**load_preset("deit"), "kd_weight": 0.5}
    task = recipe.task(teacher, student, cfg).train()
    y = torch.randint(0, 10, (4,))
    out = task(x, y)
    cls_logits, dist_logits = student(x)  # distilled training: two heads
    hard = teacher(x).argmax(-1)
    expected = 0.5 * torch.nn.functional.cross_entropy(cls_logits, y, label_smoothing=0.1) \
        + 0.5 * torch.nn.functional.cross_entropy(dist_logits, hard)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)
    soft = recipe.task(teacher, student, {**cfg, "distill_type": "soft", "kd_weight": 0.1})(x, y)
    assert torch.isfinite(soft["loss"]) and not torch.allclose(soft["loss"], out["loss"])
    final = recipe.finalize(student, cfg)
    averaged = (cls_logits + dist_logits) / 2
    torch.testing.assert_close(final(x), averaged.detach(), rtol=1e-5, atol=1e-5)
    data = small_data(16, 16)
    data.val.transform = __import__("vitshrink.data", fromlist=["x"]).build_transform(data_config(final))
    sample = torch.stack([data.val[i][0] for i in range(8)])
    parity = export_onnx(final, tmp_path / "deit.onnx", sample=sample)
    assert parity.passed and parity.max_abs_diff <= 1e-4
    assert len(onnx.load(str(tmp_path / "deit.onnx")).graph.output) == 1
