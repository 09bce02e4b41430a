"""The ``uvc`` recipe: search to a FLOPs target, slice physically, reload, export; bad targets refused."""
from __future__ import annotations

import json

import pytest
import torch

from cli_support import assert_one_line_error, run_cli
from distill_support import small_data
from vitshrink.data import build_transform, make_loader, resolve_data
from vitshrink.errors import UserError
from vitshrink.io import data_config, load_model, save_model
from vitshrink.measure import count_flops
from vitshrink.prune.surgery import block_dims, mask_vit, slice_vit
from vitshrink.prune.uvc_search import ResourceModel, UVCConfig, check_flops_target, search_uvc

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def teacher(tiny_teacher_path):
    return load_model(tiny_teacher_path)


@pytest.fixture(scope="module")
def loader(teacher):
    data = small_data(n_train=256, n_val=16)
    data.train.transform = build_transform(data_config(teacher), is_training=False)
    return make_loader(data.train, 32, shuffle=True, workers=0, drop_last=True)


@pytest.fixture(scope="module")
def images(teacher):
    val = resolve_data().val
    val.transform = build_transform(data_config(teacher), is_training=False)
    return next(iter(make_loader(val, 8, workers=0)))[0]


@pytest.fixture(scope="module")
def searched(teacher, loader):
    return {target: search_uvc(teacher, loader, UVCConfig(flops_target=target, steps=12, log_every=0))
            for target in (0.7, 0.5)}


def _ratio(model, teacher) -> float:
    return count_flops(model).macs / count_flops(teacher).macs


def test_resource_model_matches_the_flop_counter(teacher):
    resource = ResourceModel(teacher)
    counted = count_flops(teacher, module_depth=2).by_module
    assert resource.full_blocks == [counted[f"blocks.{i}"] for i in range(len(teacher.blocks))]
    assert resource.fixed + sum(resource.full_blocks) == count_flops(teacher).macs


@pytest.mark.parametrize("target", [0.7, 0.5])
def test_sliced_result_hits_the_flops_target(searched, teacher, images, target):
    result = searched[target]
    sliced = slice_vit(result.model, result.plan)
    ratio = _ratio(sliced, teacher)  # the real counter on the physically sliced model
    assert target - 0.02 <= ratio <= target + 1e-9, ratio
    assert ratio == pytest.approx(result.resource, abs=1e-9)
    # Same function as the searched model with the removed units zeroed.
    with torch.no_grad():
        torch.testing.assert_close(sliced(images), mask_vit(result.model, result.plan)(images), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in sliced.parameters()) < sum(p.numel() for p in teacher.parameters())


def test_per_layer_dims_follow_the_search(searched, teacher):
    result = searched[0.5]
    sliced = slice_vit(result.model, result.plan)
    kept = [i for i, k in enumerate(result.plan) if k is not None]
    assert sliced.kept_blocks == kept
    teacher_dims = block_dims(teacher)
    for new_i, i in enumerate(kept):
        keep, dims = result.plan[i], block_dims(sliced)[new_i]
        assert dims.num_heads == len(keep.heads)
        assert dims.mlp_hidden == len(keep.mlp)
        width = len(keep.head_dims[0]) if keep.head_dims else teacher_dims[i].head_dim
        assert dims.head_dim == (width if keep.heads else 0)
        blk = sliced.blocks[new_i]
        if blk.mlp is not None:
            assert blk.mlp.fc1.weight.shape[0] == len(keep.mlp)
    shapes = {(d.num_heads, d.head_dim, d.mlp_hidden) for d in block_dims(sliced)}
    assert len(shapes) > 1 or len(kept) < len(teacher.blocks), "the search pruned every block alike"


def test_reload_and_onnx_parity(searched, teacher, images, tmp_path):
    from vitshrink.export import export_onnx

    result = searched[0.5]
    sliced = slice_vit(result.model, result.plan).eval()
    path = save_model(sliced, tmp_path / "uvc.safetensors", provenance={"recipe": "uvc"})
    again = load_model(path)
    assert [d.__dict__ for d in block_dims(again)] == [d.__dict__ for d in block_dims(sliced)]
    assert again.kept_blocks == sliced.kept_blocks
    with torch.no_grad():
        torch.testing.assert_close(again(images), sliced(images))
    parity = export_onnx(again, tmp_path / "uvc.onnx", sample=images)
    assert parity.passed and parity.max_abs_diff <= 1e-4


def test_ablations(teacher, loader):
    skip_only = search_uvc(teacher, loader, UVCConfig(flops_target=0.6, steps=4, within=False, log_every=0))
    full = block_dims(teacher)
    for keep, dims in zip(skip_only.plan, full):
        if keep is not None:  # whole blocks only: what stays is untouched
            assert len(keep.heads) == dims.num_heads and len(keep.mlp) == dims.mlp_hidden and keep.head_dims is None
    assert any(k is None for k in skip_only.plan) and skip_only.resource <= 0.6
    no_skip = search_uvc(teacher, loader, UVCConfig(flops_target=0.6, steps=4, skip=False, log_every=0))
    assert all(k is not None for k in no_skip.plan)
    assert 0.58 <= no_skip.resource <= 0.6


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.2, float("nan"), "half"])
def test_targets_outside_the_unit_interval_are_refused(bad):
    with pytest.raises(UserError, match="flops-target"):
        check_flops_target(bad)


def test_unreachable_target_is_refused(teacher, loader):
    resource = ResourceModel(teacher)
    floor = resource.min_ratio(skip=False, within=True)
    with pytest.raises(UserError, match="unreachable"):
        search_uvc(teacher, loader, UVCConfig(flops_target=floor / 2, steps=1, skip=False))
    with pytest.raises(UserError, match="unreachable"):
        check_flops_target(resource.fixed / resource.total / 2, resource)


def test_uvc_recipe_end_to_end(tiny_teacher_path, tmp_path):
    from vitshrink.pipeline import distill

    out = tmp_path / "run"
    result = distill(load_model(tiny_teacher_path), "uvc", data=small_data(n_train=128, n_val=64), out_dir=out,
                     epochs=1, batch_size=32, progress=False, flops_target=0.5, workers=0,
                     overrides={"search_steps": 6, "search_batch_size": 32, "bench_batch_sizes": [1]})
    student = load_model(out / "student.safetensors")
    assert type(student).__name__ == "BlockwiseVisionTransformer"
    teacher = load_model(tiny_teacher_path)
    assert 0.48 <= _ratio(student, teacher) <= 0.5
    plan = json.loads((out / "uvc_plan.json").read_text())
    assert plan["flops_target"] == 0.5 and 0.48 <= plan["flops_ratio"] <= 0.5
    assert result.report["onnx"]["passed"]
    # The search's health reaches report.json (traces) and the run folder (uvc_search.png).
    search = result.report["pruning"]["search"]
    assert len(search["trace"]["resource"]) == search["steps_run"] == len(search["trace"]["z"]) <= 6
    assert search["search_resource"] == pytest.approx(plan["search_resource"])
    assert (out / "uvc_search.png").stat().st_size > 0 and "Pruning search:" in (out / "report.md").read_text()


def test_cli_refuses_bad_target_with_one_line(capsys, tiny_teacher_path, tmp_path):
    code, _, err = run_cli(capsys, "distill", tiny_teacher_path, "--recipe", "uvc", "--flops-target", "1.5",
                           "--out", tmp_path / "o")
    assert_one_line_error(code, err, "flops-target")
