"""CiT (Co-advise student): tokens and heads as the official code, three outputs in training, one at eval,
ONNX parity, save/reload from the safetensors record, initialisation from a user's ViT teacher."""
from __future__ import annotations

import onnx
import pytest
import timm
import torch

from vitshrink.data import sample_images
from vitshrink.errors import UserError
from vitshrink.export import export_onnx
from vitshrink.io import create_model, data_config, load_model, save_model
from vitshrink.models.cit import CrossInductiveViT, checkpoint_filter_fn, cit_from_vit_teacher


def tiny_cit(**kwargs) -> CrossInductiveViT:
    torch.manual_seed(0)
    args = dict(embed_dim=64, depth=2, num_heads=2, stem_chs=32, num_classes=10)
    return create_model("cit_tiny_patch4_32", **{**args, **kwargs})


def official_forward(model: CrossInductiveViT, x: torch.Tensor):
    """Reference transcription of OliverRensu/co-advise models.py ``DistilledVisionTransformer.forward_features``
    and ``forward`` (conv_embed/inv_embed = our patch_embed.conv/inv), run on ``model``'s modules."""
    B = x.shape[0]
    x_conv = model.patch_embed.conv(x)
    x_inv = model.patch_embed.inv(x)
    cls_tokens = model.cls_token.expand(B, -1, -1)
    conv_token = x_conv.mean(1, keepdim=True)
    inv_token = x_inv.mean(1, keepdim=True)
    x = torch.cat((cls_tokens, conv_token, inv_token, x_conv + x_inv), dim=1)
    x = x + model.pos_embed
    x = model.pos_drop(x)
    for blk in model.blocks:
        x = blk(x)
    x = model.norm(x)
    x, x_conv, x_inv = x[:, 0], x[:, 1], x[:, 2]
    x, x_conv, x_inv = model.head(x), model.head_conv(x_conv), model.head_inv(x_inv)
    if model.training:
        return x, x_conv, x_inv
    return (x + x_conv + x_inv) / 3


def test_three_outputs_in_training_one_average_at_eval_as_the_official_code():
    model = tiny_cit()
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        out, ref = model(x), official_forward(model, x)
    assert out.shape == (4, 10) and (out - ref).abs().max().item() <= 1e-6
    model.train()
    torch.manual_seed(1)
    outs = model(x)
    refs = official_forward(model, x)  # train-mode BN: batch statistics, same batch -> same numbers
    assert isinstance(outs, tuple) and len(outs) == 3 and all(o.shape == (4, 10) for o in outs)
    for o, r in zip(outs, refs):
        assert (o - r).abs().max().item() <= 1e-5
    model.set_distilled_training(False)
    assert model(x).shape == (4, 10)


def test_token_layout_and_position_embeddings():
    model = tiny_cit().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.patch_embed(x)
        conv, inv = model.patch_embed.conv(x), model.patch_embed.inv(x)
    assert tokens.shape == (2, 2 + 64, 64) and model.pos_embed.shape == (1, 3 + 64, 64)
    assert torch.allclose(tokens[:, 0], conv.mean(1)) and torch.allclose(tokens[:, 1], inv.mean(1))
    assert torch.allclose(tokens[:, 2:], conv + inv)
    assert model.num_prefix_tokens == 3
    final, inter = model.forward_intermediates(x, indices=[1])
    assert inter[0].shape == (2, 64, 8, 8) and final.shape == (2, 67, 64)


@pytest.mark.parametrize("name,grid,stride,kernel,proj", [
    ("cit_tiny_patch16_224", 14, 2, 7, 8),  # the paper: 7x7/2 stem, 8x8/8 projection
    ("cit_tiny_patch4_32", 8, 1, 3, 4),     # ours for 32 px: 3x3/1 stem, 4x4/4 projection
])
def test_stem_strides_fit_the_input(name, grid, stride, kernel, proj):
    with torch.device("meta"):
        model = timm.create_model(name)
    embed = model.patch_embed
    assert embed.grid_size == (grid, grid) and embed.num_patches == grid * grid
    assert embed.conv.conv[0].stride == (stride, stride) and embed.conv.conv[0].kernel_size == (kernel, kernel)
    assert embed.inv.stem[0].conv.stride == (stride, stride)
    assert embed.conv.proj.stride == (proj, proj) and embed.inv.proj.kernel_size == (proj, proj)
    assert model.pos_embed.shape[1] == grid * grid + 3


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        create_model("cit_tiny_patch4_32", img_size=30, depth=1)
    with pytest.raises(ValueError, match="global_pool"):
        create_model("cit_tiny_patch4_32", global_pool="avg", depth=1)


def test_onnx_export_has_one_output_and_parity(tmp_path):
    model = tiny_cit().eval()
    sample = sample_images(data_config(model), None, n=4)
    result = export_onnx(model, tmp_path / "cit.onnx", sample=sample)
    assert result.passed and result.max_abs_diff <= 1e-4
    proto = onnx.load(str(tmp_path / "cit.onnx"))
    assert [o.name for o in proto.graph.output] == ["logits"]


def test_saved_and_reloaded_from_the_record_alone(tmp_path):
    model = tiny_cit().eval()
    path = save_model(model, tmp_path / "cit.safetensors")
    again = load_model(path)
    assert isinstance(again, CrossInductiveViT) and data_config(again)["input_size"] == (3, 32, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_official_checkpoint_names_are_renamed():
    model = tiny_cit()
    official = {k.replace("patch_embed.conv.", "conv_embed.").replace("patch_embed.inv.", "inv_embed."): v
                for k, v in model.state_dict().items()}
    assert any(k.startswith("inv_embed.stem.1.conv2.conv") for k in official)
    model.load_state_dict(checkpoint_filter_fn({"model": official}), strict=True)


def test_cit_from_vit_teacher_takes_derived_blocks_and_heads():
    torch.manual_seed(0)
    teacher = create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2,
                           num_classes=10).eval()
    cit = cit_from_vit_teacher(teacher, stem_chs=32)
    assert len(cit.blocks) == 2 and cit.embed_dim == 64 and cit.num_classes == 10
    t_state, c_state = teacher.state_dict(), cit.state_dict()
    for j, i in enumerate([0, 3]):  # kept_blocks(4, 2): first and last
        assert torch.equal(c_state[f"blocks.{j}.attn.qkv.weight"], t_state[f"blocks.{i}.attn.qkv.weight"])
    for head in ("head", "head_conv", "head_inv"):
        assert torch.equal(c_state[f"{head}.weight"], t_state["head.weight"])
    pos_t, pos_c = t_state["pos_embed"], c_state["pos_embed"]
    assert torch.equal(pos_c[:, 0], pos_t[:, 0]) and torch.allclose(pos_c[:, 3:], pos_t[:, 1:])
    assert torch.allclose(pos_c[:, 1], pos_t[:, 1:].mean(1))
    assert data_config(cit)["mean"] == data_config(teacher)["mean"]
    cit.eval()
    assert cit(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(UserError, match="not a ViT"):
        cit_from_vit_teacher(create_model("cifar_resnet20"))


def test_student_spec_naming_a_cit_starts_from_the_vit_teacher():
    from vitshrink.students import resolve_student

    torch.manual_seed(0)
    teacher = create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2,
                           num_classes=10).eval()
    student = resolve_student("cit_tiny_patch4_32:embed_dim=64,depth=2,num_heads=2,stem_chs=32", teacher)
    assert torch.equal(student.state_dict()["blocks.1.mlp.fc1.weight"], teacher.state_dict()["blocks.3.mlp.fc1.weight"])
    with pytest.raises(UserError, match="widths differ"):
        resolve_student("cit_tiny_patch4_32:embed_dim=96,depth=2,num_heads=2", teacher)
    cnn_student = resolve_student("cit_tiny_patch4_32:embed_dim=64,depth=1,num_heads=2", create_model("cifar_resnet20"))
    assert isinstance(cnn_student, CrossInductiveViT)  # a CNN teacher has nothing to copy: left as created
