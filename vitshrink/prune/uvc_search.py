"""UVC's search: how many heads, head dims and MLP units each block keeps, and which blocks it skips.

Method (Yu et al., "Unified Visual Transformer Compression", ICLR 2022; official code
github.com/VITA-Group/UVC, ``uvc_utils.py`` / ``uvc_optimizer.py``), re-derived for timm ViTs:

* Prunable units per block: whole heads, dims within every kept head, MLP hidden units, and the whole
  block through a skip gate ``x <- d1 * Block(x) + d0 * x`` with ``(d0, d1)`` a Gumbel-softmax sample
  of two logits per block (hard ``argmax`` after the search).
* Which units go: those with the smallest group L2 norm (coupled tensors as in ``vitshrink.prune.surgery``);
  *how many* go is learned: a removal fraction per block and unit type, turned into an integer count by a
  straight-through ``ceil`` (UVC's ``ste_ceil``).
* Budget: ``R = MACs(pruned) / MACs(full)`` with the attention-counting model of ``vitshrink.measure``
  (qkv, Q@K^T, attn@V, proj, fc1, fc2 per block; embedding and head fixed), so the search's R is the
  counter's R for the sliced model. Constraint ``R <= B`` (``flops_target``).
* Primal-dual steps (UVC's minimax): a weight step on the KD loss, then a proximal shrink
  ``W_g /= 1 + 2 * lr * y`` of every group currently marked for removal; a step on the fractions with
  gradient ``y * (norm of the next group to go) + z * dR/dfraction`` (max-norm clipped, as UVC); a gate step
  on ``task grad + z * gating_weight * dR/dgate``; dual ascent ``z <- max(0, z + eta_z * clip(R - B))`` and
  ``y <- max(0, y + eta_y * (sum of the norms marked for removal))``.
* Then hard decisions and, if the rounded decisions miss the band ``B - tol <= R <= B``, a deterministic
  greedy adjustment (remove the unit with the smallest norm per MAC saved, or add back the largest that
  fits) so that the sliced model lands in the band. ``SearchResult.adjusted`` says whether that happened.

Differences from the official code, and why: counts are parametrised as fractions of each block's
upper bound (so one learning rate suits every width and a short CPU search moves them), and their step
is annealed (cosine) so the primal-dual oscillation around ``R = B`` settles within a short search; every kept head
of a block keeps the same number of dims (one head width per block keeps the sliced tensors regular,
each head still chooses its own dims); group norms are the full coupled groups (q, k, v rows and ``proj``
columns; ``fc1`` rows and ``fc2`` columns) and are normalised so that each unit type sums to 1 in the
average block at the start, so ``y`` has one scale for every unit type and width; the official code masks but never slices — here the plan goes to
``vitshrink.prune.surgery.slice_vit``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from vitshrink.distill import losses
from vitshrink.errors import UserError
from vitshrink.prune.surgery import (BlockKeep, Plan, block_dims, check_sliceable, head_dim_norms, head_norms,
                               mlp_unit_norms, slice_vit)

__all__ = ["UVCConfig", "SearchResult", "ResourceModel", "search_uvc", "apply_plan", "check_flops_target"]


@dataclass
class UVCConfig:
    """Search settings (defaults and their sources: recipes/uvc.yaml)."""

    flops_target: float = 0.5
    steps: int = 300
    lr: float = 1e-4  # weight step (AdamW) during the search
    weight_decay: float = 0.0
    count_lr: float = 0.02  # UVC --slr / --rlr (here in units of the per-block upper bound)
    gate_lr: float = 1e-3  # UVC --glr 1e-3
    gate_momentum: float = 0.9  # UVC: SGD(momentum=0.9) for the gates
    gate_init: float = 3.0  # initial logit margin for "keep" (keep probability ~0.95)
    gumbel_tau: float = 0.5  # UVC calc_flops / gating: tau = 0.5
    gating_weight: float = 5.0  # UVC --gating_weight 5
    z_lr: float = 10.0  # UVC --zlr_schedule_list starts at 10
    z_clip: float = 0.5  # UVC --z_grad_clip 0.5
    y_lr: float = 0.5
    kd_weight: float = 1.0
    temperature: float = 4.0
    skip: bool = True  # learn block skip gates (False: --no-skip)
    within: bool = True  # prune heads / head dims / MLP units (False: --skip-only)
    head_dims: bool = True  # prune dims within heads
    tolerance: float = 0.02  # band B - tol <= R <= B
    clip_grad: float = 1.0
    log_every: int = 50


@dataclass
class SearchResult:
    plan: Plan
    resource: float  # analytic R of the plan (equals the counter's R of the sliced model)
    search_resource: float  # R of the rounded search decisions before any greedy adjustment
    adjusted: bool  # True if the greedy adjustment changed the search's decisions
    model: nn.Module  # the searched (fine-tuned, proximally shrunk) copy of the teacher, same shape
    history: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        kept = [k for k in self.plan if k is not None]
        return {"resource": self.resource, "search_resource": self.search_resource, "adjusted": self.adjusted,
                "kept_blocks": [i for i, k in enumerate(self.plan) if k is not None],
                "heads": [len(k.heads) for k in kept], "mlp": [len(k.mlp) for k in kept]}


# --------------------------------------------------------------------------------------------------
# Resource model


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


# --------------------------------------------------------------------------------------------------
# The search-time model: gated blocks


class _GatedBlock(nn.Module):
    """``x + keep * (block(x) - x)``, i.e. ``d1 * Block(x) + d0 * x`` with ``d0 = 1 - d1``."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.keep: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out = self.block(x, **kwargs)
        return out if self.keep is None else x + self.keep * (out - x)


class _SteCeil(torch.autograd.Function):
    """Straight-through ceil (UVC ``ste_ceil``): integer forward, identity backward."""

    @staticmethod
    def forward(ctx, value):  # noqa: D102
        return value.ceil()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad


def _ste_ceil(value: torch.Tensor) -> torch.Tensor:
    return _SteCeil.apply(value)


@dataclass
class _Groups:
    """Current group norms of one block, as shares of that block's total per unit type at the search start."""

    head: torch.Tensor  # [H]
    dim: torch.Tensor  # [H, hd]
    mlp: torch.Tensor  # [M]


def _norm_scale(blocks: list[nn.Module]) -> tuple[float, float, float]:
    # Each unit type's norms sum to 1 in the *average* block, so the sparsity cost of removing a fraction
    # of a block is on the scale (0..1) of that fraction's share of FLOPs in R, while weaker blocks keep
    # their smaller norms (and so are pruned first).
    def mean_sum(fn):
        sums = [float(fn(b).sum()) for b in blocks if fn(b).numel()]
        return max(sum(sums) / max(len(sums), 1), 1e-12)

    return mean_sum(head_norms), mean_sum(head_dim_norms), mean_sum(mlp_unit_norms)


def _block_groups(block: nn.Module, scale: tuple[float, float, float]) -> _Groups:
    return _Groups(head=head_norms(block) / scale[0], dim=head_dim_norms(block) / scale[1],
                   mlp=mlp_unit_norms(block) / scale[2])


def _smallest(norms: torch.Tensor, count: int) -> torch.Tensor:
    count = max(0, min(int(count), norms.numel()))
    if count == 0:
        return norms.new_zeros(0, dtype=torch.long)
    return torch.topk(norms, count, largest=False).indices


def _removal_sets(groups: _Groups, n_heads: int, n_dims: int, n_mlp: int):
    """Indices to remove: heads (smallest head norm), then dims within each surviving head, MLP units."""
    heads = _smallest(groups.head, n_heads)
    alive = [h for h in range(groups.head.numel()) if h not in set(heads.tolist())]
    dims = {h: _smallest(groups.dim[h], n_dims) for h in alive}
    mlp = _smallest(groups.mlp, n_mlp)
    return heads, dims, mlp


@torch.no_grad()
def _shrink(block: nn.Module, heads, dims, mlp, factors: tuple[float, float, float]) -> None:
    """Proximal step for y * ||W_g||^2: divide every marked group's coupled weights by its factor."""
    attn, mlp_mod = block.attn, block.mlp
    f_head, f_dim, f_mlp = factors
    if attn is not None:
        width, hd = attn.num_heads * attn.head_dim, attn.head_dim
        scale = torch.ones(width, device=attn.qkv.weight.device)
        for h in heads.tolist():
            scale[h * hd:(h + 1) * hd] /= f_head
        for h, idx in dims.items():
            scale[h * hd + idx] /= f_dim
        rows = scale.repeat(3)
        attn.qkv.weight.mul_(rows[:, None])
        if attn.qkv.bias is not None:
            attn.qkv.bias.mul_(rows)
        attn.proj.weight.mul_(scale[None, :])
    if mlp_mod is not None and mlp.numel():
        mlp_mod.fc1.weight[mlp] /= f_mlp
        if mlp_mod.fc1.bias is not None:
            mlp_mod.fc1.bias[mlp] /= f_mlp
        mlp_mod.fc2.weight[:, mlp] /= f_mlp


def _cycle(loader_fn: Callable[[], Iterable]) -> Iterable:
    while True:
        for batch in loader_fn():
            yield batch


# --------------------------------------------------------------------------------------------------
# The search


def search_uvc(teacher: nn.Module, train_loader: Iterable | Callable[[], Iterable], config: UVCConfig, *,
               device: str | torch.device = "cpu", log: Callable[[str], None] | None = None,
               progress=None) -> SearchResult:
    """Run UVC's primal-dual search on a copy of ``teacher``; return the plan (``teacher`` is not modified).

    ``train_loader`` yields ``(images, targets, n_skipped)`` batches (``vitshrink.data.make_loader``), or is a
    callable returning a fresh such iterable per pass. Raises ``UserError`` for a target outside (0, 1) or
    below what the allowed pruning can reach.
    """
    check_sliceable(teacher)
    device = torch.device(device)
    if not config.skip and not config.within:
        raise UserError("--no-skip and --skip-only together leave nothing to prune")
    resource = ResourceModel(teacher)
    target = check_flops_target(config.flops_target, resource, skip=config.skip, within=config.within)
    teacher = teacher.to(device).eval()
    model = copy.deepcopy(teacher).to(device).train()
    for p in model.parameters():
        p.requires_grad_(True)
    dims = resource.dims
    depth = len(dims)
    wrappers = []
    for i in range(depth):
        wrapper = _GatedBlock(model.blocks[i])
        model.blocks[i] = wrapper
        wrappers.append(wrapper)

    # Fractions of each block's upper bound to remove (heads, dims, MLP): ub keeps one of each.
    ub = torch.tensor([[max(d.num_heads - 1, 0), max(d.head_dim - 1, 0), max(d.mlp_hidden - 1, 0)] for d in dims],
                      dtype=torch.float32, device=device)
    if not config.head_dims:
        ub[:, 1] = 0
    frac = torch.zeros(depth, 3, device=device, requires_grad=True)
    gates = torch.zeros(depth, 2, device=device)
    gates[:, 1] = config.gate_init
    gates.requires_grad_(config.skip)
    y = torch.full((depth, 3), 1e-3, device=device)  # sparsity duals (UVC y/p init 1e-3)
    z = torch.tensor(1e-3, device=device)  # budget dual (UVC z_init 1e-3)

    weights = [p for p in model.parameters()]
    optimizer = torch.optim.AdamW(weights, lr=config.lr, weight_decay=config.weight_decay)
    count_opt = torch.optim.SGD([frac], lr=config.count_lr)
    gate_opt = torch.optim.SGD([gates], lr=config.gate_lr, momentum=config.gate_momentum) if config.skip else None

    blocks = [w.block for w in wrappers]
    scales = [_norm_scale(blocks)] * depth

    attn_unit = float(resource.attn_unit) / resource.total
    mlp_unit = float(resource.mlp_unit) / resource.total
    full_h = torch.tensor([d.num_heads for d in dims], dtype=torch.float32, device=device)
    full_d = torch.tensor([d.head_dim for d in dims], dtype=torch.float32, device=device)
    full_m = torch.tensor([d.mlp_hidden for d in dims], dtype=torch.float32, device=device)
    fixed = resource.fixed / resource.total

    def ratio(frac_: torch.Tensor, keep_prob: torch.Tensor) -> torch.Tensor:
        counts = _ste_ceil(frac_ * ub) if config.within else torch.zeros_like(frac_)
        h, d, m = full_h - counts[:, 0], full_d - counts[:, 1], full_m - counts[:, 2]
        per_block = h * d * attn_unit + m * mlp_unit
        return fixed + (keep_prob * per_block).sum()

    batches = iter(_cycle(train_loader if callable(train_loader) else (lambda: train_loader)))
    history: list[dict[str, float]] = []
    # ``stats`` is the extra text column of the engine's progress bar.
    task = progress.add_task("UVC search", total=config.steps, stats="") if progress is not None else None
    for step in range(config.steps):
        images, targets, _ = next(batches)
        if len(targets) == 0:
            continue
        images, targets = images.to(device), targets.to(device)
        if config.skip:
            sample = F.gumbel_softmax(gates, tau=config.gumbel_tau, hard=False, dim=1)[:, 1]
            for i, w in enumerate(wrappers):
                w.keep = sample[i]
        # Weight (and gate) step on the distillation loss.
        with torch.no_grad():
            teacher_logits = teacher(images)
        logits = model(images)
        loss = losses.kd_loss(logits, teacher_logits, targets, kd_weight=config.kd_weight,
                              temperature=config.temperature)["loss"]
        optimizer.zero_grad(set_to_none=True)
        if gate_opt is not None:
            gate_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(weights, config.clip_grad)
        optimizer.step()

        # Resource R and its gradient w.r.t. the fractions and the gates.
        keep_prob = torch.softmax(gates / config.gumbel_tau, dim=1)[:, 1] if config.skip else torch.ones(depth, device=device)
        r_value = ratio(frac, keep_prob)
        inputs = [frac, gates] if config.skip else [frac]
        grads = torch.autograd.grad(r_value, inputs, allow_unused=True)
        grad_frac = grads[0] if grads[0] is not None else torch.zeros_like(frac)
        grad_gate = grads[1] if config.skip and grads[1] is not None else torch.zeros_like(gates)
        counts = (frac.detach() * ub).ceil().long() if config.within else torch.zeros(depth, 3, dtype=torch.long)

        # Proximal shrink of the marked groups, sparsity cost of the next group, dual y.
        sparsity_grad = torch.zeros(depth, 3, device=device)
        lr = optimizer.param_groups[0]["lr"]
        for i, blk in enumerate(blocks):
            if not config.within:
                break
            groups = _block_groups(blk, scales[i])
            heads, dim_sets, mlp = _removal_sets(groups, counts[i, 0], counts[i, 1], counts[i, 2])
            factors = tuple(float(1.0 + 2.0 * lr * y[i, k]) for k in range(3))
            _shrink(blk, heads, dim_sets, mlp, factors)
            removed = torch.stack([
                groups.head[heads].sum() if heads.numel() else groups.head.new_zeros(()),
                sum((groups.dim[h][idx].sum() for h, idx in dim_sets.items()), groups.head.new_zeros(())),
                groups.mlp[mlp].sum() if mlp.numel() else groups.mlp.new_zeros(()),
            ])
            nxt = torch.stack([
                _next_norm(groups.head, counts[i, 0]),
                _next_norm(torch.stack([groups.dim[h].sort().values for h in dim_sets]).mean(0) if dim_sets
                           else groups.dim.new_zeros(0), counts[i, 1]),
                _next_norm(groups.mlp, counts[i, 2]),
            ])
            sparsity_grad[i] = y[i] * nxt * ub[i]
            with torch.no_grad():
                y[i] = (y[i] + config.y_lr * removed.to(device)).clamp_min(0)

        # Step on the counts: sparsity cost + z * dR/dfraction, max-norm clipped (UVC clip_grad_norm_(s, 1, inf)).
        if config.within:
            g = sparsity_grad + z * grad_frac
            g = g / max(1.0, g.abs().max().item())
            count_opt.zero_grad(set_to_none=True)
            # Anneal the count step (cosine to 0) so the primal-dual oscillation around R = B settles by the
            # end of a short search; UVC instead runs many epochs with a rising z step.
            for group in count_opt.param_groups:
                group["lr"] = config.count_lr * 0.5 * (1 + math.cos(math.pi * step / max(config.steps, 1)))
            frac.grad = g
            count_opt.step()
            with torch.no_grad():
                frac.clamp_(0.0, 1.0)
        if gate_opt is not None:
            gate_grad = (gates.grad if gates.grad is not None else torch.zeros_like(gates))
            gates.grad = gate_grad + z * config.gating_weight * grad_gate
            gate_opt.step()
        # Dual ascent on the budget.
        with torch.no_grad():
            z = (z + config.z_lr * (r_value.detach() - target).clamp(-config.z_clip, config.z_clip)).clamp_min(0)
        record = {"step": step, "loss": float(loss.detach()), "resource": float(r_value.detach()), "z": float(z)}
        history.append(record)
        if log is not None and config.log_every and (step % config.log_every == 0 or step == config.steps - 1):
            log(f"UVC search step {step}: loss {record['loss']:.4f}, R {record['resource']:.3f} "
                f"(target {target:g}), z {record['z']:.3g}")
        if task is not None:
            progress.update(task, advance=1, stats=f"R {record['resource']:.3f} (target {target:g})")
    if task is not None:
        progress.remove_task(task)

    # Hard decisions.
    for i, w in enumerate(wrappers):
        model.blocks[i] = w.block
    model.eval()
    margin = (gates[:, 1] - gates[:, 0]).detach().cpu().tolist()
    kept = [m >= 0 for m in margin] if config.skip else [True] * depth
    counts = (frac.detach() * ub).ceil().long().tolist() if config.within else [[0, 0, 0]] * depth
    state = _DecisionState(model, resource, scales, kept, counts, margin)
    search_resource = state.ratio()
    adjusted = state.adjust(target, config.tolerance, within=config.within, skip=config.skip)
    plan = state.plan()
    return SearchResult(plan=plan, resource=resource.plan_ratio(plan), search_resource=search_resource,
                        adjusted=adjusted, model=model, history=history)


def _next_norm(norms: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """Norm of the next group to be removed (UVC ``least_s_sum`` backward): the (count+1)-th smallest."""
    count = int(count)
    if norms.numel() == 0 or count >= norms.numel():
        return norms.new_zeros(())
    return norms.sort().values[count]


class _DecisionState:
    """Integer decisions per block and the deterministic greedy that moves them into the band."""

    def __init__(self, model: nn.Module, resource: ResourceModel, scales: list[tuple[float, float, float]],
                 kept: list[bool], counts: list[list[int]], margin: list[float]):
        self.resource = resource
        self.dims = resource.dims
        self.margin = margin  # gate logit margin keep - skip: the search's confidence in each block
        self.groups = [_block_groups(b, s) for b, s in zip(model.blocks, scales)]
        self.kept = list(kept)
        # Number kept per block: heads, dims per head, MLP units (at least one of each while the block lives).
        self.n = [[max(min(d.num_heads, 1), d.num_heads - c[0]), max(min(d.head_dim, 1), d.head_dim - c[1]),
                   max(min(d.mlp_hidden, 1), d.mlp_hidden - c[2])] for d, c in zip(self.dims, counts)]

    def _per_block(self):
        return [(n[0], n[1], n[2]) if k else None for n, k in zip(self.n, self.kept)]

    def ratio(self) -> float:
        return self.resource.ratio_of(self._per_block())

    def _kept_heads(self, i: int) -> list[int]:
        order = sorted(range(self.dims[i].num_heads), key=lambda h: (-float(self.groups[i].head[h]), h))
        return sorted(order[: self.n[i][0]])

    def _moves(self, i: int, remove: bool):
        """(score, move) candidates for block i: score = normalised group norm per unit of R changed."""
        d, n, g, res = self.dims[i], self.n[i], self.groups[i], self.resource
        out = []
        heads = self._kept_heads(i)
        if d.num_heads:
            if remove and n[0] > 1:
                h = min(heads, key=lambda h: (float(g.head[h]), h))
                out.append((float(g.head[h]) / (n[1] * res.attn_unit), (i, 0, -1)))
            if not remove and n[0] < d.num_heads:
                rest = [h for h in range(d.num_heads) if h not in heads]
                h = max(rest, key=lambda h: (float(g.head[h]), -h))
                out.append((float(g.head[h]) / (n[1] * res.attn_unit), (i, 0, +1)))
            sorted_dims = g.dim[heads].sort(dim=1, descending=True).values
            if remove and n[1] > 1:
                out.append((float(sorted_dims[:, n[1] - 1].sum()) / (n[0] * res.attn_unit), (i, 1, -1)))
            if not remove and n[1] < d.head_dim:
                out.append((float(sorted_dims[:, n[1]].sum()) / (n[0] * res.attn_unit), (i, 1, +1)))
        if d.mlp_hidden:
            sorted_mlp = g.mlp.sort(descending=True).values
            if remove and n[2] > 1:
                out.append((float(sorted_mlp[n[2] - 1]) / res.mlp_unit, (i, 2, -1)))
            if not remove and n[2] < d.mlp_hidden:
                out.append((float(sorted_mlp[n[2]]) / res.mlp_unit, (i, 2, +1)))
        return out

    def _cost(self, move) -> float:
        i, kind, delta = move
        before = self.resource.block(*self.n[i])
        n = list(self.n[i])
        n[kind] += delta
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
        changed |= self._trim_units(target, tol) if within else False
        if self.ratio() > target and skip:
            for i in sorted((i for i, k in enumerate(self.kept) if k), key=lambda i: self.margin[i]):
                if self.ratio() <= target:
                    break
                self.kept[i] = False
                changed = True
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
            self.n[move[0]][move[1]] -= 1
            r = self.ratio()
            changed = True
        while r < target - tol:
            moves = [(s, m) for i in live for s, m in self._moves(i, remove=False) if r + self._cost(m) <= target]
            if not moves:
                break
            _, move = max(moves, key=lambda sm: sm[0])
            self.n[move[0]][move[1]] += 1
            r = self.ratio()
            changed = True
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


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """The physically sliced ``vitshrink_vit`` of ``model`` (use ``SearchResult.model`` for the searched weights)."""
    return slice_vit(model, plan)
