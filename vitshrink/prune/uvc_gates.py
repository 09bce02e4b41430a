"""The search-time model of UVC's search (``vitshrink.prune.uvc_search``): blocks behind a skip gate, the
straight-through ceil of the removal counts, and the proximal shrink of the groups marked for removal."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

__all__ = ["GatedBlock", "ste_ceil", "shrink_groups", "cycle"]

class GatedBlock(nn.Module):
    """``x + keep * (block(x) - x)``, i.e. ``d1 * Block(x) + d0 * x`` with ``d0 = 1 - d1``."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.keep: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out = self.block(x, **kwargs)
        return out if self.keep is None else x + self.keep * (out - x)


class _SteCeil(torch.autograd.Function):
    """Straight-through ceil (UVC ``ste_ceil``): integer forward, identity backward."""

    @staticmethod
    def forward(ctx, value):  # noqa: D102
        return value.ceil()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad


def ste_ceil(value: torch.Tensor) -> torch.Tensor:
    return _SteCeil.apply(value)


@torch.no_grad()
def shrink_groups(block: nn.Module, heads, dims, mlp, factors: tuple[float, float, float]) -> None:
    """Proximal step for y * ||W_g||^2: divide every marked group's coupled weights by its factor."""
    attn, mlp_mod = block.attn, block.mlp
    f_head, f_dim, f_mlp = factors
    if attn is not None:
        width, hd = attn.num_heads * attn.head_dim, attn.head_dim
        scale = torch.ones(width, device=attn.qkv.weight.device)
        for h in heads.tolist():
            scale[h * hd:(h + 1) * hd] /= f_head
        for h, idx in dims.items():
            scale[h * hd + idx] /= f_dim
        rows = scale.repeat(3)
        attn.qkv.weight.mul_(rows[:, None])
        if attn.qkv.bias is not None:
            attn.qkv.bias.mul_(rows)
        attn.proj.weight.mul_(scale[None, :])
    if mlp_mod is not None and mlp.numel():
        mlp_mod.fc1.weight[mlp] /= f_mlp
        if mlp_mod.fc1.bias is not None:
            mlp_mod.fc1.bias[mlp] /= f_mlp
        mlp_mod.fc2.weight[:, mlp] /= f_mlp


def cycle(loader_fn: Callable[[], Iterable]) -> Iterable:
    while True:
        for batch in loader_fn():
            yield batch
