"""Patch embeddings that timm's ``PatchEmbed`` cannot express, for checkpoints trained with them.

``PixelNormPatchEmbed`` is the patch embedding of lucidrains' ``vit-pytorch``: each patch flattened in
(row, column, channel) order, LayerNorm over its pixels, a Linear projection, LayerNorm over the width.
The pixel LayerNorm is not linear, so it cannot be folded into timm's convolution.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.layers import PatchEmbed
from torch import nn


class PixelNormPatchEmbed(PatchEmbed):
    """LayerNorm(patch pixels) -> Linear -> LayerNorm(width); same attributes as timm's ``PatchEmbed``."""

    def __init__(self, img_size: Any = 224, patch_size: Any = 16, in_chans: int = 3, embed_dim: int = 768,
                 bias: bool = True, eps: float = 1e-5, **kwargs: Any):
        kwargs.pop("norm_layer", None)
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         bias=bias, **kwargs)
        patch_dim = in_chans * self.patch_size[0] * self.patch_size[1]
        self.pixel_norm = nn.LayerNorm(patch_dim, eps=eps)
        self.proj = nn.Linear(patch_dim, embed_dim, bias=bias)
        self.norm = nn.LayerNorm(embed_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, chans, height, width = x.shape
        ph, pw = self.patch_size
        # b c (h p1) (w p2) -> b (h w) (p1 p2 c)
        x = x.reshape(batch, chans, height // ph, ph, width // pw, pw).permute(0, 2, 4, 3, 5, 1)
        x = x.reshape(batch, (height // ph) * (width // pw), ph * pw * chans)
        return self.norm(self.proj(self.pixel_norm(x)))


# Names a record may give as ``patch_embed`` (JSON-able) -> the class that builds it.
PATCH_EMBEDS = {"pixel_norm": PixelNormPatchEmbed}
