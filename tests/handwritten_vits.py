"""Hand-written ViTs as users write them, in plain PyTorch (no vitshrink, no timm): the ORIGINAL modules.

vitshrink must load each one's state dict and compute what the module computes. Every class takes the
same small set of sizes (``img_size, patch_size, in_chans, num_classes, dim, depth, heads, mlp_dim``) plus
its own switches; ``LAYOUTS`` names one builder per layout (tests and benchmarks import it):

- ``torch_encoder`` / ``torch_encoder_prenorm_gelu``: ``nn.TransformerEncoder`` (post-norm ReLU by default);
  keys ``transformer.layers.N.self_attn.in_proj_weight``, ``linear1``/``linear2``, ``norm1``/``norm2``,
  a ``mlp_head`` of LayerNorm + Linear.
- ``mha_prenorm``: a pre-norm ViT on ``nn.MultiheadAttention`` with ``nn.Sequential`` MLPs.
- ``double_projection``: separate query/key/value Linears feeding an ``nn.MultiheadAttention`` (two
  projections in a row), one LayerNorm shared by both sub-blocks of a layer, a head named ``classifer``.
- ``per_head``: attention as a list of heads, each with its own q/k/v Linears; a fixed sinusoidal position
  table in a buffer; a head ending in softmax.
- ``linear_patch_avgpool``: a Linear over unfolded patches (7x7 on MNIST), no class token, average pooling,
  a hand-written post-norm block.
- ``mlp_head``: the pre-norm ViT with a Linear-act-Linear head (``linear_linear_head``: no activation between).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
from torch import nn

__all__ = ["TorchEncoderViT", "MHAPreNormViT", "DoubleProjectionViT", "PerHeadViT", "LinearPatchAvgPoolViT",
           "LAYOUTS"]


def _grid(img_size: int, patch_size: int) -> int:
    return (img_size // patch_size) ** 2


class TorchEncoderViT(nn.Module):
    """Conv patches, class token, learned positions, ``nn.TransformerEncoder``, LayerNorm + Linear head."""

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 3, num_classes: int = 10,
                 dim: int = 32, depth: int = 2, heads: int = 4, mlp_dim: int = 64, norm_first: bool = False,
                 activation: str = "relu", eps: float = 1e-5):
        super().__init__()
        self.patch_embedding = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embedding = nn.Parameter(torch.randn(1, _grid(img_size, patch_size) + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, mlp_dim, dropout=0.0, activation=activation,
                                           layer_norm_eps=eps, batch_first=True, norm_first=norm_first)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim, eps=eps), nn.Linear(dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        x = self.transformer(x)
        return self.mlp_head(x[:, 0])


class _PreNormMHABlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class MHAPreNormViT(nn.Module):
    """Pre-norm blocks on ``nn.MultiheadAttention``; a final LayerNorm; a Linear (or Linear-act-Linear) head."""

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 3, num_classes: int = 10,
                 dim: int = 32, depth: int = 2, heads: int = 4, mlp_dim: int = 64, head_hidden: int = 0,
                 head_act: Callable[[], nn.Module] | None = nn.Tanh):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, _grid(img_size, patch_size) + 1, dim) * 0.02)
        self.layers = nn.ModuleList([_PreNormMHABlock(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        if head_hidden and head_act is None:  # two Linears with nothing between
            self.head = nn.Sequential(nn.Linear(dim, head_hidden), nn.Linear(head_hidden, num_classes))
        elif head_hidden:
            self.head = nn.Sequential(nn.Linear(dim, head_hidden), head_act(), nn.Linear(head_hidden, num_classes))
        else:
            self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x)[:, 0])


class _DoubleProjectionAttention(nn.Module):
    """query/key/value Linears, then ``nn.MultiheadAttention`` projects them again (its own in_proj)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(self.query(x), self.key(x), self.value(x), need_weights=False)[0]


class _SharedNormBlock(nn.Module):
    """Pre-norm block whose one LayerNorm serves both the attention and the MLP."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = _DoubleProjectionAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm(x))
        return x + self.mlp(self.norm(x))


class DoubleProjectionViT(nn.Module):
    """The MNIST ViT of issue 20: double projections, shared norms, a ``classifer`` head, no final norm."""

    def __init__(self, img_size: int = 28, patch_size: int = 7, in_chans: int = 1, num_classes: int = 10,
                 dim: int = 32, depth: int = 2, heads: int = 4, mlp_dim: int = 64):
        super().__init__()
        self.patch_embedding = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embedding = nn.Parameter(torch.randn(1, _grid(img_size, patch_size) + 1, dim) * 0.02)
        self.encoder = nn.ModuleList([_SharedNormBlock(dim, heads, mlp_dim) for _ in range(depth)])
        self.classifer = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        for block in self.encoder:
            x = block(x)
        return self.classifer(x[:, 0])


class _Head(nn.Module):
    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.query = nn.Linear(dim, head_dim)
        self.key = nn.Linear(dim, head_dim)
        self.value = nn.Linear(dim, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query(x), self.key(x), self.value(x)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        return weights @ v


class _PerHeadAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = nn.ModuleList([_Head(dim, dim // heads) for _ in range(heads)])
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([head(x) for head in self.heads], dim=-1))


class _PerHeadBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.mhsa = _PerHeadAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mhsa(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def sinusoidal_table(tokens: int, dim: int) -> torch.Tensor:
    """The transformer's fixed sin/cos position table, (tokens, dim)."""
    position = torch.arange(tokens, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(tokens, dim)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div)
    return table


class PerHeadViT(nn.Module):
    """Per-head attention, a sinusoidal position buffer, and a head that ends in softmax (probabilities out)."""

    def __init__(self, img_size: int = 28, patch_size: int = 7, in_chans: int = 1, num_classes: int = 10,
                 dim: int = 32, depth: int = 2, heads: int = 4, mlp_dim: int = 64):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.register_buffer("positional_encoding", sinusoidal_table(_grid(img_size, patch_size) + 1, dim))
        self.blocks = nn.ModuleList([_PerHeadBlock(dim, heads, mlp_dim) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.mlp_head = nn.Sequential(nn.Linear(dim, num_classes), nn.Softmax(dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.positional_encoding
        for block in self.blocks:
            x = block(x)
        return self.mlp_head(self.ln(x)[:, 0])


class _PostNormBlock(nn.Module):
    """norm(x + attn(x)), then norm(x + mlp(x)): the original transformer's order, written by hand."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, activation: Callable[[], nn.Module]):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), activation(), nn.Linear(mlp_dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
        return self.norm2(x + self.mlp(x))


class LinearPatchAvgPoolViT(nn.Module):
    """A Linear over unfolded patches (``Tensor.unfold``: channel, then row, then column within a patch),
    learned positions without a class token, post-norm blocks, average pooling; ``pool_norm`` puts a final
    LayerNorm ``"before"`` or ``"after"`` the pooling (or ``None``)."""

    def __init__(self, img_size: int = 28, patch_size: int = 7, in_chans: int = 1, num_classes: int = 10,
                 dim: int = 32, depth: int = 2, heads: int = 4, mlp_dim: int = 64, pool_norm: str | None = None,
                 activation: Callable[[], nn.Module] = nn.GELU):
        super().__init__()
        self.patch_size = patch_size
        self.patch_embedding = nn.Linear(in_chans * patch_size * patch_size, dim)
        self.pos_embedding = nn.Parameter(torch.randn(1, _grid(img_size, patch_size), dim) * 0.02)
        self.blocks = nn.ModuleList([_PostNormBlock(dim, heads, mlp_dim, activation) for _ in range(depth)])
        self.pool_norm = pool_norm
        self.norm = nn.LayerNorm(dim) if pool_norm else None
        self.head = nn.Linear(dim, num_classes)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        batch, chans = x.shape[:2]
        x = x.unfold(2, p, p).unfold(3, p, p)  # (B, C, H/p, W/p, p, p)
        return x.permute(0, 2, 3, 1, 4, 5).reshape(batch, -1, chans * p * p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(self.patches(x)) + self.pos_embedding
        for block in self.blocks:
            x = block(x)
        if self.pool_norm == "before":
            x = self.norm(x)
        x = x.mean(dim=1)
        if self.pool_norm == "after":
            x = self.norm(x)
        return self.head(x)


LAYOUTS: dict[str, Callable[..., nn.Module]] = {
    "torch_encoder": TorchEncoderViT,
    "torch_encoder_gelu": partial(TorchEncoderViT, activation="gelu"),
    "torch_encoder_prenorm": partial(TorchEncoderViT, norm_first=True),
    "torch_encoder_prenorm_gelu": partial(TorchEncoderViT, norm_first=True, activation="gelu"),
    "mha_prenorm": MHAPreNormViT,
    "double_projection": DoubleProjectionViT,
    "per_head": PerHeadViT,
    "linear_patch_avgpool": LinearPatchAvgPoolViT,
    "linear_patch_avgpool_norm_after": partial(LinearPatchAvgPoolViT, pool_norm="after"),
    "mlp_head": partial(MHAPreNormViT, head_hidden=48),
    "linear_linear_head": partial(MHAPreNormViT, head_hidden=48, head_act=None),
}
