"""The resource model of a ViT: MACs as a function of each block's heads, head width and MLP width, and
the FLOPs-target check."""
from __future__ import annotations

import math
from typing import Any, Iterable

from torch import nn

from vitshrink.errors import UserError
from vitshrink.prune.plan import Plan, block_dims

__all__ = ["ResourceModel", "check_flops_target"]


class ResourceModel:
    """MACs of a ViT as a function of per-block (heads, head dim, MLP units, kept), at batch size 1.

    ``block_macs = h*d*(4*N*D + 2*N^2) + 2*N*D*m``: qkv (3*N*D*h*d), Q@K^T and attn@V (2*h*N^2*d),
    proj (N*h*d*D), fc1 + fc2 (2*N*D*m). ``fixed`` (patch embedding, head) is the counter's total minus the
    blocks, so ``ratio`` is what ``vitshrink.measure.count_flops`` reports for the sliced model.
    """

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
        macs = self.fixed + sum(self.block(*b) for b in per_block if b is not None)
        return macs / self.total

    def plan_ratio(self, plan: Plan) -> float:
        per_block = []
        for keep, d in zip(plan, self.dims):
            if keep is None:
                per_block.append(None)
                continue
            width = len(keep.head_dims[0]) if keep.head_dims else d.head_dim
            per_block.append((len(keep.heads), width if keep.heads else 0, len(keep.mlp)))
        return self.ratio_of(per_block)

    def min_ratio(self, *, skip: bool, within: bool) -> float:
        """The smallest R the search may reach: blocks gone (skip), or one head/dim/unit left per block."""
        if skip:
            return self.fixed / self.total
        if within:
            return self.ratio_of((min(d.num_heads, 1), min(d.head_dim, 1), min(d.mlp_hidden, 1)) for d in self.dims)
        return 1.0


def check_flops_target(target: Any, resource: ResourceModel | None = None, *, skip: bool = True,
                       within: bool = True) -> float:
    """``target`` as a float in (0, 1) that the model can reach, else ``UserError`` (one line)."""
    try:
        value = float(target)
    except (TypeError, ValueError):
        raise UserError(f"--flops-target must be a number in (0, 1), got {target!r}") from None
    if not 0.0 < value < 1.0 or math.isnan(value):
        raise UserError(f"--flops-target must be in (0, 1) (pruned FLOPs / teacher FLOPs), got {target}")
    if resource is not None:
        floor = resource.min_ratio(skip=skip, within=within)
        if value < floor:
            what = ("the embedding and head alone" if skip else
                    "one head, head dim and MLP unit per block" if within else "the unpruned blocks")
            raise UserError(f"--flops-target {value:g} is unreachable: {what} already cost {floor:.3f} of the "
                            f"teacher's FLOPs")
    return value
