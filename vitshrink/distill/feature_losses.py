"""Feature-relation losses of the survey's other methods, as pure functions of tapped tensors.

* **Manifold distillation** (Hao et al., NeurIPS 2022; official ``ManifoldKD/losses.py``: ``layer_mf_loss``,
  ``mf_loss``): patch features are L2-normalised and their Gram matrices ("manifolds") matched between student
  and teacher within each image (intra-image), across the images of the batch at each patch position
  (inter-image), and among ``K`` patches drawn at random from the whole batch.
* **Target-aware transformer** (Lin et al., CVPR 2022; official ``sihaoevery/TaT`` ``MaskedFM`` for
  classification, ``sihaoevery/TaT-seg`` ``distiller_tat.py`` for the patch-group and anchor-point forms):
  each student position ``i`` is rebuilt from every student value ``v_j`` weighted by how its query ``q_i``
  matches the teacher at ``j`` (``softmax_j(q_i . k_j)``, one-to-all), and must equal the teacher feature there.
* **Cross-architecture** (Liu et al. 2022, arXiv 2207.05273, no public code): the partially cross attention
  projector's loss (attention and value relations, student Q/K/V partly replaced by the teacher's) and the
  group-wise linear projector's MSE.

Tensors arrive as tapped (any float dtype); every loss computes in at least float32 and returns a scalar.
Feature maps are (B, C, H, W); token features are (B, N, C).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


# ------------------------------------------------------------------------------------------ manifold
class ManifoldTerms(NamedTuple):
    """The three manifold terms: within each image, across images, among randomly sampled patches."""

    intra: torch.Tensor
    inter: torch.Tensor
    random: torch.Tensor


def _gram_gap(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the (batched) Gram matrices ``x x^T`` of student and teacher."""
    gap = teacher @ teacher.transpose(-1, -2) - student @ student.transpose(-1, -2)
    return (gap * gap).mean()


def manifold_layer_terms(student: torch.Tensor, teacher: torch.Tensor, num_random: int) -> ManifoldTerms:
    """The three terms for one (student, teacher) pair of patch features (B, N, C_s) and (B, N, C_t).

    Widths may differ (each side's Gram matrix is N x N or B x B). The ``num_random`` patches are the first of
    ``torch.randperm(B * N)`` (global CPU generator), as the official code draws them.
    """
    f_s, f_t = F.normalize(_wide(student), dim=-1), F.normalize(_wide(teacher), dim=-1)
    intra = _gram_gap(f_s, f_t)  # (B, N, N): patches of one image
    inter = _gram_gap(f_s.transpose(0, 1), f_t.transpose(0, 1))  # (N, B, B): one position across images
    batch, patches, _ = f_s.shape
    picked = torch.randperm(batch * patches)[:num_random].to(f_s.device)
    random = _gram_gap(f_s.reshape(batch * patches, -1)[picked], f_t.reshape(batch * patches, -1)[picked])
    return ManifoldTerms(intra, inter, random)


def manifold_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor], *,
                  num_random: int, intra_weight: float, inter_weight: float, random_weight: float
                  ) -> ManifoldTerms:
    """Weighted terms averaged over the layer pairs (``mf_loss``); returns each weighted term.

    When the student has more tokens than the teacher, that many are dropped from its front, as the official
    code does (a DeiT student's class token goes; its distillation token then lines up with the teacher's class
    token); both sides otherwise keep every token, the class token included.
    """
    if not student_feats or len(student_feats) != len(teacher_feats):
        raise ValueError("manifold loss: need as many student as teacher features (at least one)")
    extra = student_feats[0].shape[1] - teacher_feats[0].shape[1]
    if extra < 0:
        raise ValueError(f"manifold loss: the student has {student_feats[0].shape[1]} tokens, fewer than the "
                         f"teacher's {teacher_feats[0].shape[1]} (the patch grids must match)")
    terms = [manifold_layer_terms(s[:, extra:], t, num_random) for s, t in zip(student_feats, teacher_feats)]
    count = len(terms)
    return ManifoldTerms(intra_weight * sum(t.intra for t in terms) / count,
                         inter_weight * sum(t.inter for t in terms) / count,
                         random_weight * sum(t.random for t in terms) / count)


# ------------------------------------------------------------------------------------------ TaT
def target_aware_loss(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, target: torch.Tensor,
                      heads: int = 1) -> torch.Tensor:
    """One-to-all spatial matching: ``MSE(softmax(q k^T) v, target)`` per head, no 1/sqrt(d) scale.

    ``query``/``value`` from the student, ``key``/``target`` from the teacher, all (B, C, H, W); the C channels
    split into ``heads`` contiguous groups, each its own softmax over the H*W teacher positions.
    """
    batch, channels, height, width = value.shape

    def heads_of(x: torch.Tensor) -> torch.Tensor:  # (B, heads, HW, C / heads)
        return _wide(x).reshape(batch, heads, channels // heads, height * width).transpose(-1, -2)

    weights = (heads_of(query) @ heads_of(key).transpose(-1, -2)).softmax(dim=-1)
    rebuilt = (weights @ heads_of(value)).transpose(-1, -2).reshape(batch, channels, height, width)
    return F.mse_loss(rebuilt, _wide(target))


def _stacked_regions(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(B, C, H, W) cut into rows x cols regions, stacked on channels: (B, rows*cols*C, H/rows, W/cols)."""
    batch, channels, height, width = x.shape
    kh, kw = height // rows, width // cols
    tiles = x.unfold(2, kh, kh).unfold(3, kw, kw)  # (B, C, rows, cols, kh, kw)
    return tiles.reshape(batch, channels, rows * cols, kh, kw).transpose(1, 2).reshape(batch, -1, kh, kw)


def patch_group_loss(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, target: torch.Tensor, *,
                     rows: int, cols: int, heads: int) -> torch.Tensor:
    """Patch-group distillation (TaT-seg ``stack_attn``): the map is cut into rows x cols regions stacked on
    channels, then split into ``heads`` groups of regions; each group matches within the region's positions."""
    q, k, v, t = (_stacked_regions(x, rows, cols) for x in (query, key, value, target))
    return target_aware_loss(q, k, v, t, heads=heads)


def anchor_point_loss(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, target: torch.Tensor, *,
                      anchor_rows: int, anchor_cols: int) -> torch.Tensor:
    """Anchor-point distillation: every map average-pooled to anchor_rows x anchor_cols anchors (kernel =
    stride = H // anchor_rows, W // anchor_cols), then one-to-all matching among the anchors (one head)."""
    kernel = (query.shape[2] // anchor_rows, query.shape[3] // anchor_cols)
    q, k, v, t = (F.avg_pool2d(_wide(x), kernel, kernel) for x in (query, key, value, target))
    return target_aware_loss(q, k, v, t, heads=1)


# ------------------------------------------------------------------------------------------ cross-architecture
def partial_cross(student: torch.Tensor, teacher: torch.Tensor, probability: float) -> torch.Tensor:
    """Each element of the student's matrix replaced by the teacher's with ``probability`` (a fresh Bernoulli
    draw per element from the global generator); the replaced elements carry no gradient to the student."""
    if probability <= 0:
        return student
    chosen = torch.rand(student.shape, device=student.device) < probability
    return torch.where(chosen, teacher.to(student.dtype), student)


def _relation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (_wide(a) @ _wide(b).transpose(-1, -2) / math.sqrt(a.shape[-1])).softmax(dim=-1)


def cross_attention_loss(student_qkv: Sequence[torch.Tensor], teacher_qkv: Sequence[torch.Tensor]) -> torch.Tensor:
    """The PCA projector's loss: ``MSE(A_T, A_S) + MSE(R_T, R_S)`` with ``A = softmax(Q K^T / sqrt(d))`` and the
    value relation ``R = softmax(V V^T / sqrt(d))``; each (B, heads, N, d), ``d`` the head width."""
    q_s, k_s, v_s = student_qkv
    q_t, k_t, v_t = teacher_qkv
    return F.mse_loss(_relation(q_s, k_s), _relation(q_t, k_t)) + F.mse_loss(_relation(v_s, v_s), _relation(v_t, v_t))
