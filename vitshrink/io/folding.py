"""Exact tensor algebra that turns hand-written ViT modules into timm's: the math, apart from the renaming.

Each function computes *the same function* in fewer or other-shaped tensors (no approximation):

- ``fold_double_projection``: q/k/v Linears feeding ``nn.MultiheadAttention`` (two projections in a row)
  fold into its ``in_proj``: ``W = W_in @ W_q``, ``b = W_in @ b_q + b_in`` for each of q, k, v;
- ``concat_per_head``: attention written as a list of heads, each with its own q/k/v Linears, is one set of
  q/k/v Linears whose rows are the heads' rows in order (timm's ``qkv`` splits heads the same way);
- ``linear_patch_to_conv``: a Linear over unfolded patches is the patch convolution, its input order
  (channel, row, column) being a convolution kernel's;
- ``is_sinusoidal``: whether a position table is the fixed sin/cos table (a constant, never trained).
"""
from __future__ import annotations

import math
import re

import torch

__all__ = ["fold_double_projection", "concat_per_head", "linear_patch_to_conv", "is_sinusoidal",
           "Q_NAMES", "K_NAMES", "V_NAMES"]

Q_NAMES = ("query", "q", "q_proj", "to_q", "wq", "q_linear")
K_NAMES = ("key", "k", "k_proj", "to_k", "wk", "k_linear")
V_NAMES = ("value", "v", "v_proj", "to_v", "wv", "v_linear")


def _find_linear(block: dict[str, torch.Tensor], prefix: str, names: tuple[str, ...]) -> str | None:
    return next((f"{prefix}{n}." for n in names if f"{prefix}{n}.weight" in block), None)


def fold_double_projection(block: dict[str, torch.Tensor]) -> bool:
    """Fold sibling q/k/v Linears into the ``nn.MultiheadAttention`` they feed (in place); True if folded.

    The block's keys are relative to the block (``attention.query.weight``, ``attention.mha.in_proj_weight``).
    """
    folded = False
    for key in [k for k in block if k.endswith("in_proj_weight")]:
        mha = key[: -len("in_proj_weight")]  # "attention.mha."
        parent = mha[: mha.rstrip(".").rfind(".") + 1] if "." in mha.rstrip(".") else ""
        linears = [_find_linear(block, parent, names) for names in (Q_NAMES, K_NAMES, V_NAMES)]
        if any(p is None for p in linears):
            continue
        w_in = block[key]
        b_in = block.get(f"{mha}in_proj_bias")
        width = w_in.shape[0] // 3
        weights, biases = [], []
        for i, prefix in enumerate(linears):
            w_part = w_in[i * width:(i + 1) * width]
            w_first = block.pop(f"{prefix}weight")
            b_first = block.pop(f"{prefix}bias", None)
            weights.append(w_part @ w_first)
            bias = w_part @ b_first if b_first is not None else torch.zeros(width, dtype=w_in.dtype)
            if b_in is not None:
                bias = bias + b_in[i * width:(i + 1) * width]
            biases.append(bias)
        block.pop(f"{mha}in_proj_bias", None)
        del block[key]
        parent = parent or mha
        # The folded attention takes the place of the q/k/v Linears' parent, like a plain nn.MultiheadAttention.
        block[f"{parent}in_proj_weight"] = torch.cat(weights)
        block[f"{parent}in_proj_bias"] = torch.cat(biases)
        for out_key in [k for k in block if k.startswith(f"{mha}out_proj.") and parent != mha]:
            block[f"{parent}out_proj.{out_key[len(mha) + len('out_proj.'):]}"] = block.pop(out_key)
        folded = True
    return folded


_HEAD_LINEAR = re.compile(r"^(.*?)([A-Za-z_]+)\.(\d+)\.([A-Za-z_0-9]+)\.(weight|bias)$")


def concat_per_head(block: dict[str, torch.Tensor]) -> int:
    """Heads ``<attn>.<list>.H.{query,key,value}`` -> ``<attn>.{query,key,value}`` (in place); the head count."""
    groups: dict[tuple[str, str], dict[int, dict[str, torch.Tensor]]] = {}
    for key, tensor in block.items():
        match = _HEAD_LINEAR.match(key)
        if match and match.group(4) in Q_NAMES + K_NAMES + V_NAMES:
            attn, container, head, name, kind = match.groups()
            groups.setdefault((attn, container), {}).setdefault(int(head), {})[f"{name}.{kind}"] = tensor
    heads = 0
    for (attn, container), per_head in groups.items():
        indices = sorted(per_head)
        if indices != list(range(len(indices))) or len({tuple(sorted(h)) for h in per_head.values()}) != 1:
            continue  # not one list of identical heads
        for name in per_head[0]:
            block[f"{attn}{name}"] = torch.cat([per_head[i][name] for i in indices])
        for key in [k for k in block if k.startswith(f"{attn}{container}.")]:
            del block[key]
        heads = len(indices)
    return heads


def linear_patch_to_conv(weight: torch.Tensor, chans: int) -> torch.Tensor:
    """(width, chans * p * p) Linear over (channel, row, column)-ordered patches -> (width, chans, p, p) kernel."""
    patch = math.isqrt(weight.shape[1] // chans)
    return weight.reshape(weight.shape[0], chans, patch, patch)


def is_sinusoidal(table: torch.Tensor) -> bool:
    """The table (tokens, dim) is the transformer's sin/cos table (interleaved, or sin half then cos half)."""
    tokens, dim = table.shape[-2:]
    if dim % 2 or table.numel() != tokens * dim:
        return False
    position = torch.arange(tokens, dtype=torch.float64)[:, None]
    angle = position * torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    interleaved = torch.stack([angle.sin(), angle.cos()], dim=-1).reshape(tokens, dim)
    halves = torch.cat([angle.sin(), angle.cos()], dim=-1)
    flat = table.reshape(tokens, dim).double()
    return any(torch.allclose(flat, ref, atol=1e-5) for ref in (interleaved, halves))
