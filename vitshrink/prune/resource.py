"""The resource models of a ViT: what the search and the band adjustment spend. ``ResourceModel`` counts MACs
as a function of each block's heads, head width and MLP width; ``LatencyModel`` (``vitshrink.prune.latency_fit``)
predicts a runtime's latency with the same interface. Also the target check and the allowed widths."""
from __future__ import annotations

import math
from typing import Any, Iterable

from torch import nn

from vitshrink.errors import UserError
from vitshrink.prune.plan import Plan, block_dims

__all__ = ["ResourceModel", "check_flops_target", "check_target", "allowed_widths"]


def allowed_widths(full: int, multiple: int = 1) -> list[int]:
    """The widths a pruned dimension of size ``full`` may keep: multiples of ``multiple`` below ``full``, and
    ``full`` itself (an unpruned width stays what it was). A dimension narrower than ``multiple`` cannot be
    pruned (its only width is ``full``): the smallest pruned width is ``multiple``; whole blocks still go
    through the skip gates."""
    if full <= 0:
        return [0]
    step = max(1, int(multiple))
    return sorted({*range(step, full, step), full})


class ResourceModel:
    """MACs of a ViT as a function of per-block (heads, head dim, MLP units, kept), at batch size 1.

    ``block_macs = h*d*(4*N*D + 2*N^2) + 2*N*D*m``: qkv (3*N*D*h*d), Q@K^T and attn@V (2*h*N^2*d),
    proj (N*h*d*D), fc1 + fc2 (2*N*D*m). ``fixed`` (patch embedding, head) is the counter's total minus the
    blocks, so ``ratio`` is what ``vitshrink.measure.count_flops`` reports for the sliced model.
    ``block`` also takes tensors (the search differentiates it).
    """

    kind = "flops"
    flag = "--flops-target"

    def __init__(self, model: nn.Module):
        from vitshrink.measure import count_flops

        self.dims = block_dims(model)
        self.tokens = int(model.patch_embed.num_patches + model.num_prefix_tokens)
        self.embed = int(model.embed_dim)
        self.attn_unit = 4 * self.tokens * self.embed + 2 * self.tokens ** 2  # MACs per (head x dim)
        self.mlp_unit = 2 * self.tokens * self.embed  # MACs per MLP hidden unit
        total = count_flops(model).macs
        self.full_blocks = [self.block(d.num_heads, d.head_dim, d.mlp_hidden) for d in self.dims]
        self.fixed = total - sum(self.full_blocks)
        self.total = total

    def block(self, heads, head_dim, mlp):
        return heads * head_dim * self.attn_unit + mlp * self.mlp_unit

    def ratio_of(self, per_block: Iterable[tuple[int, int, int] | None]) -> float:
        cost = self.fixed + sum(self.block(*b) for b in per_block if b is not None)
        return cost / self.total

    def plan_ratio(self, plan: Plan) -> float:
        per_block = []
        for keep, d in zip(plan, self.dims):
            if keep is None:
                per_block.append(None)
                continue
            width = len(keep.head_dims[0]) if keep.head_dims else d.head_dim
            per_block.append((len(keep.heads), width if keep.heads else 0, len(keep.mlp)))
        return self.ratio_of(per_block)

    def min_ratio(self, *, skip: bool, within: bool, dim_multiple: int = 1) -> float:
        """The smallest R the search may reach: blocks gone (skip), or one head and the narrowest allowed head
        dim and MLP width left per block."""
        if skip:
            return self.fixed / self.total
        if within:
            return self.ratio_of((min(d.num_heads, 1), allowed_widths(d.head_dim, dim_multiple)[0],
                                  allowed_widths(d.mlp_hidden, dim_multiple)[0]) for d in self.dims)
        return 1.0


def check_target(target: Any, resource: ResourceModel | None = None, *, skip: bool = True, within: bool = True,
                 dim_multiple: int = 1, flag: str = "--flops-target", what: str = "FLOPs") -> float:
    """``target`` as a float in (0, 1) that the model can reach, else ``UserError`` (one line)."""
    try:
        value = float(target)
    except (TypeError, ValueError):
        raise UserError(f"{flag} must be a number in (0, 1), got {target!r}") from None
    if not 0.0 < value < 1.0 or math.isnan(value):
        raise UserError(f"{flag} must be in (0, 1) (pruned {what} / teacher {what}), got {target}")
    if resource is not None:
        floor = resource.min_ratio(skip=skip, within=within, dim_multiple=dim_multiple)
        if value < floor:
            cost = ("the embedding and head alone" if skip else
                    "one head and the narrowest allowed head dim and MLP width per block" if within
                    else "the unpruned blocks")
            multiple = f" with --dim-multiple {dim_multiple}" if dim_multiple > 1 else ""
            raise UserError(f"{flag} {value:g} is unreachable{multiple}: {cost} already cost {floor:.3f} of the "
                            f"teacher's {what}")
    return value


def check_flops_target(target: Any, resource: ResourceModel | None = None, *, skip: bool = True,
                       within: bool = True, dim_multiple: int = 1) -> float:
    """``target`` as a float in (0, 1) that the model can reach, else ``UserError`` (one line)."""
    return check_target(target, resource, skip=skip, within=within, dim_multiple=dim_multiple)
