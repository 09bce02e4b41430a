"""Every timm ViT family through loading, ``uvc`` and ``deit`` — or its one-line refusal before any work.

Tiny random-weight configurations (32 px, patch 8, width 48, 3 heads, 2 blocks, 10 classes) of each family the
issue names, on real CIFAR-10 images from ``../shared/data``. Loading and the vitshrink twin are checked for
every family; the full ``distill`` run (search, one short epoch, ONNX parity, reload with no flags) for one
family per recipe — SigLIP (``map`` head, no class token) for ``uvc``, DINOv2 with registers (LayerScale,
``no_embed_class``, registers), the parallel-block ViT and EVA-02 (timm's own model with the token) for ``deit`` —
and the student-building stage, which is where the families differ,
for every other family (``benchmarks/zoo.py`` runs the whole matrix).
"""
from __future__ import annotations

import pytest
import timm
import torch

from distill_support import small_data
from vitshrink.config import load_preset
from vitshrink.data import build_transform, make_loader, resolve_data
from vitshrink.errors import UserError
from vitshrink.io import create_model, data_config, load_model, save_model
from vitshrink.measure import count_flops
from vitshrink.prune.surgery import full_plan, slice_vit
from vitshrink.recipes import get_recipe
from vitshrink.recipes.base import RecipeContext

torch.set_num_threads(1)

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
FAMILIES = {
    "deit3": ("deit3_small_patch16_224", {}),
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", {}),
    "clip": ("vit_base_patch16_clip_224", {}),
    "siglip": ("vit_base_patch16_siglip_224", {}),
    "gap": ("vit_base_patch16_gap_224", {}),
    "qk_norm": ("vit_small_patch16_224", {"qk_norm": True}),
    "parallel": ("vit_small_patch16_18x2_224", {}),
    "eva02": ("eva02_tiny_patch14_224", {}),
}
# What each recipe says about a family it cannot handle: the start of its one line.
REFUSED = {
    ("parallel", "uvc"): "--recipe uvc: vit_small_patch16_18x2_224 is a parallel-block ViT",
    ("eva02", "uvc"): "--recipe uvc: eva02_tiny_patch14_224 is a ViT with rotary position embeddings",
}
# Full runs are the slow part (export, measurement): one per recipe, on the family furthest from plain DeiT.
FULL_RUNS = [("siglip", "uvc"), ("dinov2_reg", "deit"), ("parallel", "deit"), ("eva02", "deit")]


def _teacher(family: str) -> torch.nn.Module:
    name, extra = FAMILIES[family]
    torch.manual_seed(0)
    return create_model(name, **TINY, **extra).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    val = resolve_data().val
    val.transform = build_transform(data_config(_teacher("deit3")), is_training=False)
    return next(iter(make_loader(val, 16, workers=0)))[0]


def _ctx(recipe: str, notes: list[str]) -> RecipeContext:
    return RecipeContext(cfg=dict(load_preset(recipe)), device=torch.device("cpu"), data=None,
                         train_loader=lambda *a, **k: None, log=notes.append)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_vitshrink_logits_equal_timms(family, images, tmp_path):
    name, extra = FAMILIES[family]
    teacher = _teacher(family)
    reference = timm.create_model(name, **TINY, **extra).eval()
    reference.load_state_dict(teacher.state_dict())
    save_model(teacher, tmp_path / "t.safetensors")
    reloaded = load_model(tmp_path / "t.safetensors")
    with torch.no_grad():
        expected = reference(images)
        assert (reloaded(images) - expected).abs().max() <= 1e-4
        if (family, "uvc") not in REFUSED:  # vitshrink's own ViT (what uvc slices into) computes the same function
            twin = slice_vit(teacher, full_plan(teacher)).eval()
            assert type(twin).__name__ == "BlockwiseVisionTransformer"
            assert (twin(images) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("family,recipe", sorted(REFUSED))
def test_refused_in_one_line_before_any_epoch(family, recipe, tmp_path):
    from vitshrink.pipeline import distill

    with pytest.raises(UserError) as caught:
        distill(_teacher(family), recipe, data=small_data(32, 16), out_dir=tmp_path / "run", epochs=1,
                batch_size=16, workers=0, progress=False)
    message = str(caught.value)
    assert message.startswith(REFUSED[family, recipe]) and "\n" not in message
    assert "pass --student" in message if recipe == "deit" else "timm ViT blocks" in message
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "args.yaml").exists()


@pytest.mark.parametrize("family", sorted(f for f in FAMILIES if f not in ("parallel", "eva02")))
def test_deit_student_keeps_the_teachers_layout_and_is_smaller(family, images):
    teacher = _teacher(family)
    student = get_recipe("deit").build_student(teacher, None, _ctx("deit", []))
    assert count_flops(student).macs < count_flops(teacher).macs
    assert len(student.blocks) == 1 and student.embed_dim == teacher.embed_dim
    for attribute in ("no_embed_class", "num_reg_tokens", "global_pool"):
        assert getattr(student, attribute) == getattr(teacher, attribute), attribute
    assert type(student.norm_pre) is type(teacher.norm_pre)
    assert type(student.blocks[0].ls1) is type(teacher.blocks[0].ls1)
    assert type(student.blocks[0].attn.q_norm) is type(teacher.blocks[0].attn.q_norm)
    assert (student.patch_embed.proj.bias is None) == (teacher.patch_embed.proj.bias is None)
    student.train().set_distilled_training(True)
    cls_logits, dist_logits = student(images)
    if teacher.cls_token is not None and teacher.global_pool == "token":
        # The distillation token starts as the class token: both heads agree until training moves them.
        assert (cls_logits - dist_logits).abs().max() <= 1e-5


def test_uvc_adjusts_head_dims_under_qk_norm_before_the_search():
    notes: list[str] = []
    ctx = _ctx("uvc", notes)
    assert ctx.cfg["prune_head_dims"] is True
    get_recipe("uvc").build_student(_teacher("qk_norm"), None, ctx)
    assert ctx.cfg["prune_head_dims"] is False
    assert any("qk-norm" in n and "prune_head_dims=false" in n for n in notes)


def test_derived_student_larger_than_its_teacher_is_an_error_naming_both_gmacs():
    # DeiT's own setting (a CNN teacher, a DeiT-Tiny-shaped student) with a CNN far cheaper than DeiT-Tiny.
    teacher = create_model("resnet10t", num_classes=10)
    from vitshrink.io import set_data_config

    set_data_config(teacher, input_size=(3, 32, 32))
    with pytest.raises(UserError) as caught:
        get_recipe("deit").build_student(teacher, None, _ctx("deit", []))
    # DeiT-Tiny's shape at 32 px: patch 4 (an 8x8 grid), width 192, 3 heads, 12 blocks.
    deit_tiny = create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10)
    student_gmacs, teacher_gmacs = count_flops(deit_tiny).gmacs, count_flops(teacher).gmacs
    message = str(caught.value)
    assert student_gmacs > teacher_gmacs and "\n" not in message
    assert f"costs {student_gmacs:.4g} GMACs, more than the teacher's {teacher_gmacs:.4g} GMACs" in message


@pytest.mark.parametrize("family,recipe", FULL_RUNS)
def test_full_run_student_exports_reloads_and_is_smaller(family, recipe, images, tmp_path):
    from vitshrink.pipeline import distill

    teacher = _teacher(family)
    out = tmp_path / "run"
    overrides = {"steps_per_epoch": 2, "bench_batch_sizes": [1], "search_steps": 4, "search_batch_size": 16}
    result = distill(teacher, recipe, data=small_data(64, 16), out_dir=out, epochs=1, batch_size=16, workers=0,
                     progress=False, flops_target=0.5 if recipe == "uvc" else None,
                     overrides={k: v for k, v in overrides.items() if recipe == "uvc" or "search" not in k})
    assert result.report["onnx"]["passed"] and result.report["onnx"]["max_abs_diff"] <= 1e-4
    reloaded = load_model(out / "student.safetensors")  # no flags: the record says everything
    with torch.no_grad():
        assert (reloaded(images) - result.student(images)).abs().max() <= 1e-5
    ratio = count_flops(reloaded).macs / count_flops(teacher).macs
    assert ratio < 1.0
    if recipe == "uvc":
        assert 0.48 - 1e-9 <= ratio <= 0.5 + 1e-9
        assert type(reloaded).__name__ == "BlockwiseVisionTransformer"
        assert reloaded.global_pool == teacher.global_pool
    else:
        assert hasattr(reloaded, "dist_token")
        # Parallel and Eva blocks stay timm's own; timm's plain blocks become vitshrink_vit's (same function).
        expected = type(teacher.blocks[0]).__name__ if family in ("parallel", "eva02") else "SlimBlock"
        assert type(reloaded.blocks[0]).__name__ == expected


def test_inspect_counts_an_attention_pooling_head_and_shows_parallel_branches():
    from vitshrink.inspection import describe

    siglip = _teacher("siglip")
    counted = count_flops(siglip, module_depth=2).by_module
    pool = siglip.attn_pool
    tokens = (32 // 8) ** 2
    # The latent query's projections, the keys/values of every patch token, its MLP (no attention: SDPA is
    # one latent row, 2 * heads * 1 * tokens * head_dim).
    expected = (48 * 48 + tokens * 48 * 96 + 48 * 48 + 2 * 48 * pool.mlp.fc1.out_features
                + 2 * tokens * 48)
    assert counted["attn_pool"] == expected
    assert describe(siglip)["summary"]["GMACs (batch 1)"] == round(count_flops(siglip).gmacs, 4)
    summary = describe(_teacher("parallel"))["summary"]
    assert summary["heads"] == 2 * 3 and summary["mlp hidden"] == 2 * 4 * 48 and summary["parallel branches"] == 2
    assert describe(_teacher("eva02"))["summary"]["mlp hidden"] == _teacher("eva02").blocks[0].mlp.fc2.in_features


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "vit_base_patch16_rope_224", "beit_base_patch16_224"])
def test_rope_and_relative_position_files_load_at_another_img_size(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, **TINY).eval()
    save_model(model, tmp_path / "m.safetensors")
    larger = load_model(tmp_path / "m.safetensors", img_size=48)
    assert tuple(larger.patch_embed.img_size) == (48, 48) and data_config(larger)["input_size"] == (3, 48, 48)
    with torch.no_grad():
        assert larger(torch.randn(2, 3, 48, 48)).shape == (2, 10)
        same = load_model(tmp_path / "m.safetensors", img_size=32)
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(same(x), model(x))


def test_deit_applies_to_a_rope_teacher_with_a_named_student(images):
    teacher = _teacher("eva02")
    spec = "vit_tiny_patch16_224:img_size=32,patch_size=8,embed_dim=48,depth=1,num_heads=3,mlp_ratio=2,num_classes=10"
    student = get_recipe("deit").build_student(teacher, spec, _ctx("deit", []))
    assert hasattr(student, "dist_token") and count_flops(student).macs < count_flops(teacher).macs
    assert student.eval()(images).shape == (16, 10)


def test_relative_position_teacher_is_refused_for_a_derived_deit_student():
    teacher = create_model("beit_base_patch16_224", **TINY).eval()
    with pytest.raises(UserError, match=r"^--recipe deit: beit_base_patch16_224 is a ViT with relative position bias"):
        get_recipe("deit").build_student(teacher, None, _ctx("deit", []))
