"""Attention Probe (Wang et al., ICASSP 2022, official code IIGROUP/AttentionProbe).

Two pieces, both used by ``select-wild`` and the ``probe`` recipe:

- the *probe*: the class token's attention row over the patch tokens at chosen blocks, scored by its
  cosine similarity with the uniform distribution (low = peaked = the teacher attends to something);
- the *probe distillation loss*: block features normalised over the token dimension, the class token's
  row of their token-similarity matrix, matched between teacher and student by MSE.

The class token's attention row comes from :mod:`vitshrink.distill.taps` (point ``blocks.N:cls_attn``),
recomputed from the q and k the block's fused ``attn.qkv`` already produced.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitshrink.distill.taps import FeatureTaps
from vitshrink.errors import UserError

# Official blocks 3 and 7 (0-based) of a 12-block teacher for the probe, 3, 7 and 11 for distillation:
# the blocks that end at 1/3, 2/3 and all of the depth.
PROBE_FRACTIONS = (1 / 3, 2 / 3)
DISTILL_FRACTIONS = (1 / 3, 2 / 3, 1.0)


def blocks_at_fractions(depth: int, fractions: Sequence[float]) -> list[int]:
    """0-based indices of the blocks whose output lies at ``fractions`` of ``depth`` (12 -> 3, 7, 11)."""
    return sorted({min(depth - 1, max(0, round(depth * f) - 1)) for f in fractions})


def num_prefix_tokens(model: nn.Module) -> int:
    """Class/register/distillation tokens before the patch tokens (timm's ``num_prefix_tokens``)."""
    return int(getattr(model, "num_prefix_tokens", 1))


def check_probeable(model: nn.Module, blocks: Sequence[int] | None = None) -> list[int]:
    """The blocks to probe (default: 1/3 and 2/3 of the depth), or a UserError saying why it cannot be done."""
    block_list = getattr(model, "blocks", None)
    if block_list is None or getattr(model, "cls_token", None) is None:
        raise UserError("the attention probe needs a ViT with a class token and timm-style blocks "
                        "(model.blocks[i].attn.qkv); use --criterion confidence for other teachers")
    depth = len(block_list)
    chosen = blocks_at_fractions(depth, PROBE_FRACTIONS) if blocks is None else sorted(set(int(b) for b in blocks))
    for index in chosen:
        if not 0 <= index < depth:
            raise UserError(f"--blocks: block {index} out of range for a teacher with {depth} blocks (0..{depth - 1})")
        attn = getattr(block_list[index], "attn", None)
        if not isinstance(getattr(attn, "qkv", None), nn.Linear) or not hasattr(attn, "num_heads"):
            raise UserError(f"--blocks: block {index} has no timm attention with a fused qkv projection to probe")
    return chosen


class ClassTokenAttention:
    """Context manager recording, per probed block, the class token's softmax attention over the patches.

    After each forward, ``rows[block]`` is a float tensor (B, heads, num_patches). Like the official code,
    the softmax runs over all tokens (prefix tokens included) before the patch part is kept. Built on
    :class:`vitshrink.distill.taps.FeatureTaps` (points ``blocks.N:cls_attn``).
    """

    def __init__(self, model: nn.Module, blocks: Sequence[int]):
        self.blocks = list(blocks)
        self.prefix = num_prefix_tokens(model)
        self._taps = FeatureTaps(model, [f"blocks.{i}:cls_attn" for i in self.blocks], detach=True)

    @property
    def rows(self) -> dict[int, torch.Tensor]:
        return {i: self._taps[f"blocks.{i}:cls_attn"][..., self.prefix:]
                for i in self.blocks if f"blocks.{i}:cls_attn" in self._taps}

    def __enter__(self) -> "ClassTokenAttention":
        self._taps.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._taps.__exit__(*exc)


def uniform_cosine(rows: torch.Tensor, head: int | None = 0) -> torch.Tensor:
    """Cosine similarity of attention rows (B, H, P) with the uniform distribution, per image (B,).

    ``head=0`` is the official choice (``attn[:, 0, 0, 1:]``); ``head=None`` averages the heads' cosines.
    cos(p, 1/P) = sum(p) / (sqrt(P) * ||p||), in (0, 1]; 1 means the row is uniform.
    """
    cos = rows.sum(-1) / (rows.shape[-1] ** 0.5 * rows.norm(dim=-1).clamp_min(1e-12))
    return cos.mean(dim=1) if head is None else cos[:, head]


def class_token_similarity(features: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    """Row 0 of the token-similarity matrix of features (B, N, C) normalised over tokens: (B, N - prefix)."""
    normed = F.normalize(features, p=2, dim=1)  # official: F.normalize(..., dim=2) on (layers, B, N, C)
    return (normed[:, :1] @ normed.transpose(1, 2)).squeeze(1)[:, prefix:]


def probe_distillation_loss(teacher_features: Sequence[torch.Tensor], student_features: Sequence[torch.Tensor],
                            prefix: int = 1) -> torch.Tensor:
    """Official ``patch_attention_probe_loss``: MSE between teacher and student class-token similarity rows,
    averaged over layers, images and patch tokens. Widths may differ; token counts must match."""
    if len(teacher_features) != len(student_features) or not teacher_features:
        raise ValueError("probe distillation needs the same positive number of teacher and student features")
    losses = []
    for t, s in zip(teacher_features, student_features):
        if t.shape[:2] != s.shape[:2]:
            raise ValueError(f"teacher features {tuple(t.shape)} and student features {tuple(s.shape)} differ in "
                             "batch or token count")
        losses.append(F.mse_loss(class_token_similarity(s.float(), prefix),
                                 class_token_similarity(t.float(), prefix)))
    return torch.stack(losses).mean()
