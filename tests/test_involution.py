"""Involution and RedNet: the operator against a naive loop and the official unfold code, RedNet sizes, export."""
from __future__ import annotations

import onnx
import pytest
import timm
import torch
import torch.nn.functional as F

from vitshrink.data import sample_images
from vitshrink.export import export_onnx
from vitshrink.io import create_model, data_config, load_model, save_model
from vitshrink.models.involution import Involution, RedNet, checkpoint_filter_fn, involution_weighted_sum


def naive_involution(x: torch.Tensor, kernel: torch.Tensor, k: int, stride: int) -> torch.Tensor:
    """The definition, one output pixel at a time (zero padding (k-1)//2)."""
    b, c, h, w = x.shape
    groups, (ho, wo) = kernel.shape[1], kernel.shape[-2:]
    pad = (k - 1) // 2
    xp = F.pad(x, (pad, pad, pad, pad))
    out = torch.zeros(b, c, ho, wo, dtype=x.dtype)
    for ch in range(c):
        g = ch // (c // groups)
        for i in range(ho):
            for j in range(wo):
                patch = xp[:, ch, i * stride:i * stride + k, j * stride:j * stride + k].reshape(b, k * k)
                out[:, ch, i, j] = (patch * kernel[:, g, :, i, j]).sum(1)
    return out


def official_involution_forward(module: Involution, x: torch.Tensor) -> torch.Tensor:
    """Reference transcription of d-li14/involution cls/mmcls/models/utils/involution_naive.py ``forward``
    (ConvModule = conv -> BN -> ReLU; kernel from AvgPool2d(stride) without ceil_mode), using ``module``'s weights."""
    k, s, groups, gc = module.kernel_size, module.stride, module.groups, module.group_channels
    pooled = x if s == 1 else F.avg_pool2d(x, s, s)
    weight = module.conv2.conv(module.conv1.activate(module.conv1.bn(module.conv1.conv(pooled))))
    b, c, h, w = weight.shape
    weight = weight.view(b, groups, k ** 2, h, w).unsqueeze(2)
    out = F.unfold(x, k, 1, (k - 1) // 2, s).view(b, groups, gc, k ** 2, h, w)
    return (weight * out).sum(dim=3).view(b, module.channels, h, w)


@pytest.mark.parametrize("exporting", [False, True], ids=["sliced", "unfold-for-export"])
@pytest.mark.parametrize("kernel_size,stride,size", [(3, 1, 7), (7, 1, 8), (7, 2, 8), (7, 2, 9), (3, 2, 5)])
def test_involution_equals_naive_loop(kernel_size, stride, size, exporting, monkeypatch):
    # Eager runs use K*K shifted slices; graph export takes the unfold path: both must equal the definition.
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: exporting)
    torch.manual_seed(0)
    module = Involution(32, kernel_size, stride).eval()
    x = torch.randn(2, 32, size, size)
    with torch.no_grad():
        out = module(x)
        expected = naive_involution(x, module.generate_kernel(x), kernel_size, stride)
    assert out.shape == (2, 32, -(-size // stride), -(-size // stride))
    assert (out - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kernel_size,stride", [(7, 1), (7, 2), (3, 1)])
def test_involution_matches_official_unfold_code(kernel_size, stride):
    torch.manual_seed(1)
    module = Involution(64, kernel_size, stride)
    module.conv1.bn.running_mean.uniform_(-0.5, 0.5)
    module.conv1.bn.running_var.uniform_(0.5, 2.0)
    module.eval()
    x = torch.randn(3, 64, 16, 16)
    with torch.no_grad():
        diff = (module(x) - official_involution_forward(module, x)).abs().max().item()
    assert diff <= 1e-5  # measured: ~1e-6 (summation order)


def test_involution_gradients_flow_to_input_and_kernel_generator():
    torch.manual_seed(2)
    module = Involution(16, 3, 1)
    x = torch.randn(1, 16, 4, 4, dtype=torch.float64, requires_grad=True)
    module = module.double().eval()
    assert torch.autograd.gradcheck(lambda t: module(t), (x,), eps=1e-6, atol=1e-5)


def test_bf16_inputs_accumulate_in_float32_and_round_once():
    torch.manual_seed(3)
    x = torch.randn(2, 32, 8, 8).bfloat16()
    kernel = torch.randn(2, 2, 49, 8, 8).bfloat16()
    out = involution_weighted_sum(x, kernel, 7)
    assert out.dtype == torch.bfloat16
    once = involution_weighted_sum(x.float(), kernel.float(), 7).bfloat16()
    assert torch.equal(out, once)
    assert RedNet.bf16_autocast_safe is True


# Parameter counts of the official RedNets (d-li14/involution README, ImageNet, 1000 classes).
OFFICIAL_PARAMS_M = {"rednet26": 9.23, "rednet38": 12.39, "rednet50": 15.54, "rednet101": 25.65, "rednet152": 33.99}


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS_M))
def test_rednet_sizes_match_the_official_ones(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    # The README rounds to 0.01 M (RedNet-152: 33.985 M is printed as 33.99).
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - OFFICIAL_PARAMS_M[name]) <= 0.006
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    assert [info["reduction"] for info in model.feature_info] == [4, 8, 16, 32]


def test_rednet_cifar_variant_registered_and_runs():
    model = create_model("rednet_cifar26", base_chs=16)
    cfg = data_config(model)
    assert cfg["input_size"] == (3, 32, 32) and cfg["crop_pct"] == 1.0
    assert model.num_classes == 10 and model.get_classifier() is model.fc
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_features(x).shape == (2, 512, 4, 4)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)


def test_rednet_checkpoint_filter_maps_official_layouts():
    model = create_model("rednet_cifar26", base_chs=16)
    state = model.state_dict()
    mmcls = {("head." + k if k.startswith("fc.") else "backbone." + k): v for k, v in state.items()}
    coadvise = {("classifier." + k[3:] if k.startswith("fc.") else "model." + k): v for k, v in state.items()}
    for layout in ({"state_dict": mmcls}, coadvise):
        renamed = checkpoint_filter_fn(layout)
        assert renamed.keys() == state.keys()


def test_rednet_saves_reloads_and_exports_with_parity(tmp_path):
    torch.manual_seed(0)
    # Two one-bottleneck stages keep the export to seconds (each involution costs the dynamo exporter ~5 s).
    model = create_model("rednet_cifar26", base_chs=16, num_classes=10, stage_blocks=[1, 1]).eval()
    path = save_model(model, tmp_path / "red.safetensors")
    again = load_model(path)
    assert [len(again.layer1), len(again.layer2), again.num_features] == [1, 1, 128]
    x = sample_images(data_config(again), None, n=4)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    result = export_onnx(again, tmp_path / "red.onnx", sample=x)
    assert result.passed and result.max_abs_diff <= 1e-4
    assert len(onnx.load(str(tmp_path / "red.onnx")).graph.output) == 1
