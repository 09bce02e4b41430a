"""``--dim-multiple``: every pruned head dim and MLP width is a multiple of M, and the counted FLOPs stay in the band
``[target - 0.02, target]`` (search decisions, greedy band adjustment, one-shot magnitude plan, the recipe)."""
from __future__ import annotations

import json

import pytest
import torch

from distill_support import small_data
from vitshrink.io import create_model, set_data_config
from vitshrink.measure import count_flops
from vitshrink.prune.decisions import Decisions, magnitude_plan
from vitshrink.prune.importance import norm_scale
from vitshrink.prune.plan import block_dims
from vitshrink.prune.resource import ResourceModel, allowed_widths
from vitshrink.prune.surgery import slice_vit
from vitshrink.prune.uvc_search import UVCConfig, search_uvc

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    # 3 blocks of 2 heads x 32 dims, MLP 136 (not a multiple of 8 or 16: the unpruned width may stay as it is).
    model = create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2,
                         mlp_ratio=136 / 64, num_classes=10)
    set_data_config(model, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    return model.eval()


def _random_batches(n: int = 4, batch: int = 8):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen), 0)
            for _ in range(n)]


def _check_widths(model, sliced, multiple: int) -> None:
    full = block_dims(model)
    for d in block_dims(sliced):
        assert d.head_dim % multiple == 0 or d.head_dim == full[0].head_dim, d
        assert (d.num_heads * d.head_dim) % multiple == 0 or d.head_dim == full[0].head_dim, d
        assert d.mlp_hidden % multiple == 0 or d.mlp_hidden == full[0].mlp_hidden, d


def _ratio(sliced, model) -> float:
    return count_flops(sliced).macs / count_flops(model).macs


def test_allowed_widths():
    assert allowed_widths(32, 8) == [8, 16, 24, 32]
    assert allowed_widths(36, 8) == [8, 16, 24, 32, 36]
    assert allowed_widths(4, 8) == [4]  # narrower than M: cannot be pruned
    assert allowed_widths(5, 1) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("multiple", [8, 16])
@pytest.mark.parametrize("target", [0.7, 0.5])
def test_magnitude_plan_widths_and_band(vit, multiple, target):
    plan = magnitude_plan(vit, target, 0.02, dim_multiple=multiple)
    sliced = slice_vit(vit, plan)
    _check_widths(vit, sliced, multiple)
    ratio = _ratio(sliced, vit)
    assert target - 0.02 <= ratio <= target + 1e-9, ratio
    # Something was pruned below full width (the test would pass vacuously otherwise).
    assert any(d.mlp_hidden < 136 for d in block_dims(sliced))


def test_decisions_round_search_counts_onto_the_grid(vit):
    resource = ResourceModel(vit)
    scales = [norm_scale(list(vit.blocks))] * 3
    # Counts of removed units as a search leaves them: off the grid.
    state = Decisions(vit, resource, scales, [True] * 3, [[0, 5, 61], [1, 13, 3], [0, 0, 100]], [1.0] * 3, 8)
    assert [n[1] for n in state.n] == [24, 16, 32] and [n[2] for n in state.n] == [72, 136, 32]
    state.adjust(0.5, 0.02, within=True, skip=True)
    assert 0.48 <= state.ratio() <= 0.5
    assert all(n[1] % 8 == 0 and (n[2] % 8 == 0 or n[2] == 136) for n in state.n)


def test_search_with_dim_multiple_8(vit):
    config = UVCConfig(flops_target=0.5, steps=4, log_every=0, dim_multiple=8)
    result = search_uvc(vit, _random_batches(), config)
    sliced = slice_vit(vit, result.plan)
    _check_widths(vit, sliced, 8)
    ratio = _ratio(sliced, vit)
    assert 0.48 <= ratio <= 0.5 + 1e-9, ratio
    assert ratio == pytest.approx(result.resource, abs=1e-9)


def test_recipe_dim_multiple_flag(tiny_teacher_path, tmp_path):
    from vitshrink.io import load_model
    from vitshrink.pipeline import distill

    out = tmp_path / "run"
    distill(load_model(tiny_teacher_path), "uvc", data=small_data(n_train=64, n_val=32), out_dir=out, epochs=1,
            batch_size=32, progress=False, flops_target=0.5, workers=0,
            options={"dim_multiple": 8, "pruning_plan": "magnitude", "bench_batch_sizes": [1],
                     "steps_per_epoch": 1})
    student, teacher = load_model(out / "student.safetensors"), load_model(tiny_teacher_path)
    _check_widths(teacher, student, 8)
    assert 0.48 <= _ratio(student, teacher) <= 0.5 + 1e-9
    assert json.loads((out / "uvc_plan.json").read_text())["dim_multiple"] == 8
