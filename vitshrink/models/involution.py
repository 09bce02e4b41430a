"""Involution (Li et al., CVPR 2021) and RedNet, registered with timm, in plain PyTorch.

Involution inverts convolution's sharing: its ``K x K`` kernel is *generated per pixel* from the input
(a 1x1 bottleneck: conv -> BN -> ReLU -> conv to ``K*K*G`` channels) and *shared across the channels of
each of the G groups* (16 channels per group). The output at a pixel is the kernel-weighted sum of the
input over its ``K x K`` neighbourhood. With stride ``s`` the kernel is generated from an ``s x s``
average-pooled input. This follows the official code (d-li14/involution, ``involution_naive.py``; the
authors' fast path is a CuPy kernel). Here the weighted sum is computed as ``K*K`` shifted slices of the
zero-padded input, multiplied by the kernel's matching channel and accumulated: the same numbers as the
official ``nn.Unfold`` version, without materialising the ``K*K``-times larger unfolded tensor. Under graph
export (``torch.export`` / ONNX) the unfold form is traced instead, because the dynamo ONNX exporter spends
~40 s per 7x7 involution on the 49 slices and a few seconds on one unfold. Tests check both forms against a
naive loop and the official code.

RedNet is ResNet with the 3x3 convolution of each bottleneck replaced by a 7x7 involution and an
involution in the stem (``rednet26/38/50/101/152``: the official ImageNet depths, 224 px, widths
64-2048). Parameter names follow the official mmcls backbone (``stem``, ``layer1..4``, ``conv1/bn1``,
``conv2`` the involution, ``conv3/bn3``, ``downsample``), with the classifier as ``fc``;
``checkpoint_filter_fn`` maps the official mmcls and Co-advise checkpoint layouts onto it.
``rednet_cifar26`` is our CIFAR-sized variant (not in the official code): the same 26-layer layout on
32 px inputs with a stride-1 3x3 stem, no max-pool, and half the widths (32-1024).

Mixed precision (measured with benchmarks/involution_bf16.py, figures in benchmarks/RESULTS.md): on
bf16-rounded inputs a 7x7 involution that accumulates its 49 products in bf16 has twice the error of a
7x7 convolution under bf16 autocast (0.65 % vs 0.29 % relative L2), because every partial sum is rounded;
accumulating in float32 and rounding once, as convolutions do, brings it to 0.30 %. The operator here
therefore always accumulates in float32, and whole-model bf16-vs-fp32 errors of RedNet (logits 1.4 %,
gradients 11 %) are then no larger than the trained ResNet-56's (2.1 %, 16 %). The official Co-advise
code turns autocast off around its involution stem because the authors' CuPy kernel only compiles for
float32/float64 tensors; this operator has no such limit. Decision: bf16 autocast is safe for these
models, and each model class containing involutions states it as ``bf16_autocast_safe = True`` (the
engine may read ``getattr(model, "bf16_autocast_safe", True)`` and train in float32 where a model says
False). fp16 is not claimed: generated kernels are unbounded and nothing was measured in fp16.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from vitshrink.models.checkpoints import rename_prefixes

__all__ = ["Involution", "ConvBnAct", "RedNetBottleneck", "RedNet", "involution_weighted_sum", "involution_stem",
           "checkpoint_filter_fn",
           "rednet26", "rednet38", "rednet50", "rednet101", "rednet152", "rednet_cifar26"]

# Official RedNet bottleneck counts per stage (mmcls RedNet.arch_settings).
REDNET_STAGES = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def involution_weighted_sum(x: torch.Tensor, kernel: torch.Tensor, kernel_size: int, stride: int = 1) -> torch.Tensor:
    """``out[b, g*Cg + c, i, j] = sum_{u,v} kernel[b, g, u*K+v, i, j] * x_pad[b, g*Cg + c, i*s + u, j*s + v]``.

    ``x``: (B, C, H, W); ``kernel``: (B, G, K*K, Ho, Wo) with ``C % G == 0``; zero padding ``(K-1)//2``;
    ``Ho = floor((H + 2p - K) / s) + 1`` (= ceil(H/s) for odd K). Half-precision inputs are accumulated
    in float32 and rounded once at the end, as a convolution does (summing 49 terms in bf16 doubles the error).
    """
    out_dtype = torch.promote_types(x.dtype, kernel.dtype)
    if out_dtype in (torch.bfloat16, torch.float16):
        x, kernel = x.float(), kernel.float()
    batch, channels, height, width = x.shape
    groups = kernel.shape[1]
    out_h, out_w = kernel.shape[-2:]
    pad = (kernel_size - 1) // 2
    if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
        # Graph export: one Unfold (im2col) instead of K*K slices; the dynamo ONNX exporter takes ~40 s per
        # 7x7 involution on the sliced form and ~1 s on this one. Same numbers (tests check both paths).
        cols = F.unfold(x, kernel_size, 1, pad, stride).view(batch, groups, channels // groups, kernel_size ** 2,
                                                              out_h, out_w)
        return (kernel.unsqueeze(2) * cols).sum(3).reshape(batch, channels, out_h, out_w).to(out_dtype)
    padded = F.pad(x, (pad, pad, pad, pad)).view(batch, groups, channels // groups, height + 2 * pad, width + 2 * pad)
    kernel = kernel.unsqueeze(2)  # (B, G, 1, K*K, Ho, Wo): broadcast over the channels of a group
    span_h, span_w = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
    out = None
    for u in range(kernel_size):
        for v in range(kernel_size):
            window = padded[..., u:u + span_h:stride, v:v + span_w:stride]
            term = kernel[:, :, :, u * kernel_size + v] * window
            out = term if out is None else out + term
    return out.reshape(batch, channels, out_h, out_w).to(out_dtype)


class ConvBnAct(nn.Module):
    """Conv (no bias when followed by BN), optional BN, optional ReLU; named like mmcv's ``ConvModule``."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, *, norm: bool = True,
                 act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, (kernel_size - 1) // 2, bias=not norm)
        self.bn = nn.BatchNorm2d(out_chs) if norm else nn.Identity()
        self.activate = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class Involution(nn.Module):
    """Involution with per-pixel kernels generated from the input, shared by the 16 channels of each group.

    ``channels`` must be a multiple of ``group_channels``. Kernel generation: 1x1 conv to
    ``channels // reduction`` (BN, ReLU), 1x1 conv (with bias) to ``K*K*groups``; from an ``s x s``
    average-pooled input when ``stride > 1`` (``ceil_mode``: identical to the official code on even
    sizes, and defined on odd ones, where the official code fails).
    """

    def __init__(self, channels: int, kernel_size: int = 7, stride: int = 1, *, group_channels: int = 16,
                 reduction: int = 4):
        super().__init__()
        if channels % group_channels:
            raise ValueError(f"Involution: channels ({channels}) must be a multiple of group_channels ({group_channels})")
        if kernel_size % 2 == 0:
            raise ValueError(f"Involution: kernel_size must be odd, got {kernel_size}")
        self.channels, self.kernel_size, self.stride = channels, kernel_size, stride
        self.group_channels = group_channels
        self.groups = channels // group_channels
        self.conv1 = ConvBnAct(channels, channels // reduction, 1)
        self.conv2 = ConvBnAct(channels // reduction, kernel_size ** 2 * self.groups, 1, norm=False, act=False)
        self.avgpool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()

    def generate_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The per-pixel kernels, (B, groups, K*K, Ho, Wo)."""
        weight = self.conv2(self.conv1(self.avgpool(x)))
        batch, _, height, width = weight.shape
        return weight.view(batch, self.groups, self.kernel_size ** 2, height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return involution_weighted_sum(x, self.generate_kernel(x), self.kernel_size, self.stride)


class RedNetBottleneck(nn.Module):
    """1x1 conv -> 7x7 involution (carries the stride) -> 1x1 conv, each with BN; residual; ReLU."""

    expansion = 4

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        mid = out_chs // self.expansion
        self.conv1 = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = Involution(mid, 7, stride)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def involution_stem(in_chans: int, stem_chs: int, stride: int) -> nn.Sequential:
    """RedNet's stem: 3x3 conv (carries the stride) to ``stem_chs/2``, 3x3 involution, BN, ReLU, 3x3 conv."""
    half = stem_chs // 2
    return nn.Sequential(ConvBnAct(in_chans, half, 3, stride), Involution(half, 3, 1), nn.BatchNorm2d(half),
                         nn.ReLU(inplace=True), ConvBnAct(half, stem_chs, 3))


class RedNet(nn.Module):
    """RedNet classifier: involution stem, 4 stages of involution bottlenecks, global average pool, ``fc``.

    ``stem_stride=2`` plus a 3x3/2 max-pool is the ImageNet layout (stride 32 in all); ``stem_stride=1``
    without max-pool (``stem_pool=False``) is the CIFAR layout (stride 8). Stage ``i`` has
    ``base_chs * 2**i`` involution channels and ``4 *`` that many outputs.
    """

    bf16_autocast_safe = True  # see the module docstring

    def __init__(self, stage_blocks: Sequence[int] = (1, 2, 4, 1), *, num_classes: int = 1000, in_chans: int = 3,
                 stem_chs: int = 64, base_chs: int = 64, stem_stride: int = 2, stem_pool: bool = True,
                 drop_rate: float = 0.0, global_pool: str = "avg", zero_init_last: bool = True, **_: Any):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"RedNet supports global_pool 'avg' or '', got {global_pool!r}")
        if stem_chs % 32 or base_chs % 16:
            raise ValueError(f"RedNet: stem_chs must be a multiple of 32 and base_chs of 16 (involution groups of 16), "
                             f"got {stem_chs} and {base_chs}")
        self.num_classes, self.in_chans = num_classes, in_chans
        self.global_pool, self.drop_rate = global_pool, drop_rate
        self.stem = involution_stem(in_chans, stem_chs, stem_stride)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem_pool else nn.Identity()
        reduction = stem_stride * (2 if stem_pool else 1)
        self.feature_info = []
        in_chs = stem_chs
        for index, blocks in enumerate(stage_blocks):
            out_chs = base_chs * RedNetBottleneck.expansion * 2 ** index
            stride = 1 if index == 0 else 2
            reduction *= stride
            layers = [RedNetBottleneck(in_chs if b == 0 else out_chs, out_chs, stride if b == 0 else 1)
                      for b in range(blocks)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*layers))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"layer{index + 1}"))
            in_chs = out_chs
        self.num_stages = len(stage_blocks)
        self.num_features = self.head_hidden_size = in_chs
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(zero_init_last)

    def _init_weights(self, zero_init_last: bool) -> None:
        # Official init (mmcls RedNet.init_weights): kaiming for convs, BN = (1, 0), last BN of each block zero.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, RedNetBottleneck):
                    nn.init.zeros_(m.bn3.weight)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.stem(x))
        for index in range(self.num_stages):
            x = getattr(self, f"layer{index + 1}")(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# (prefix in a foreign checkpoint, prefix here): mmcls ImageClassifier and Co-advise's RedNet wrapper.
_FOREIGN_PREFIXES = (("backbone.", ""), ("head.fc.", "fc."), ("model.", ""), ("classifier.", "fc."))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Rename an official RedNet checkpoint (mmcls ``backbone./head.fc.`` or Co-advise ``model./classifier.``)."""
    state_dict = state_dict.get("state_dict", state_dict.get("model", state_dict))
    return rename_prefixes(state_dict, _FOREIGN_PREFIXES)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0.conv", "classifier": "fc", **kwargs,
    }


# timm's register_model reads this module-level name to attach each variant's pretrained_cfg.
default_cfgs = generate_default_cfgs({
    **{f"rednet{depth}": _cfg() for depth in REDNET_STAGES},
    "rednet_cifar26": _cfg(num_classes=10, input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0),
})


def _create(variant: str, default_blocks: Sequence[int], pretrained: bool, **kwargs: Any) -> RedNet:
    # No weights are published under these names: pretrained=True is refused by timm's builder.
    # ``stage_blocks`` may be overridden (a shallower RedNet of the same widths); the record keeps it.
    stage_blocks = tuple(kwargs.pop("stage_blocks", default_blocks))
    return build_model_with_cfg(RedNet, variant, pretrained, stage_blocks=stage_blocks,
                                pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


@register_model
def rednet26(pretrained: bool = False, **kwargs: Any) -> RedNet:
    """RedNet-26 (official: 9.2 M parameters, 1.7 GFLOPs at 224 px)."""
    return _create("rednet26", REDNET_STAGES[26], pretrained, **kwargs)


@register_model
def rednet38(pretrained: bool = False, **kwargs: Any) -> RedNet:
    """RedNet-38 (official: 12.4 M parameters)."""
    return _create("rednet38", REDNET_STAGES[38], pretrained, **kwargs)


@register_model
def rednet50(pretrained: bool = False, **kwargs: Any) -> RedNet:
    """RedNet-50 (official: 15.5 M parameters)."""
    return _create("rednet50", REDNET_STAGES[50], pretrained, **kwargs)


@register_model
def rednet101(pretrained: bool = False, **kwargs: Any) -> RedNet:
    """RedNet-101 (official: 25.7 M parameters; Co-advise's involution teacher)."""
    return _create("rednet101", REDNET_STAGES[101], pretrained, **kwargs)


@register_model
def rednet152(pretrained: bool = False, **kwargs: Any) -> RedNet:
    """RedNet-152 (official: 34.0 M parameters)."""
    return _create("rednet152", REDNET_STAGES[152], pretrained, **kwargs)


@register_model
def rednet_cifar26(pretrained: bool = False, **kwargs: Any) -> RedNet:
    """RedNet-26 for 32 px inputs (ours): stride-1 stem, no max-pool, widths 32-1024, 10 classes."""
    kwargs = {"stem_chs": 32, "base_chs": 32, "stem_stride": 1, "stem_pool": False, **kwargs}
    return _create("rednet_cifar26", REDNET_STAGES[26], pretrained, **kwargs)
