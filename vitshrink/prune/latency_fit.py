"""The latency resource model: a least-squares fit of a runtime's measured latencies (``vitshrink.prune.latency_table``)
as a function of each block's heads, head width and MLP width, with the interface of ``ResourceModel`` so that
UVC's search and the greedy band adjustment target a predicted latency ratio instead of a FLOPs ratio.

One model's latency is ``fixed + sum over kept blocks of (a + b * attn_mmacs + c * mlp_mmacs + e * heads)`` where
``attn_mmacs = heads * head_dim * attn_unit / 1e6`` and ``mlp_mmacs = mlp * mlp_unit / 1e6`` are the block's MACs
(``ResourceModel``'s units), ``a`` the per-block cost every kept block pays (norms, residuals, kernel launches),
and ``e`` a per-head cost (one more small matmul pair and softmax per head). The fit weights each row by
``1 / measured`` (it minimises relative error, so small and large models count alike) and keeps every
coefficient but ``fixed`` non-negative (a negative cost would make the greedy add units to save time).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from torch import nn

from vitshrink.prune.resource import ResourceModel

__all__ = ["FEATURES", "LatencyFit", "fit_latency", "row_features", "LatencyModel"]

# Columns of the design matrix, in order (``fixed`` is the intercept: patch embedding, final norm, head).
FEATURES = ("fixed", "blocks", "attn_mmacs", "mlp_mmacs", "heads")


def row_features(blocks: Sequence[Sequence[int]], attn_unit: float, mlp_unit: float) -> list[float]:
    """One table row's features: a model made of ``blocks`` = [(heads, head_dim, mlp), ...]."""
    return [1.0, float(len(blocks)), sum(h * d for h, d, _ in blocks) * attn_unit / 1e6,
            sum(m for _, _, m in blocks) * mlp_unit / 1e6, float(sum(h for h, _, _ in blocks))]


class LatencyFit:
    """Coefficients (ms per feature unit, ``FEATURES`` order) and the fit's relative errors on its table."""

    def __init__(self, coef: Sequence[float], attn_unit: float, mlp_unit: float):
        self.coef = np.asarray(coef, dtype=np.float64)
        self.attn_unit, self.mlp_unit = float(attn_unit), float(mlp_unit)
        self.errors: dict[str, float] = {}

    def predict(self, blocks: Sequence[Sequence[int]]) -> float:
        return float(np.dot(self.coef, row_features(blocks, self.attn_unit, self.mlp_unit)))

    def as_dict(self) -> dict[str, Any]:
        return {"features": list(FEATURES), "coef_ms": dict(zip(FEATURES, self.coef.tolist())), **self.errors}


def fit_latency(rows: Sequence[dict[str, Any]], attn_unit: float, mlp_unit: float) -> LatencyFit:
    """Weighted least squares of ``rows`` (each ``{"blocks": [[h, d, m], ...], "ms": measured}``), relative
    weights, non-negative coefficients except ``fixed`` (an active set: the most negative one is dropped and
    the rest refitted). Records the max and mean relative error of the fit on the rows."""
    x = np.array([row_features(r["blocks"], attn_unit, mlp_unit) for r in rows], dtype=np.float64)
    y = np.array([float(r["ms"]) for r in rows], dtype=np.float64)
    w = 1.0 / np.maximum(y, 1e-9)
    active = list(range(x.shape[1]))
    while True:
        beta, *_ = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)
        coef = np.zeros(x.shape[1])
        coef[active] = beta
        negative = [j for j in active if j != 0 and coef[j] < 0]
        if not negative:
            break
        active.remove(min(negative, key=lambda j: coef[j]))
    fit = LatencyFit(coef, attn_unit, mlp_unit)
    rel = np.abs(x @ coef - y) / np.maximum(y, 1e-9)
    fit.errors = {"max_rel_error": float(rel.max()), "mean_rel_error": float(rel.mean()), "rows": len(rows)}
    return fit


class LatencyModel(ResourceModel):
    """Predicted latency (ms) of a ViT on one runtime and batch size, as a ``ResourceModel``: ``block`` is a
    block's predicted ms (tensors too, for the search), ``fixed`` the embedding + head, ``total`` the teacher's
    predicted ms, so ``ratio_of`` is the predicted latency ratio."""

    kind = "latency"
    flag = "--latency-target"

    def __init__(self, model: nn.Module, fit: LatencyFit):
        flops = ResourceModel(model)
        self.dims, self.tokens, self.embed = flops.dims, flops.tokens, flops.embed
        self.attn_unit, self.mlp_unit = flops.attn_unit, flops.mlp_unit
        self.fit = fit
        coef = fit.coef
        self._a, self._b = float(coef[1]), float(coef[2]) * self.attn_unit / 1e6
        self._c, self._e = float(coef[3]) * self.mlp_unit / 1e6, float(coef[4])
        self.fixed = float(coef[0])
        self.full_blocks = [self.block(d.num_heads, d.head_dim, d.mlp_hidden) for d in self.dims]
        self.total = self.fixed + sum(self.full_blocks)

    def block(self, heads, head_dim, mlp):
        return self._a + self._b * heads * head_dim + self._c * mlp + self._e * heads
