"""Foreign ViT layouts: each original module is built from its own library (torchvision, vit-pytorch) or written
here with the quirks users' checkpoints have; its state dict is saved, loaded by vitshrink, and the logits are
compared with the original module's forward on real CIFAR-10 images (<= 1e-4), then exported to ONNX with parity."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import CIFAR_TEST_1K
from vitshrink.data import sample_images
from vitshrink.errors import UserError
from vitshrink.export import export_onnx
from vitshrink.io import data_config, load_model, record_of

pytestmark = pytest.mark.skipif(not CIFAR_TEST_1K.exists(), reason="shared CIFAR-10 test_1k not present")


def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values everywhere (libraries initialise some to zero or one), so a misplaced tensor shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for tensor in module.parameters():
            tensor.add_(0.05 * torch.randn_like(tensor))
    return module.eval()


def _check_against_original(original: nn.Module, spec: Path, tmp_path: Path, **load_kwargs) -> nn.Module:
    """vitshrink's model gives the original's logits on real images, and its ONNX file passes parity."""
    loaded = load_model(spec, **load_kwargs)
    images = sample_images(data_config(loaded), CIFAR_TEST_1K, n=8)
    with torch.no_grad():
        expected = original.eval()(images)
        got = loaded(images)
    max_diff = (got - expected).abs().max().item()
    assert max_diff <= 1e-4, max_diff
    assert (got.argmax(1) == expected.argmax(1)).all()
    result = export_onnx(loaded, tmp_path / "converted.onnx", sample=images)
    assert result.passed and result.max_abs_diff <= 1e-4
    return loaded


def _layout_note(model: nn.Module) -> str:
    notes = [n for n in record_of(model).notes if n.startswith("layout recognised")]
    assert len(notes) == 1, record_of(model).notes
    return notes[0]


# --- torchvision -------------------------------------------------------------------------------------

def test_torchvision_vit_loads_without_arch_and_matches(tmp_path):
    from torchvision.models import VisionTransformer

    original = _randomise(VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=4, hidden_dim=64,
                                            mlp_dim=128, num_classes=10))
    path = tmp_path / "torchvision_vit.pth"
    torch.save(original.state_dict(), path)
    loaded = _check_against_original(original, path, tmp_path, num_heads=4)
    note = _layout_note(loaded)
    assert "torchvision VisionTransformer" in note and "nn.MultiheadAttention" in note and "Sequential MLP" in note
    assert any("--arch vit_base_patch16_224 assumed" in n for n in record_of(loaded).notes)
    assert record_of(loaded).kwargs["embed_dim"] == 64 and record_of(loaded).kwargs["depth"] == 2
    assert data_config(loaded)["mean"] == (0.485, 0.456, 0.406)  # torchvision's ImageNet normalisation


# --- vit-pytorch -------------------------------------------------------------------------------------

@pytest.mark.parametrize("pool, dim_head", [("cls", 16), ("mean", 16), ("cls", 32)])
def test_vit_pytorch_vit_matches(tmp_path, pool, dim_head):
    vit_pytorch = pytest.importorskip("vit_pytorch")
    original = _randomise(vit_pytorch.ViT(image_size=32, patch_size=4, num_classes=10, dim=64, depth=2, heads=4,
                                          mlp_dim=128, pool=pool, dim_head=dim_head))
    path = tmp_path / "vit_pytorch.pt"
    torch.save(original.state_dict(), path)
    loaded = _check_against_original(original, path, tmp_path, num_heads=4)
    assert "vit-pytorch ViT" in _layout_note(loaded)
    assert any(n.startswith("mean/std") and "pass --mean/--std" in n for n in record_of(loaded).notes)
    kwargs = record_of(loaded).kwargs
    assert kwargs["norm_eps"] == 1e-5 and kwargs["patch_embed"] == "pixel_norm"
    assert getattr(loaded, "cls_token", None) is (None if pool == "mean" else loaded.cls_token)
    if dim_head * 4 != 64:  # attention width 128 on a width-64 model: built as vitshrink_vit
        assert record_of(loaded).name == "vitshrink_vit" and kwargs["block_head_dims"] == [32, 32]
    again = load_model(_save(loaded, tmp_path))  # the record rebuilds the converted model with no flags
    torch.testing.assert_close(again(torch.ones(1, 3, 32, 32)), loaded(torch.ones(1, 3, 32, 32)), rtol=0, atol=0)


def _save(model: nn.Module, tmp_path: Path) -> Path:
    from vitshrink.io import save_model

    return save_model(model, tmp_path / "converted.safetensors")


# --- hand-written modules ----------------------------------------------------------------------------

class HandAttention(nn.Module):
    """Separate query/key/value linears (key without bias), as many hand-written ViTs have."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        split = lambda t: t.reshape(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        attn = (q @ k.transpose(-2, -1) / math.sqrt(dim // self.heads)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(batch, tokens, dim))


class HandBlock(nn.Module):
    def __init__(self, dim: int, heads: int, attention: str, mlp_names: tuple[str, str] | None):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)  # eps 1e-5, not timm's 1e-6
        self.attention = attention
        self.attn = HandAttention(dim, heads) if attention == "qkv" else nn.MultiheadAttention(dim, heads,
                                                                                               batch_first=True)
        if mlp_names is None:
            self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        else:
            self.mlp = nn.Module()
            self.mlp.add_module(mlp_names[0], nn.Linear(dim, 2 * dim))
            self.mlp.add_module(mlp_names[1], nn.Linear(2 * dim, dim))
            self.mlp.forward = lambda x: getattr(self.mlp, mlp_names[1])(  # noqa: E731
                nn.functional.gelu(getattr(self.mlp, mlp_names[0])(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + (self.attn(y) if self.attention == "qkv" else self.attn(y, y, y, need_weights=False)[0])
        return x + self.mlp(self.norm2(x))


class HandViT(nn.Module):
    """A hand-written ViT: conv patches named patch_embedding, no class token (global average pooling)."""

    def __init__(self, attention: str = "qkv", mlp_names: tuple[str, str] | None = None, dim: int = 64):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, dim, 4, 4)
        self.pos_embedding = nn.Parameter(torch.zeros(1, 64, dim))
        self.blocks = nn.ModuleList([HandBlock(dim, 4, attention, mlp_names) for _ in range(2)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(x).flatten(2).transpose(1, 2) + self.pos_embedding
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


@pytest.mark.parametrize("attention", ["qkv", "mha"])
def test_hand_written_vit_with_split_qkv_or_mha_sequential_mlp_gap_and_eps(tmp_path, attention):
    original = _randomise(HandViT(attention))
    path = tmp_path / "hand.safetensors"
    save_file(original.state_dict(), str(path))
    loaded = _check_against_original(original, path, tmp_path, arch="vit_tiny_patch16_224", num_heads=4,
                                     norm_eps=1e-5)
    note = _layout_note(loaded)
    assert ("separate q/k/v fused into qkv" if attention == "qkv" else "nn.MultiheadAttention") in note
    assert "Sequential MLP" in note
    assert loaded.cls_token is None and loaded.global_pool == "avg" and loaded.norm.eps == 1e-5


def test_timm_checkpoint_filter_fn_layout_openclip_trunk(tmp_path):
    from vitshrink.io import create_model

    original = _randomise(create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=2,
                                       num_heads=4, num_classes=10))
    path = tmp_path / "open_clip.safetensors"
    save_file({f"visual.trunk.{k}": v for k, v in original.state_dict().items()}, str(path))
    loaded = _check_against_original(original, path, tmp_path, arch="vit_tiny_patch16_224", num_heads=4)
    assert "checkpoint_filter_fn" in _layout_note(loaded)


# --- --key-map and the mismatch suggestion ------------------------------------------------------------

def test_unforeseen_names_get_a_key_map_suggestion_that_works(tmp_path):
    original = _randomise(HandViT("qkv", mlp_names=("lin_a", "lin_b")))
    path = tmp_path / "odd.safetensors"
    save_file(original.state_dict(), str(path))
    with pytest.raises(UserError) as info:
        load_model(path, arch="vit_tiny_patch16_224", num_heads=4, norm_eps=1e-5)
    message = str(info.value)
    assert "\n" not in message and "odd.safetensors" in message
    assert "looks like blocks." in message and "try --key-map" in message
    assert "blocks.0.mlp.fc" in info.value.details and "blocks.1.mlp.lin_b.bias (64,)" in info.value.details
    suggested = message.split("try --key-map '")[1].split("'")[0]
    assert suggested in (r"mlp\.lin_a\.=mlp.fc1.", r"mlp\.lin_b\.=mlp.fc2.")
    _check_against_original(original, path, tmp_path, arch="vit_tiny_patch16_224", num_heads=4, norm_eps=1e-5,
                            key_map=[r"mlp\.lin_a\.=mlp.fc1.", r"mlp\.lin_b\.=mlp.fc2."])


def test_key_map_errors_are_one_line(tmp_path):
    path = tmp_path / "any.safetensors"
    save_file({"a.weight": torch.zeros(2, 2), "b.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(UserError, match=r"--key-map 'nothing': expected REGEX=REPLACEMENT"):
        load_model(path, arch="vit_tiny_patch16_224", key_map=["nothing"])
    with pytest.raises(UserError, match=r"invalid regular expression"):
        load_model(path, arch="vit_tiny_patch16_224", key_map=["(=x"])
    with pytest.raises(UserError, match=r"maps two tensors onto c.weight"):
        load_model(path, arch="vit_tiny_patch16_224", key_map=[r"^[ab]\.=c."])
    with pytest.raises(UserError, match=r"--norm-eps must be a number in \(0, 1\)"):
        load_model(path, arch="vit_tiny_patch16_224", norm_eps=0)
