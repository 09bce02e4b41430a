"""Hard decisions of a search (blocks kept, units kept per block) and the deterministic greedy that moves
them into the band ``target - tol <= R <= target`` of a resource model (FLOPs or predicted latency).

With ``dim_multiple`` M > 1 every pruned head dim and MLP width is a multiple of M (``resource.allowed_widths``):
the greedy moves those widths M units at a time, so heads x head dim is a multiple of M too."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vitshrink.prune.importance import block_groups
from vitshrink.prune.plan import BlockKeep, Plan
from vitshrink.prune.resource import ResourceModel, allowed_widths

__all__ = ["Decisions", "SearchResult", "magnitude_plan", "decided_ratio"]


class Decisions:
    """Integer decisions per block and the deterministic greedy that moves them into the band."""

    def __init__(self, model: nn.Module, resource: ResourceModel, scales: list[tuple[float, float, float]],
                 kept: list[bool], counts: list[list[int]], margin: list[float], dim_multiple: int = 1):
        self.resource = resource
        self.dims = resource.dims
        self.margin = margin  # gate logit margin keep - skip: the search's confidence in each block
        self.groups = [block_groups(b, s) for b, s in zip(model.blocks, scales)]
        self.kept = list(kept)
        self.moves = 0  # greedy moves made by ``adjust`` (blocks re-enabled or skipped, width steps)
        self.widths = _allowed(self.dims, dim_multiple)
        self.n = _kept_counts(self.dims, counts, self.widths)

    def _per_block(self):
        return [(n[0], n[1], n[2]) if k else None for n, k in zip(self.n, self.kept)]

    def ratio(self) -> float:
        return self.resource.ratio_of(self._per_block())

    def _kept_heads(self, i: int) -> list[int]:
        order = sorted(range(self.dims[i].num_heads), key=lambda h: (-float(self.groups[i].head[h]), h))
        return sorted(order[: self.n[i][0]])

    def _step(self, i: int, kind: int, remove: bool) -> int | None:
        """The next allowed count below (``remove``) or above the current one, None at the end of the grid."""
        grid, now = self.widths[i][kind], self.n[i][kind]
        nxt = [w for w in grid if w < now] if remove else [w for w in grid if w > now]
        return (max(nxt) if remove else min(nxt)) if nxt else None

    def _moves(self, i: int, remove: bool):
        """(score, move) candidates for block i: score = normalised group norm per unit of R changed; a move
        ``(i, kind, new_count)`` changes heads (kind 0), dims per head (1) or MLP units (2)."""
        d, n, g = self.dims[i], self.n[i], self.groups[i]
        out = []
        heads = self._kept_heads(i)
        if d.num_heads:
            if (to := self._step(i, 0, remove)) is not None:
                rest = [h for h in range(d.num_heads) if h not in heads]
                h = (min(heads, key=lambda h: (float(g.head[h]), h)) if remove else
                     max(rest, key=lambda h: (float(g.head[h]), -h)))
                out.append(self._scored(float(g.head[h]), (i, 0, to)))
            if (to := self._step(i, 1, remove)) is not None:
                sorted_dims = g.dim[heads].sort(dim=1, descending=True).values
                lo, hi = min(n[1], to), max(n[1], to)
                out.append(self._scored(float(sorted_dims[:, lo:hi].sum()), (i, 1, to)))
        if d.mlp_hidden and (to := self._step(i, 2, remove)) is not None:
            sorted_mlp = g.mlp.sort(descending=True).values
            lo, hi = min(n[2], to), max(n[2], to)
            out.append(self._scored(float(sorted_mlp[lo:hi].sum()), (i, 2, to)))
        return out

    def _scored(self, norm: float, move) -> tuple[float, tuple[int, int, int]]:
        return norm / max(abs(self._cost(move)), 1e-12), move

    def _cost(self, move) -> float:
        i, kind, to = move
        before = self.resource.block(*self.n[i])
        n = list(self.n[i])
        n[kind] = to
        return (self.resource.block(*n) - before) / self.resource.total

    def adjust(self, target: float, tol: float, *, within: bool, skip: bool) -> bool:
        """Move the decisions into ``target - tol <= R <= target``; return whether anything changed.

        Blocks: while R is too low, re-enable skipped blocks (most confident "keep" gate first; with
        ``within`` the unit loop trims afterwards, without it only blocks that fit are re-enabled); while R
        is too high with one unit per branch left, skip blocks (least confident first). Units: remove the
        group with the smallest norm share per MAC saved while R > target; add back the largest that fits
        while R < target - tol.
        """
        changed = False
        if skip:
            for i in sorted((i for i, k in enumerate(self.kept) if not k), key=lambda i: -self.margin[i]):
                if self.ratio() >= target - tol:
                    break
                self.kept[i] = True
                if not within and self.ratio() > target:
                    self.kept[i] = False
                else:
                    changed = True
                    self.moves += 1
        changed |= self._trim_units(target, tol) if within else False
        if self.ratio() > target and skip:
            for i in sorted((i for i, k in enumerate(self.kept) if k), key=lambda i: self.margin[i]):
                if self.ratio() <= target:
                    break
                self.kept[i] = False
                changed = True
                self.moves += 1
            if within:
                self._trim_units(target, tol)
        return changed

    def _trim_units(self, target: float, tol: float) -> bool:
        changed = False
        live = [i for i, k in enumerate(self.kept) if k]
        r = self.ratio()
        while r > target:
            moves = [m for i in live for m in self._moves(i, remove=True)]
            if not moves:
                break
            _, move = min(moves, key=lambda sm: sm[0])
            self.n[move[0]][move[1]] = move[2]
            r = self.ratio()
            changed = True
            self.moves += 1
        while r < target - tol:
            moves = [(s, m) for i in live for s, m in self._moves(i, remove=False) if r + self._cost(m) <= target]
            if not moves:
                break
            _, move = max(moves, key=lambda sm: sm[0])
            self.n[move[0]][move[1]] = move[2]
            r = self.ratio()
            changed = True
            self.moves += 1
        return changed

    def plan(self) -> Plan:
        plan: Plan = []
        for i, (d, n, g) in enumerate(zip(self.dims, self.n, self.groups)):
            if not self.kept[i]:
                plan.append(None)
                continue
            heads = self._kept_heads(i) if d.num_heads else []
            head_dims = None
            if heads and n[1] < d.head_dim:
                head_dims = [sorted(torch.topk(g.dim[h], n[1]).indices.tolist()) for h in heads]
            mlp = sorted(torch.topk(g.mlp, n[2]).indices.tolist()) if d.mlp_hidden else []
            plan.append(BlockKeep(heads=heads, mlp=mlp, head_dims=head_dims))
        return plan


@dataclass
class SearchResult:
    plan: Plan
    resource: float  # analytic R of the plan (equals the counter's R of the sliced model)
    search_resource: float  # R of the rounded search decisions before any greedy adjustment
    adjusted: bool  # True if the greedy adjustment changed the search's decisions
    model: nn.Module  # the searched (fine-tuned, proximally shrunk) copy of the teacher, same shape
    history: list[dict[str, float]] = field(default_factory=list)
    decisions: Decisions | None = None  # the final decisions; ``redecide`` moves them to another band
    health: dict[str, Any] = field(default_factory=dict)  # uvc_health.search_health: traces, band, greedy, restarts

    def redecide(self, target: float, tolerance: float, *, within: bool = True, skip: bool = True) -> Plan:
        """Move the final decisions into ``[target - tolerance, target]`` (same greedy) and take that plan."""
        self.decisions.adjust(target, tolerance, within=within, skip=skip)
        self.plan = self.decisions.plan()
        self.resource = self.decisions.resource.plan_ratio(self.plan)
        return self.plan

    def summary(self) -> dict[str, Any]:
        kept = [k for k in self.plan if k is not None]
        return {"resource": self.resource, "search_resource": self.search_resource, "adjusted": self.adjusted,
                "kept_blocks": [i for i, k in enumerate(self.plan) if k is not None],
                "heads": [len(k.heads) for k in kept], "mlp": [len(k.mlp) for k in kept]}


def magnitude_plan(model: nn.Module, target: float, tolerance: float = 0.02,
                   resource: ResourceModel | None = None, dim_multiple: int = 1) -> Plan:
    """One-shot plan with no search: starting from the full model, remove the group with the smallest normalised
    norm per MAC saved until ``R <= target``, then add back the largest that fits while ``R < target - tol``
    (``dim_multiple``: head dims and MLP widths move M units at a time).

    Every block stays (block removal needs a learned gate); the same greedy finishes UVC's search decisions.
    """
    from vitshrink.prune.importance import norm_scale

    resource = resource or ResourceModel(model)
    scales = [norm_scale(list(model.blocks))] * len(resource.dims)
    depth = len(resource.dims)
    state = Decisions(model, resource, scales, [True] * depth, [[0, 0, 0]] * depth, [0.0] * depth, dim_multiple)
    state.adjust(target, tolerance, within=True, skip=False)
    return state.plan()


def _allowed(dims, dim_multiple: int) -> list[list[list[int]]]:
    """Allowed kept counts per block and kind: any head count; head dims and MLP widths on the M grid."""
    return [[list(range(1, d.num_heads + 1)) or [0], allowed_widths(d.head_dim, dim_multiple),
             allowed_widths(d.mlp_hidden, dim_multiple)] for d in dims]


def _kept_counts(dims, counts, widths) -> list[list[int]]:
    """Number kept per block: heads, dims per head, MLP units (the nearest allowed value to what the search kept;
    at least one of each while the block lives)."""
    return [[_nearest(w[0], d.num_heads - c[0]), _nearest(w[1], d.head_dim - c[1]),
             _nearest(w[2], d.mlp_hidden - c[2])] for d, c, w in zip(dims, counts, widths)]


def decided_ratio(resource: ResourceModel, kept: list[bool], counts: list[list[int]], dim_multiple: int = 1) -> float:
    """R of hard decisions as ``Decisions`` rounds them, before any greedy adjustment (cheap: no group norms)."""
    n = _kept_counts(resource.dims, counts, _allowed(resource.dims, dim_multiple))
    return resource.ratio_of(tuple(c) if k else None for c, k in zip(n, kept))


def _nearest(grid: list[int], value: int) -> int:
    """The allowed count nearest ``value`` (the smaller one on a tie)."""
    return min(grid, key=lambda w: (abs(w - value), w))
