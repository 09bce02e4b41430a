"""Hand-written ViTs (tests/handwritten_vits.py, plain PyTorch) loaded as what they compute.

Each original module's state dict is saved and loaded by vitshrink; on real images (CIFAR-10 or MNIST from
../shared/data) the loaded model's outputs equal the original module's (<= 1e-4), the note says what was
assumed, and the model reloads from its own record with no flags. Then the variants are carried through
``uvc`` at 0.5 (FLOPs ratio, ONNX parity, reload) and ``deit``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import SHARED_DATA
from handwritten_vits import LAYOUTS, LinearPatchAvgPoolViT, TorchEncoderViT
from vitshrink.data import build_transform, make_loader, resolve_data, sample_images
from vitshrink.errors import UserError
from vitshrink.io import data_config, load_model, record_of, save_model
from vitshrink.models.blockwise_vit import as_logits

CIFAR = SHARED_DATA / "cifar10" / "test_1k.tar"
MNIST = SHARED_DATA / "mnist" / "test.tar"
pytestmark = pytest.mark.skipif(not (CIFAR.exists() and MNIST.exists()), reason="shared data not present")

# layout -> (what to tell load_model that the weights cannot: num_heads and ``assume``), 1-channel MNIST or not.
CASES = {
    "torch_encoder": (dict(num_heads=4), False),  # PyTorch's defaults: nothing else to say
    "torch_encoder_gelu": (dict(num_heads=4, assume={"act_layer": "gelu"}), False),
    "torch_encoder_prenorm": (dict(num_heads=4, assume={"norm_placement": "pre"}), False),
    "torch_encoder_prenorm_gelu": (dict(num_heads=4, assume={"norm_placement": "pre", "act_layer": "gelu"}), False),
    "mha_prenorm": (dict(num_heads=4), False),
    "double_projection": (dict(num_heads=4), True),
    "per_head": (dict(assume={"head_softmax": True}), True),  # the head count is in the weights
    "linear_patch_avgpool": (dict(num_heads=4, assume={"norm_placement": "post"}), True),
    "linear_patch_avgpool_norm_after": (dict(num_heads=4, assume={"norm_placement": "post", "fc_norm": True}), True),
    "mlp_head": (dict(num_heads=4), False),
    "linear_linear_head": (dict(num_heads=4), False),  # folded into one Linear
}


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial values in every parameter (LayerNorms start at 1/0), so a misplaced tensor shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for tensor in module.parameters():
            tensor.add_(0.1 * torch.randn_like(tensor))
    return module.eval()


def _save_original(module: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


_IMAGES: dict[str, torch.Tensor] = {}


def _images(model: torch.nn.Module, grey: bool, n: int = 8) -> torch.Tensor:
    """``n`` real images in the model's transform (read once per transform: the tars are slow to index)."""
    cfg = data_config(model)
    key = repr((grey, n, sorted(cfg.items())))
    if key not in _IMAGES:
        _IMAGES[key] = sample_images(cfg, MNIST if grey else CIFAR, n=n)
    return _IMAGES[key]


def _assert_same(original: torch.nn.Module, loaded: torch.nn.Module, images: torch.Tensor) -> None:
    with torch.no_grad():
        expected, got = original(images), loaded(images)
    assert (got - expected).abs().max().item() <= 1e-4
    assert torch.equal(got.argmax(1), expected.argmax(1))


@pytest.mark.parametrize("name", list(CASES))
def test_layout_computes_what_the_original_module_computes(name, tmp_path):
    load_kwargs, grey = CASES[name]
    original = _randomise(LAYOUTS[name]())
    loaded = load_model(_save_original(original, tmp_path / f"{name}.safetensors"), **load_kwargs)
    images = _images(loaded, grey)
    _assert_same(original, loaded, images)
    notes = record_of(loaded).notes
    assert sum(n.startswith("layout recognised") for n in notes) == 1, notes
    # Whatever was not stated is named in a note with the kwarg that would change it.
    stated = set(load_kwargs.get("assume", {}))
    assumed = next((n for n in notes if ": assumed " in n), "")
    for key in {"norm_placement", "act_layer"} - stated:
        assert f"{key}=" in assumed, notes
    again = load_model(save_model(loaded, tmp_path / "converted.safetensors"))  # the record alone rebuilds it
    _assert_same(original, again, images)


def test_transformer_encoder_is_post_norm_relu_unless_told(tmp_path):
    path = _save_original(_randomise(TorchEncoderViT()), tmp_path / "encoder.safetensors")
    loaded = load_model(path, num_heads=4)
    assert ("nn.TransformerEncoder: assumed post-norm (norm_first=False), ReLU, eps 1e-5 (nn.TransformerEncoderLayer's "
            "defaults; the weights cannot tell): norm_placement='post', act_layer='relu', norm_eps=1e-05"
            ) in record_of(loaded).notes
    assert loaded.norm_placement == "post" and isinstance(loaded.blocks[0].mlp.act, torch.nn.ReLU)
    # The same weights trained as norm_first=True are another function: the assumption matters, so it is said.
    prenorm = _randomise(TorchEncoderViT(norm_first=True))
    _save_original(prenorm, path)
    images = _images(loaded, grey=False)
    with torch.no_grad():
        assert (load_model(path, num_heads=4)(images) - prenorm(images)).abs().max() > 1e-2
    told = load_model(path, num_heads=4, assume={"norm_placement": "pre"})
    _assert_same(prenorm, told, images)
    assert not any("post-norm" in n for n in record_of(told).notes)


def test_rgb_linear_patch_embedding_keeps_the_unfold_order(tmp_path):
    original = _randomise(LinearPatchAvgPoolViT(img_size=32, patch_size=4, in_chans=3, pool_norm="before"))
    loaded = load_model(_save_original(original, tmp_path / "rgb.safetensors"), num_heads=4,
                        assume={"norm_placement": "post"})
    _assert_same(original, loaded, _images(loaded, grey=False))
    assert any("(channel, row, column) order" in n for n in record_of(loaded).notes)


def test_softmax_head_outputs_probabilities_and_distillation_takes_their_log(tmp_path):
    original = _randomise(LAYOUTS["per_head"]())
    loaded = load_model(_save_original(original, tmp_path / "probs.safetensors"), assume={"head_softmax": True})
    assert loaded.pos_embed.requires_grad is False  # the sin/cos buffer stays a constant
    images = _images(loaded, grey=True, n=4)
    with torch.no_grad():
        probs = loaded(images)
        logits = loaded.train()(images)  # training mode: the logits the losses need
    loaded.eval()
    torch.testing.assert_close(probs.sum(1), torch.ones(4))
    torch.testing.assert_close(as_logits(loaded, probs).softmax(1), logits.softmax(1), atol=1e-6, rtol=1e-5)


def test_unknown_assumption_is_refused_in_one_line(tmp_path):
    path = _save_original(_randomise(TorchEncoderViT()), tmp_path / "e.safetensors")
    with pytest.raises(UserError, match="assume: unknown setting 'norm_first'"):
        load_model(path, assume={"norm_first": True})
    with pytest.raises(UserError, match="norm_placement must be one of 'pre', 'post'"):
        load_model(path, assume={"norm_placement": "middle"})


# --- through the recipes ----------------------------------------------------------------------------

VARIANTS = {  # post-norm (nn.TransformerEncoder), a shared norm, average pooling without a class token
    "torch_encoder": CASES["torch_encoder"],
    "double_projection": CASES["double_projection"],
    "linear_patch_avgpool": CASES["linear_patch_avgpool"],
}


@pytest.fixture(scope="module")
def variant_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("handwritten")
    models = {}
    for name, (load_kwargs, grey) in VARIANTS.items():
        path = _save_original(_randomise(LAYOUTS[name]()), folder / f"{name}.safetensors")
        models[name] = load_model(path, **load_kwargs)
    return models


def _loader(model: torch.nn.Module, grey: bool, n: int = 32):
    data = resolve_data(MNIST if grey else CIFAR, in_chans=1 if grey else 3)
    data.train.indices = data.train.indices[:: max(1, len(data.train) // n)][:n]
    data.train.transform = build_transform(data_config(model), is_training=False)
    return make_loader(data.train, 16, shuffle=True, workers=0, drop_last=True)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_uvc_half_flops_slices_exports_and_reloads(variant_models, name, tmp_path):
    from vitshrink.export import export_onnx
    from vitshrink.measure import count_flops
    from vitshrink.prune.surgery import mask_vit, slice_vit
    from vitshrink.prune.uvc_search import UVCConfig, search_uvc

    teacher, grey = variant_models[name], VARIANTS[name][1]
    result = search_uvc(teacher, _loader(teacher, grey), UVCConfig(flops_target=0.5, steps=4, log_every=0))
    student = slice_vit(result.model, result.plan).eval()
    ratio = count_flops(student).macs / count_flops(teacher).macs
    assert 0.48 <= ratio <= 0.5 + 1e-9, ratio
    images = _images(teacher, grey)
    with torch.no_grad():
        torch.testing.assert_close(student(images), mask_vit(result.model, result.plan)(images), atol=1e-5, rtol=0)
    assert (student.norm_placement, student.shared_norm) == (teacher.norm_placement, teacher.shared_norm)
    assert (student.cls_token is None) == (teacher.cls_token is None)
    again = load_model(save_model(student, tmp_path / "uvc.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(again(images), student(images), atol=0, rtol=0)
    parity = export_onnx(again, tmp_path / "uvc.onnx", sample=images)
    assert parity.passed and parity.max_abs_diff <= 1e-4


def test_deit_keeps_the_variants_exports_and_reloads(variant_models, tmp_path):
    from distill_support import small_data
    from vitshrink.pipeline import distill

    teacher = variant_models["torch_encoder"]  # post-norm, ReLU, LayerNorm+Linear head
    out = tmp_path / "deit"
    result = distill(teacher, "deit", data=small_data(n_train=32, n_val=16), out_dir=out, epochs=1, batch_size=16,
                     progress=False, workers=0, overrides={"bench_batch_sizes": [1]})
    assert result.report["onnx"]["passed"]
    student = load_model(out / "student.safetensors")  # no flags
    assert record_of(student).name == "vitshrink_vit_distilled"
    assert student.norm_placement == "post" and isinstance(student.blocks[0].mlp.act, torch.nn.ReLU)
    assert len(student.blocks) == 1  # half the teacher's depth
    images = _images(student, grey=False)
    with torch.no_grad():
        assert student(images).shape == (8, 10)


@pytest.mark.parametrize("name", ["per_head", "mlp_head", "linear_patch_avgpool_norm_after"])
def test_head_and_pooling_variants_slice_exactly_and_reload(name, tmp_path):
    from vitshrink.prune.surgery import BlockKeep, mask_vit, slice_vit

    load_kwargs, grey = CASES[name]
    model = load_model(_save_original(_randomise(LAYOUTS[name]()), tmp_path / "m.safetensors"), **load_kwargs)
    plan = [BlockKeep(heads=[0, 2], mlp=list(range(0, 64, 2))), BlockKeep(heads=[], mlp=[1, 5, 9])]
    student = slice_vit(model, plan)
    images = _images(model, grey)
    with torch.no_grad():
        torch.testing.assert_close(student(images), mask_vit(model, plan)(images), atol=1e-5, rtol=0)
    again = load_model(save_model(student, tmp_path / "s.safetensors"))
    for attr in ("head_softmax", "fixed_pos_embed", "norm_placement"):
        assert getattr(again, attr) == getattr(model, attr)
    assert type(again.pre_logits) is type(model.pre_logits) and type(again.fc_norm) is type(model.fc_norm)
    with torch.no_grad():
        torch.testing.assert_close(again(images), student(images), atol=0, rtol=0)
    if name == "per_head":  # a softmax head: the export says its output holds probabilities
        from vitshrink.export import export_onnx

        parity = export_onnx(again, tmp_path / "probs.onnx", sample=images)
        assert parity.passed and parity.outputs == "probabilities"


def test_registers_layerscale_and_qk_norm_with_post_norm_slice_exactly(tmp_path):
    from vitshrink.io import create_model
    from vitshrink.prune.surgery import BlockKeep, mask_vit, slice_vit

    torch.manual_seed(0)
    model = _randomise(create_model("vitshrink_vit", embed_dim=16, block_num_heads=[2, 2], block_head_dims=[8, 8],
                                    block_mlp_hidden=[32, 32], img_size=16, patch_size=4, num_classes=5,
                                    reg_tokens=2, init_values=0.5, qk_norm=True, norm_placement="post",
                                    shared_norm=True, act_layer="silu"))
    plan = [BlockKeep(heads=[1], mlp=list(range(0, 32, 3))), None]
    student = slice_vit(model, plan)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(student(x), mask_vit(model, plan)(x), atol=1e-5, rtol=0)
    again = load_model(save_model(student, tmp_path / "s.safetensors"))
    assert again.num_reg_tokens == 2 and again.blocks[0].attn.q_norm.weight.shape == (8,)
    with torch.no_grad():
        torch.testing.assert_close(again(x), student(x), atol=0, rtol=0)
