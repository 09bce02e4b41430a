"""Importance of prunable groups: coupled L2 norms of heads, head dims and MLP units, and the plans and
removal sets they rank.

A group is every weight that goes with one unit (see ``vitshrink.prune.surgery``): a head dim owns its
q, k, v rows (and biases) and its ``proj`` column; an MLP unit its ``fc1`` row (and bias) and ``fc2``
column; a head is all its dims.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers.attention import Attention
from torch import nn

from vitshrink.errors import UserError
from vitshrink.prune.plan import BlockKeep, Plan, block_dims

__all__ = ["head_dim_norms", "head_norms", "mlp_unit_norms", "uniform_plan", "GroupNorms", "norm_scale",
           "block_groups", "smallest", "removal_sets", "next_norm"]


def _qkv_rows(attn: Attention) -> tuple[torch.Tensor, torch.Tensor | None]:
    """qkv weight/bias as [3, heads, head_dim, in] / [3, heads, head_dim]."""
    h, hd = attn.num_heads, attn.head_dim
    w = attn.qkv.weight.reshape(3, h, hd, -1)
    b = attn.qkv.bias.reshape(3, h, hd) if attn.qkv.bias is not None else None
    return w, b


@torch.no_grad()
def head_dim_norms(block: nn.Module) -> torch.Tensor:
    """L2 norm of each (head, dim) group: its q, k, v rows (+ biases) and its ``proj`` column. Shape [heads, hd]."""
    attn = block.attn
    if attn is None:
        return torch.zeros(0, 0)
    w, b = _qkv_rows(attn)
    sq = w.pow(2).sum(dim=(0, 3))
    if b is not None:
        sq = sq + b.pow(2).sum(dim=0)
    sq = sq + attn.proj.weight.pow(2).sum(dim=0).reshape(attn.num_heads, attn.head_dim)
    return sq.sqrt()


@torch.no_grad()
def head_norms(block: nn.Module) -> torch.Tensor:
    """L2 norm of each head's group (all its q, k, v rows and ``proj`` columns). Shape [heads]."""
    per_dim = head_dim_norms(block)
    return per_dim.pow(2).sum(dim=1).sqrt() if per_dim.numel() else per_dim.new_zeros(0)


@torch.no_grad()
def mlp_unit_norms(block: nn.Module) -> torch.Tensor:
    """L2 norm of each MLP hidden unit's group: its ``fc1`` row (+ bias) and ``fc2`` column. Shape [hidden]."""
    mlp = block.mlp
    if mlp is None:
        return torch.zeros(0)
    sq = mlp.fc1.weight.pow(2).sum(dim=1) + mlp.fc2.weight.pow(2).sum(dim=0)
    if mlp.fc1.bias is not None:
        sq = sq + mlp.fc1.bias.pow(2)
    return sq.sqrt()


def _top(norms: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest norms, in ascending index order (ties broken by lower index)."""
    if k <= 0:
        return []
    order = sorted(range(len(norms)), key=lambda i: (-float(norms[i]), i))
    return sorted(order[:k])


def uniform_plan(model: nn.Module, fraction: float) -> Plan:
    """Keep the same fraction of heads and of MLP units in every block, the largest groups by L2 norm.

    At least one head and one MLP unit stay in each branch that exists.
    """
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"keep fraction must be in (0, 1], got {fraction}")
    plan: Plan = []
    for blk, d in zip(model.blocks, block_dims(model)):
        n_heads = max(1, round(fraction * d.num_heads)) if d.num_heads else 0
        n_mlp = max(1, round(fraction * d.mlp_hidden)) if d.mlp_hidden else 0
        plan.append(BlockKeep(heads=_top(head_norms(blk), n_heads), mlp=_top(mlp_unit_norms(blk), n_mlp)))
    return plan


@dataclass
class GroupNorms:
    """Current group norms of one block, as shares of that block's total per unit type at the search start."""

    head: torch.Tensor  # [H]
    dim: torch.Tensor  # [H, hd]
    mlp: torch.Tensor  # [M]


def norm_scale(blocks: list[nn.Module]) -> tuple[float, float, float]:
    # Each unit type's norms sum to 1 in the *average* block, so the sparsity cost of removing a fraction
    # of a block is on the scale (0..1) of that fraction's share of FLOPs in R, while weaker blocks keep
    # their smaller norms (and so are pruned first).
    def mean_sum(fn):
        sums = [float(fn(b).sum()) for b in blocks if fn(b).numel()]
        return max(sum(sums) / max(len(sums), 1), 1e-12)

    return mean_sum(head_norms), mean_sum(head_dim_norms), mean_sum(mlp_unit_norms)


def block_groups(block: nn.Module, scale: tuple[float, float, float]) -> GroupNorms:
    return GroupNorms(head=head_norms(block) / scale[0], dim=head_dim_norms(block) / scale[1],
                   mlp=mlp_unit_norms(block) / scale[2])


def smallest(norms: torch.Tensor, count: int) -> torch.Tensor:
    count = max(0, min(int(count), norms.numel()))
    if count == 0:
        return norms.new_zeros(0, dtype=torch.long)
    return torch.topk(norms, count, largest=False).indices


def removal_sets(groups: GroupNorms, n_heads: int, n_dims: int, n_mlp: int):
    """Indices to remove: heads (smallest head norm), then dims within each surviving head, MLP units."""
    heads = smallest(groups.head, n_heads)
    alive = [h for h in range(groups.head.numel()) if h not in set(heads.tolist())]
    dims = {h: smallest(groups.dim[h], n_dims) for h in alive}
    mlp = smallest(groups.mlp, n_mlp)
    return heads, dims, mlp


def next_norm(norms: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """Norm of the next group to be removed (UVC ``least_s_sum`` backward): the (count+1)-th smallest."""
    count = int(count)
    if norms.numel() == 0 or count >= norms.numel():
        return norms.new_zeros(())
    return norms.sort().values[count]
