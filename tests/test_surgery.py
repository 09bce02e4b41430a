"""Physical ViT slicing: the sliced model computes the masked model's function, with smaller tensors."""
from __future__ import annotations

import pytest
import torch

from vitshrink.data import build_transform, make_loader, resolve_data
from vitshrink.errors import UserError
from vitshrink.io import create_model, data_config, load_model, record_of, save_model
from vitshrink.measure import count_flops, count_params
from vitshrink.prune.surgery import (BlockKeep, block_dims, drop_blocks, full_plan, head_norms, mask_vit, mlp_unit_norms,
                               plan_from_json, plan_to_json, slice_vit, uniform_plan)


def _tiny_vit(**overrides):
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)
    kwargs.update(overrides)
    model = create_model("vit_tiny_patch16_224", **kwargs)
    # Random init is near-degenerate (tiny weights): spread the weights so that every unit matters.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def images():
    model = _tiny_vit()
    val = resolve_data().val
    val.transform = build_transform(data_config(model), is_training=False)
    batch, _, _ = next(iter(make_loader(val, 16, workers=0)))
    return batch


MIXED_PLAN = [
    BlockKeep(heads=[0, 2], mlp=list(range(0, 192, 3)), head_dims=[[0, 3, 5, 7, 9, 11, 13, 15], list(range(1, 9))]),
    None,
    BlockKeep(heads=[], mlp=[1, 5, 100]),
    BlockKeep(heads=[1], mlp=[]),
]


@pytest.mark.parametrize("overrides", [{}, {"init_values": 0.1, "reg_tokens": 1}, {"global_pool": "avg", "class_token": False}])
def test_sliced_equals_masked(images, overrides):
    model = _tiny_vit(**overrides)
    sliced = slice_vit(model, MIXED_PLAN)
    masked = mask_vit(model, MIXED_PLAN)
    with torch.no_grad():
        out_sliced, out_masked, out_full = sliced(images), masked(images), model(images)
    torch.testing.assert_close(out_sliced, out_masked, atol=1e-5, rtol=0)
    assert (out_sliced - out_full).abs().max() > 1e-2  # pruning did change the function
    assert sliced.block_num_heads == [2, 0, 1]
    assert sliced.block_head_dims == [8, 0, 16]
    assert sliced.block_mlp_hidden == [64, 3, 0]
    assert sliced.kept_blocks == [0, 2, 3]


def test_sliced_tensors_are_physically_smaller_and_flops_shrink():
    model = _tiny_vit()
    sliced = slice_vit(model, MIXED_PLAN)
    assert len(sliced.blocks) == 3
    assert sliced.blocks[0].attn.qkv.weight.shape == (3 * 2 * 8, 48)
    assert sliced.blocks[0].attn.proj.weight.shape == (48, 16)
    assert sliced.blocks[0].mlp.fc1.weight.shape == (64, 48)
    assert sliced.blocks[0].mlp.fc2.weight.shape == (48, 64)
    assert sliced.blocks[1].attn is None and sliced.blocks[2].mlp is None
    assert "blocks.1.attn.qkv.weight" not in sliced.state_dict()
    assert count_params(sliced) < count_params(model)
    assert count_flops(sliced).macs < 0.5 * count_flops(model).macs


def test_full_plan_is_exact_conversion(images):
    model = _tiny_vit(init_values=0.1)
    converted = slice_vit(model, full_plan(model))
    torch.testing.assert_close(converted(images), model(images), atol=1e-5, rtol=0)
    assert count_flops(converted).macs == count_flops(model).macs


def test_round_trip_save_load(tmp_path, images):
    model = _tiny_vit()
    record_of(model).class_names = [f"c{i}" for i in range(10)]
    sliced = slice_vit(model, MIXED_PLAN)
    path = save_model(sliced, tmp_path / "sliced.safetensors", provenance={"recipe": "test"})
    again = load_model(path)
    assert type(again).__name__ == "BlockwiseVisionTransformer"
    assert again.block_head_dims == [8, 0, 16] and again.kept_blocks == [0, 2, 3]
    assert record_of(again).class_names[0] == "c0"
    assert data_config(again)["input_size"] == (3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(images), sliced(images))


def test_uniform_plan_keeps_largest_groups_everywhere(images):
    model = _tiny_vit()
    with torch.no_grad():
        model.blocks[0].attn.proj.weight[:, 16:32] *= 10  # head 1 of block 0 becomes the largest
    plan = uniform_plan(model, 0.5)
    assert [len(k.heads) for k in plan] == [2, 2, 2, 2]
    assert [len(k.mlp) for k in plan] == [96] * 4
    assert 1 in plan[0].heads
    norms = mlp_unit_norms(model.blocks[2])
    dropped = sorted(set(range(192)) - set(plan[2].mlp))
    assert norms[plan[2].mlp].min() >= norms[dropped].max()
    assert head_norms(model.blocks[0]).argmax().item() == 1
    sliced = slice_vit(model, plan)
    torch.testing.assert_close(sliced(images), mask_vit(model, plan)(images), atol=1e-5, rtol=0)
    assert plan_from_json(plan_to_json(plan)) == plan


def test_drop_blocks_and_slicing_a_pruned_model_again(images):
    model = _tiny_vit()
    shallow = drop_blocks(model, [1, 3])
    assert shallow.kept_blocks == [0, 2] and len(shallow.blocks) == 2
    torch.testing.assert_close(shallow(images), mask_vit(model, [full_plan(model)[0], None, full_plan(model)[2], None])(images),
                               atol=1e-5, rtol=0)
    # A vitshrink_vit is itself sliceable; kept_blocks keeps pointing at the original teacher.
    sliced = slice_vit(model, MIXED_PLAN)
    again = slice_vit(sliced, [None, BlockKeep(heads=[], mlp=[0]), BlockKeep(heads=[0], mlp=[])])
    assert again.kept_blocks == [2, 3]
    assert [d.mlp_hidden for d in block_dims(again)] == [1, 0]
    with pytest.raises(UserError):
        drop_blocks(model, [4])


def test_unsliceable_models_raise_user_error():
    with pytest.raises(UserError, match="VisionTransformer"):
        slice_vit(create_model("cifar_resnet20"), [])
    qk = _tiny_vit(qk_norm=True)
    plan = [BlockKeep(heads=[0], mlp=[0], head_dims=[[0, 1]])] + full_plan(qk)[1:]
    with pytest.raises(UserError, match="narrow"):
        slice_vit(qk, plan)
    heads_only = [BlockKeep(heads=[0, 1], mlp=list(range(10)))] + full_plan(qk)[1:]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(slice_vit(qk, heads_only)(x), mask_vit(qk, heads_only)(x), atol=1e-5, rtol=0)
