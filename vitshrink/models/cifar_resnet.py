"""CIFAR ResNets (He et al. 2016, section 4.2): ResNet-20/32/44/56 registered with timm.

Layout and parameter names follow the widely used akamaster/pytorch_resnet_cifar10 checkpoints
(``conv1``/``bn1``, ``layer1..3``, ``linear``), so those state dicts load strictly once their
``module.`` prefix is stripped. Shortcuts that change shape use "option A": subsample every second
pixel and zero-pad the channels equally on both sides (no parameters).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["CifarResNet", "cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56"]


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1",
        "classifier": "linear",
        **kwargs,
    }


class _ShortcutA(nn.Module):
    """Option-A shortcut: stride-2 subsampling plus zero channel padding, split evenly on both sides."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = _ShortcutA((planes - in_planes) // 2)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3 stages of ``n`` basic blocks with 16/32/64 channels, GAP, ``linear`` head."""

    def __init__(self, blocks_per_stage: int = 3, num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0, global_pool: str = "avg", **_: Any):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"CifarResNet supports global_pool 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.conv1 = nn.Conv2d(in_chans, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            layers = []
            for i in range(blocks_per_stage):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.num_features = self.head_hidden_size = in_planes
        self.linear = nn.Linear(in_planes, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=16, reduction=1, module="layer1"),
            dict(num_chs=32, reduction=2, module="layer2"),
            dict(num_chs=64, reduction=4, module="layer3"),
        ]
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.linear

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.linear = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create(variant: str, blocks_per_stage: int, pretrained: bool, **kwargs: Any) -> CifarResNet:
    # No weights are published under these names: pretrained=True is refused by timm's builder.
    return build_model_with_cfg(CifarResNet, variant, pretrained, blocks_per_stage=blocks_per_stage, **kwargs)


# timm's register_model reads this module-level name to attach each variant's pretrained_cfg.
default_cfgs = generate_default_cfgs(
    {name: _cfg() for name in ("cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56")})


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 for CIFAR (3 blocks per stage, 0.27 M parameters)."""
    return _create("cifar_resnet20", 3, pretrained, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32 for CIFAR (5 blocks per stage)."""
    return _create("cifar_resnet32", 5, pretrained, **kwargs)


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-44 for CIFAR (7 blocks per stage)."""
    return _create("cifar_resnet44", 7, pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-56 for CIFAR (9 blocks per stage, 0.86 M parameters)."""
    return _create("cifar_resnet56", 9, pretrained, **kwargs)
