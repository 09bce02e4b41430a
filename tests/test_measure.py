"""MACs/FLOPs against hand formulas and library figures; benchmark output on torch and ONNX.

MAC convention under test (vitshrink.measure): conv, linear, matmul/bmm and attention products
(Q@K^T and attn@V) at batch 1; norms, activations, softmax, bias and residual adds are not counted.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from vitshrink.errors import UserError
from vitshrink.export import export_onnx
from vitshrink.io import create_model
from vitshrink.measure import (benchmark, compare, count_flops, count_onnx_macs, count_onnx_params, count_params,
                               torch_latency)


def vit_block_macs(n_tokens: int, dim: int, heads: int, head_dim: int, hidden: int) -> int:
    inner = heads * head_dim
    return (n_tokens * dim * 3 * inner          # qkv
            + n_tokens * n_tokens * inner       # Q @ K^T
            + n_tokens * n_tokens * inner       # attn @ V
            + n_tokens * inner * dim            # proj
            + 2 * n_tokens * dim * hidden)      # fc1 + fc2


def vit_macs(img: int, patch: int, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0,
             num_classes: int = 1000, in_chans: int = 3) -> int:
    n_patches = (img // patch) ** 2
    n_tokens = n_patches + 1  # class token
    patch_embed = n_patches * dim * in_chans * patch * patch
    blocks = depth * vit_block_macs(n_tokens, dim, heads, dim // heads, int(dim * mlp_ratio))
    return patch_embed + blocks + dim * num_classes


@pytest.mark.parametrize("name,dim,heads,img", [
    ("deit_tiny_patch16_224", 192, 3, 224),
    ("deit_tiny_patch16_224", 192, 3, 448),
    ("vit_small_patch16_224", 384, 6, 224),
    ("vit_small_patch16_224", 384, 6, 448),
])
def test_vit_macs_match_analytic_formula_with_attention(name, dim, heads, img):
    # deit_tiny runs real CPU kernels (the fused CPU attention op other counters miss); vit_small is
    # built on the meta device (counting needs shapes only), which keeps this test fast.
    with torch.device("meta" if name.startswith("vit_small") else "cpu"):
        model = create_model(name, img_size=img)
    count = count_flops(model)  # input size from the model's data config (img x img)
    expected = vit_macs(img, 16, dim, 12, heads)
    assert count.input_size == (3, img, img)
    assert abs(count.macs - expected) / expected < 0.005
    assert count.macs == expected  # the convention counts exactly these products
    assert count.flops == 2 * count.macs
    # Fused kernel on CPU; on the meta device SDPA decomposes into bmm (Q @ K^T and attn @ V).
    attention = sum(n for op, n in count.by_op.items() if "scaled_dot_product" in op or op == "aten.bmm")
    n_tokens = (img // 16) ** 2 + 1
    assert attention == 12 * 2 * n_tokens * n_tokens * dim
    if (name, img) == ("deit_tiny_patch16_224", 224):
        assert count.gmacs == pytest.approx(1.2537, abs=1e-4)  # not the 1.075 of counters that miss attention


def test_resnet18_matches_torchvision_published_figure():
    # torchvision's ResNet18_Weights.IMAGENET1K_V1.meta["_ops"] = 1.814 (labelled GFLOPS there, counted as MACs).
    from torchvision.models import ResNet18_Weights

    published = ResNet18_Weights.IMAGENET1K_V1.meta["_ops"]
    count = count_flops(create_model("resnet18"), (3, 224, 224))
    assert count.gmacs == pytest.approx(published, abs=0.001)
    assert count.by_module["fc"] == 512 * 1000


class ExplicitOrFusedAttention(nn.Module):
    """Attention with its own head count and head dim (as a pruned block has), not timm's class."""

    def __init__(self, dim: int, heads: int, head_dim: int, explicit: bool):
        super().__init__()
        self.heads, self.head_dim, self.explicit = heads, head_dim, explicit
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor, **block_kwargs) -> torch.Tensor:  # timm passes attn_mask, is_causal
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.explicit:
            attn = ((q * self.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


def test_per_block_dims_and_custom_attention_are_counted_at_op_level():
    model = create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2,
                         num_classes=10)
    model.blocks[0].attn = ExplicitOrFusedAttention(64, heads=3, head_dim=10, explicit=True)
    model.blocks[1].attn = ExplicitOrFusedAttention(64, heads=5, head_dim=8, explicit=False)
    model.blocks[1].mlp = Mlp(64, hidden_features=100)
    n = 8 * 8 + 1
    expected = (64 * 64 * 3 * 16 + vit_block_macs(n, 64, 3, 10, 256) + vit_block_macs(n, 64, 5, 8, 100) + 64 * 10)
    count = count_flops(model)
    assert count.macs == expected
    assert count.by_module["blocks.1.mlp"] == 2 * n * 64 * 100


def test_explicit_and_fused_timm_attention_count_the_same():
    model = create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2)
    fused = count_flops(model).macs
    for block in model.blocks:
        block.attn.fused_attn = False  # timm's q @ k^T path
    assert count_flops(model).macs == fused == vit_macs(32, 4, 64, 2, 2)


def test_small_cnn_with_groups_and_stride_matches_hand_count():
    cnn = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    expected = 32 * 32 * 16 * 3 * 9 + 16 * 16 * 32 * (16 // 2) * 9 + 32 * 10
    count = count_flops(cnn, (3, 32, 32))
    assert count.macs == expected
    assert count.gflops == pytest.approx(2 * expected / 1e9)


def test_count_params_counts_shared_weights_once():
    layer = nn.Linear(10, 5)
    tied = nn.Sequential(layer, nn.ReLU(), nn.Linear(5, 10))
    tied.add_module("again", layer)
    assert count_params(layer) == 55
    assert count_params(tied) == 55 + 60


def test_count_flops_restores_training_mode():
    model = create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    model.train()
    count_flops(model)
    assert all(m.training for m in model.modules())


def _tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2,
                         num_classes=10)
    with torch.no_grad():  # distinct values everywhere, as in a trained model (see count_onnx_params)
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model


LATENCY_FIELDS = {"batch_size", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput_ips", "iters"}


def test_benchmark_torch_model_reports_every_field_as_json():
    model = _tiny_vit()
    threads_before = torch.get_num_threads()
    result = benchmark(model, batch_sizes=(1, 3), threads=1, warmup=1, min_time_s=0.02)
    assert torch.get_num_threads() == threads_before
    json.loads(json.dumps(result))  # JSON-serialisable
    count = count_flops(model)
    assert result["name"] == "vit_tiny_patch16_224"
    assert result["params"] == count_params(model)
    assert (result["macs"], result["flops"]) == (count.macs, 2 * count.macs)
    assert result["gmacs"] == pytest.approx(count.macs / 1e9) and result["gflops"] == pytest.approx(2 * result["gmacs"])
    assert result["input_size"] == [3, 32, 32] and result["threads"] == 1
    assert result["runtimes"]["onnxruntime"]["provider"] == "CPUExecutionProvider"
    assert result["runtimes"]["torch"]["device"] == "cpu"
    for runtime in ("onnxruntime", "torch"):
        batches = result["runtimes"][runtime]["batches"]
        assert [b["batch_size"] for b in batches] == [1, 3]
        for stats in batches:
            assert set(stats) == LATENCY_FIELDS
            assert stats["iters"] >= 3
            assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
            assert stats["throughput_ips"] == pytest.approx(stats["batch_size"] * 1e3 / stats["mean_ms"])


def test_benchmark_onnx_path_counts_params_and_macs_from_the_file(tmp_path):
    model = _tiny_vit()
    path = tmp_path / "vit.onnx"
    export_onnx(model, path, check=False)
    assert count_onnx_params(path) == count_params(model)
    onnx_count, reason = count_onnx_macs(path)
    assert reason is None and onnx_count.macs == count_flops(model).macs
    result = benchmark(path, batch_sizes=(2,), warmup=1, iters=4)
    json.dumps(result)
    assert result["name"] == "vit" and result["source"] == str(path)
    assert result["params"] == count_params(model) and result["macs"] == onnx_count.macs
    assert result["input_size"] == [3, 32, 32]
    assert "skipped" in result["runtimes"]["torch"]
    (stats,) = result["runtimes"]["onnxruntime"]["batches"]
    assert stats["batch_size"] == 2 and stats["iters"] == 4


def test_compare_gives_candidate_over_baseline_ratios():
    base = {"name": "teacher", "params": 200, "macs": 1000,
            "runtimes": {"torch": {"batches": [{"batch_size": 1, "p50_ms": 4.0, "throughput_ips": 250.0}]}}}
    cand = {"name": "student", "params": 50, "macs": 400,
            "runtimes": {"torch": {"batches": [{"batch_size": 1, "p50_ms": 1.0, "throughput_ips": 1000.0},
                                               {"batch_size": 8, "p50_ms": 3.0, "throughput_ips": 2666.0}]}}}
    ratios = compare(cand, base)
    assert ratios["params_ratio"] == 0.25 and ratios["macs_ratio"] == 0.4
    assert ratios["runtimes"]["torch"] == {"1": {"latency_p50_ratio": 0.25, "speedup_p50": 4.0,
                                                 "throughput_ratio": 4.0}}


def test_torch_latency_honours_fixed_iters():
    model = _tiny_vit()
    stats = torch_latency(model, 2, warmup=0, iters=5)
    assert stats.iters == 5 and stats.batch_size == 2 and stats.p50_ms > 0


def test_benchmark_rejects_unknown_runtime_and_bad_batch():
    model = _tiny_vit()
    with pytest.raises(UserError, match="runtime"):
        benchmark(model, runtimes=("tensorrt",))
    with pytest.raises(UserError, match="batch"):
        benchmark(model, batch_sizes=(0,))
