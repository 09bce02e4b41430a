"""Pruning plans: what each block of a ViT keeps (heads, dims within heads, MLP units), as data.

A plan has one entry per source block: a ``BlockKeep`` or ``None`` (the block goes). Deciding a plan is
the job of ``vitshrink.prune.importance`` (one-shot, by group norm) or ``vitshrink.prune.uvc_search``;
carrying it out is ``vitshrink.prune.surgery``'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["BlockKeep", "Plan", "BlockDims", "block_dims", "full_plan", "check_plan", "plan_to_json",
           "plan_from_json", "attn_index"]


@dataclass
class BlockKeep:
    """What one source block keeps: head indices, MLP unit indices and (optionally) dims within each kept head.

    ``head_dims[i]`` lists the kept dims of head ``heads[i]``; every kept head keeps the same number of
    dims (one ``head_dim`` per block). ``None`` keeps all dims. An empty ``heads`` removes the attention
    branch; an empty ``mlp`` removes the MLP branch.
    """

    heads: list[int]
    mlp: list[int]
    head_dims: list[list[int]] | None = None


# One entry per source block; ``None`` removes the block.
Plan = list  # list[BlockKeep | None]


@dataclass
class BlockDims:
    num_heads: int
    head_dim: int
    mlp_hidden: int


def block_dims(model: nn.Module) -> list[BlockDims]:
    """Heads, head width and MLP width of every block of a (timm or vitshrink) ViT."""
    dims = []
    for blk in model.blocks:
        attn, mlp = blk.attn, blk.mlp
        dims.append(BlockDims(
            num_heads=attn.num_heads if attn is not None else 0,
            head_dim=attn.head_dim if attn is not None else 0,
            mlp_hidden=mlp.fc1.out_features if mlp is not None else 0,
        ))
    return dims


def full_plan(model: nn.Module) -> Plan:
    """A plan that keeps everything (slicing with it only converts to ``vitshrink_vit``)."""
    return [BlockKeep(heads=list(range(d.num_heads)), mlp=list(range(d.mlp_hidden))) for d in block_dims(model)]


def check_plan(model: nn.Module, plan: Plan) -> list[BlockKeep | None]:
    dims = block_dims(model)
    if len(plan) != len(dims):
        raise ValueError(f"plan has {len(plan)} entries for a model with {len(dims)} blocks")
    checked: list[BlockKeep | None] = []
    for i, (keep, d) in enumerate(zip(plan, dims)):
        if keep is None:
            checked.append(None)
            continue
        heads, mlp = sorted(int(h) for h in keep.heads), sorted(int(j) for j in keep.mlp)
        if len(set(heads)) != len(heads) or any(not 0 <= h < d.num_heads for h in heads):
            raise ValueError(f"block {i}: head indices {heads} invalid for {d.num_heads} heads")
        if len(set(mlp)) != len(mlp) or any(not 0 <= j < d.mlp_hidden for j in mlp):
            raise ValueError(f"block {i}: MLP indices invalid for {d.mlp_hidden} units")
        head_dims = None
        if keep.head_dims is not None and heads:
            by_head = dict(zip((int(h) for h in keep.heads), keep.head_dims))
            if len(keep.head_dims) != len(keep.heads):
                raise ValueError(f"block {i}: head_dims needs one list per kept head")
            head_dims = [sorted(int(x) for x in by_head[h]) for h in heads]
            widths = {len(dl) for dl in head_dims}
            if len(widths) != 1 or 0 in widths:
                raise ValueError(f"block {i}: every kept head must keep the same, non-zero number of dims")
            for dl in head_dims:
                if len(set(dl)) != len(dl) or any(not 0 <= x < d.head_dim for x in dl):
                    raise ValueError(f"block {i}: head dim indices invalid for head_dim {d.head_dim}")
            if head_dims == [list(range(d.head_dim))] * len(heads):
                head_dims = None
        checked.append(BlockKeep(heads=heads, mlp=mlp, head_dims=head_dims))
    return checked


def plan_to_json(plan: Plan) -> list[Any]:
    """A JSON-able form of a plan (``None`` for removed blocks)."""
    return [None if k is None else {"heads": list(k.heads), "mlp": list(k.mlp), "head_dims": k.head_dims}
            for k in plan]


def plan_from_json(data: Sequence[Any]) -> Plan:
    return [None if k is None else BlockKeep(heads=list(k["heads"]), mlp=list(k["mlp"]),
                                             head_dims=k.get("head_dims")) for k in data]


def attn_index(keep: BlockKeep, head_dim: int) -> torch.Tensor:
    """Flat indices (into one of q/k/v, i.e. ``proj`` columns) of the kept (head, dim) pairs."""
    dims = keep.head_dims or [list(range(head_dim))] * len(keep.heads)
    return torch.tensor([h * head_dim + x for h, dl in zip(keep.heads, dims) for x in dl], dtype=torch.long)
