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
  counter's R for the sliced model. Constraint ``R <= B`` (``flops_target``). With ``latency_target``, R is the
  predicted latency ratio of a fitted ``vitshrink.prune.latency_fit.LatencyModel`` (same interface) instead.
* Search loss (``search_objective``, see ``vitshrink.prune.uvc_objective``): ``official`` is UVC's DeiT soft
  loss (alpha 0.1, KL summed / numel, T = 1) plus label-smoothed CE on mixup/cutmix batches, after a warm-up
  that trains the weights with every gate fixed at 0.5; ``kd`` is pure ``T^2 KL`` at T = 4 from the start.
* Primal-dual steps (UVC's minimax): a weight step on the search loss (AdamW, weight decay per objective), then
  a proximal shrink ``W_g /= 1 + 2 * lr * y`` of every group currently marked for removal; a step on the
  fractions with gradient ``y * (norm of the next group to go) + z * dR/dfraction`` (max-norm clipped, as UVC);
  a gate step on ``task grad + z * gating_weight * dR/dgate`` (``official``: UVC's weighted mean over
  ``gate_interval`` steps, SGD weight decay 1e-4, and the gates also in AdamW); dual ascent
  ``z <- z + eta_z * clip(R - B)`` and ``y <- max(0, y + eta_y * (sum of the norms marked for removal))``.
* Then hard decisions and, if the rounded decisions miss the band ``B - tol <= R <= B``, a deterministic
  greedy adjustment (remove the unit with the smallest norm per MAC saved, or add back the largest that
  fits) so that the sliced model lands in the band. ``SearchResult.adjusted`` says whether that happened.
  With ``dim_multiple`` M the decisions are rounded to, and the greedy moves along, widths that are multiples of M.
  ``sliced_student(restore=True)`` slices the teacher's own weights with the plan.

Differences from the official code, and why (the full table: docs/FIDELITY.md): the dual z is two-sided
(``two_sided_dual``; UVC clamps it at 0, which let R run far below the target on a real model);
counts are parametrised as fractions of each block's
upper bound (so one learning rate suits every width and a short CPU search moves them), and their step
is annealed (cosine) so the primal-dual oscillation around ``R = B`` settles within a short search (UVC's
"rising" z schedule, ``PresetLRScheduler``, writes a key no optimizer reads, so its z step is constant too);
every kept head of a block keeps the same number of dims (one head width per block keeps the sliced tensors
regular, each head still chooses its own dims); group norms are the full coupled groups (q, k, v rows and
``proj`` columns; ``fc1`` rows and ``fc2`` columns) and are normalised so that each unit type sums to 1 in the
average block at the start, so ``y`` has one scale for every unit type and width; R uses the gates' softmax
(expected cost) where UVC draws a Gumbel sample; the official code masks but never slices — here the plan
goes to ``vitshrink.prune.surgery.slice_vit``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from vitshrink.errors import UserError
from vitshrink.models.blockwise_vit import as_logits
from vitshrink.prune.decisions import Decisions
from vitshrink.prune.importance import block_groups, next_norm, norm_scale, removal_sets
from vitshrink.prune.plan import Plan
from vitshrink.prune.resource import ResourceModel, check_flops_target, check_target
from vitshrink.prune.surgery import check_sliceable, slice_vit
from vitshrink.prune.uvc_gates import GatedBlock, cycle, shrink_groups, ste_ceil
from vitshrink.prune.uvc_objective import SEARCH_OBJECTIVES, OfficialLoss, kd_search_loss

__all__ = ["UVCConfig", "SearchResult", "ResourceModel", "search_uvc", "sliced_student", "check_flops_target"]


@dataclass
class UVCConfig:
    """Search settings (defaults and their sources: recipes/uvc.yaml; ``for_objective`` fills the rest)."""

    flops_target: float = 0.5
    latency_target: float | None = None  # ratio of the teacher's predicted latency (search_uvc's ``resource``)
    dim_multiple: int = 1  # every pruned head dim and MLP width a multiple of this (hardware-friendly widths)
    steps: int = 300
    objective: str = "kd"  # "official" (DeiT soft loss + mixup CE, as VITA-Group/UVC) or "kd" (T^2 KL only)
    lr: float = 1e-4  # weight step (AdamW) during the search
    weight_decay: float = 0.0
    warmup_steps: int = 0  # first steps: weights only, every gate fixed at ``warmup_keep``, no count/dual steps
    warmup_keep: float = 0.5  # UVC's warm-up mixes every block half and half (model_distilled.py)
    count_lr: float = 0.02  # UVC --slr / --rlr (here in units of the per-block upper bound)
    gate_lr: float = 1e-3  # UVC --glr 1e-3
    gate_momentum: float = 0.9  # UVC: SGD(momentum=0.9) for the gates
    gate_weight_decay: float = 0.0  # UVC: 1e-4
    gate_interval: int = 1  # UVC --gating_interval 100: gate step on a weighted mean of that many steps' gradients
    gates_in_weight_optimizer: bool = False  # UVC: the gates are model parameters, so AdamW steps them too
    gate_init: float = 3.0  # keep - skip logit margin; keep probability sigmoid(gate_init / gumbel_tau)
    gumbel_tau: float = 0.5  # UVC calc_flops / gating: tau = 0.5
    gating_weight: float = 5.0  # UVC --gating_weight 5
    z_lr: float = 10.0  # UVC --zlr_schedule_list starts at 10
    z_clip: float = 0.5  # UVC --z_grad_clip 0.5
    two_sided_dual: bool = True  # z may go negative while R < target (vitshrink; UVC clamps z >= 0)
    y_lr: float = 0.5
    kd_weight: float = 1.0
    temperature: float = 4.0
    alpha: float = 0.1  # official objective: --distillation-alpha 0.1
    tau: float = 1.0  # official objective: --distillation-tau 1.0
    skip: bool = True  # learn block skip gates (False: --no-skip)
    within: bool = True  # prune heads / head dims / MLP units (False: --skip-only)
    head_dims: bool = True  # prune dims within heads
    tolerance: float = 0.02  # band B - tol <= R <= B
    clip_grad: float = 1.0
    log_every: int = 50

    @classmethod
    def for_objective(cls, objective: str, **settings: Any) -> "UVCConfig":
        """A config whose unset (``None``) objective-dependent settings take ``objective``'s values."""
        if objective not in SEARCH_OBJECTIVES:
            raise UserError(f"search_objective must be one of {sorted(SEARCH_OBJECTIVES)}, got {objective!r}")
        implied = dict(SEARCH_OBJECTIVES[objective])
        fraction = implied.pop("warmup_fraction")
        steps = int(settings.get("steps") or cls.steps)
        implied["warmup_steps"] = int(round(fraction * steps))
        given = {k: v for k, v in settings.items() if v is not None}
        return cls(objective=objective, **{**implied, **given})


@dataclass
class SearchResult:
    plan: Plan
    resource: float  # analytic R of the plan (equals the counter's R of the sliced model)
    search_resource: float  # R of the rounded search decisions before any greedy adjustment
    adjusted: bool  # True if the greedy adjustment changed the search's decisions
    model: nn.Module  # the searched (fine-tuned, proximally shrunk) copy of the teacher, same shape
    history: list[dict[str, float]] = field(default_factory=list)
    decisions: Decisions | None = None  # the final decisions; ``redecide`` moves them to another band

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


# --------------------------------------------------------------------------------------------------
# The search

class _Search:
    """The state of one primal-dual search: the gated copy of the teacher, the fractions, gates and duals."""

    def __init__(self, teacher: nn.Module, config: UVCConfig, resource: ResourceModel, target: float,
                 device: torch.device):
        self.config, self.resource, self.target, self.device = config, resource, target, device
        self.teacher = teacher.to(device).eval()
        self.model = copy.deepcopy(teacher).to(device).train()
        for p in self.model.parameters():
            p.requires_grad_(True)
        dims = resource.dims
        self.depth = len(dims)
        self.wrappers = []
        for i in range(self.depth):
            wrapper = GatedBlock(self.model.blocks[i])
            self.model.blocks[i] = wrapper
            self.wrappers.append(wrapper)
        self.blocks = [w.block for w in self.wrappers]
        # Fractions of each block's upper bound to remove (heads, dims, MLP): ub keeps one of each.
        self.ub = torch.tensor([[max(d.num_heads - 1, 0), max(d.head_dim - 1, 0), max(d.mlp_hidden - 1, 0)]
                                for d in dims], dtype=torch.float32, device=device)
        if not config.head_dims:
            self.ub[:, 1] = 0
        self.frac = torch.zeros(self.depth, 3, device=device, requires_grad=True)
        # (skip, keep) logits, symmetric about 0 as UVC's [-1, 1] (the softmax only sees the margin).
        self.gates = torch.tensor([[-config.gate_init / 2, config.gate_init / 2]] * self.depth, device=device)
        self.gates.requires_grad_(config.skip)
        self.gate_grads: list[torch.Tensor] = []  # UVC accumulates gate gradients between gate steps
        self.y = torch.full((self.depth, 3), 1e-3, device=device)  # sparsity duals (UVC y/p init 1e-3)
        self.z = torch.tensor(1e-3, device=device)  # budget dual (UVC z_init 1e-3)
        self.weights = list(self.model.parameters())
        groups = [{"params": self.weights}]
        if config.skip and config.gates_in_weight_optimizer:
            groups.append({"params": [self.gates]})
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        self.count_opt = torch.optim.SGD([self.frac], lr=config.count_lr)
        self.gate_opt = (torch.optim.SGD([self.gates], lr=config.gate_lr, momentum=config.gate_momentum,
                                         weight_decay=config.gate_weight_decay) if config.skip else None)
        self.objective = OfficialLoss(int(teacher.num_classes), alpha=config.alpha, tau=config.tau) \
            if config.objective == "official" else None
        self.scales = [norm_scale(self.blocks)] * self.depth
        self.full = torch.tensor([[d.num_heads, d.head_dim, d.mlp_hidden] for d in dims], dtype=torch.float32,
                                 device=device)

    def ratio(self, frac: torch.Tensor, keep_prob: torch.Tensor) -> torch.Tensor:
        """Differentiable R of the current fractions and keep probabilities (straight-through ceil)."""
        counts = ste_ceil(frac * self.ub) if self.config.within else torch.zeros_like(frac)
        h, d, m = (self.full - counts).unbind(1)
        per_block = self.resource.block(h, d, m) / self.resource.total
        return self.resource.fixed / self.resource.total + (keep_prob * per_block).sum()

    def step(self, images: torch.Tensor, targets: torch.Tensor, step: int) -> dict[str, float]:
        """One primal-dual step; returns the history record.

        During the warm-up (UVC: 5 of 30 epochs) only the weights move, with every gate fixed; no proximal,
        count, gate or dual step (UVC's proximal step there marks nothing, since no count has moved yet).
        """
        warmup = step < self.config.warmup_steps
        loss = self._weight_step(images, targets, warmup)
        r_value, grad_frac, grad_gate = self._resource_grads()
        if warmup:
            return {"step": step, "loss": float(loss), "resource": float(r_value.detach()), "z": float(self.z)}
        sparsity_grad = self._proximal_step()
        if self.config.within:
            self._count_step(sparsity_grad + self.z * grad_frac, step)
        if self.gate_opt is not None:
            self._gate_step(grad_gate, step)
        # Dual ascent on the budget. One-sided (UVC) lets z sit at 0 while R < B, and R can then run far
        # below the target on momentum and the proximal shrink; two-sided, z < 0 pulls R back up.
        with torch.no_grad():
            gap = (r_value.detach() - self.target).clamp(-self.config.z_clip, self.config.z_clip)
            self.z = self.z + self.config.z_lr * gap
            if not self.config.two_sided_dual:
                self.z = self.z.clamp_min(0)
        return {"step": step, "loss": float(loss), "resource": float(r_value.detach()), "z": float(self.z)}

    def _gate_step(self, grad_gate: torch.Tensor, step: int) -> None:
        """``task grad + z * gating_weight * dR/dgate``; with ``gate_interval > 1`` as UVC's uvc_optimizer:
        gradients weighted by ``global_step % interval`` are averaged, and the gates step every ``interval``."""
        config = self.config
        task_grad = self.gates.grad if self.gates.grad is not None else torch.zeros_like(self.gates)
        grad = task_grad + self.z * config.gating_weight * grad_gate
        if config.gate_interval <= 1:
            self.gates.grad = grad
            self.gate_opt.step()
            return
        global_step = step + 1  # UVC counts optimizer steps from 1
        self.gate_grads.append(grad * (global_step % config.gate_interval))
        if (global_step + 1) % config.gate_interval == 0:
            self.gates.grad = torch.stack(self.gate_grads).mean(0)
            self.gate_opt.step()
            self.gate_grads = []
        self.gate_opt.zero_grad(set_to_none=True)

    def _weight_step(self, images: torch.Tensor, targets: torch.Tensor, warmup: bool) -> torch.Tensor:
        """Weight (and gate) step on the search loss, with one Gumbel-softmax sample of the skip gates."""
        config = self.config
        if config.skip:
            sample = (torch.full((self.depth,), config.warmup_keep, device=self.device) if warmup else
                      F.gumbel_softmax(self.gates, tau=config.gumbel_tau, hard=False, dim=1)[:, 1])
            for i, w in enumerate(self.wrappers):
                w.keep = sample[i]
        if self.objective is not None:
            images, soft_targets = self.objective.mix(images, targets)
        with torch.no_grad():
            teacher_logits = as_logits(self.teacher, self.teacher(images))  # a softmax head's log-probabilities
        logits = self.model(images)
        if self.objective is not None:
            loss = self.objective(logits, teacher_logits, soft_targets)["loss"]
        else:
            loss = kd_search_loss(logits, teacher_logits, targets, kd_weight=config.kd_weight,
                                  temperature=config.temperature)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        if self.gate_opt is not None:
            self.gate_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.weights, config.clip_grad)
        self.optimizer.step()
        return loss.detach()

    def _resource_grads(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """R and its gradient w.r.t. the fractions and the gates."""
        skip = self.config.skip
        keep_prob = (torch.softmax(self.gates / self.config.gumbel_tau, dim=1)[:, 1] if skip
                     else torch.ones(self.depth, device=self.device))
        r_value = self.ratio(self.frac, keep_prob)
        inputs = [self.frac, self.gates] if skip else [self.frac]
        grads = torch.autograd.grad(r_value, inputs, allow_unused=True)
        grad_frac = grads[0] if grads[0] is not None else torch.zeros_like(self.frac)
        grad_gate = grads[1] if skip and grads[1] is not None else torch.zeros_like(self.gates)
        return r_value, grad_frac, grad_gate

    def counts(self) -> torch.Tensor:
        """Units marked for removal per block (heads, dims per head, MLP units)."""
        if not self.config.within:
            return torch.zeros(self.depth, 3, dtype=torch.long)
        return (self.frac.detach() * self.ub).ceil().long()

    def _proximal_step(self) -> torch.Tensor:
        """Proximal shrink of the marked groups, sparsity cost of the next group to go, dual ascent on y."""
        sparsity_grad = torch.zeros(self.depth, 3, device=self.device)
        if not self.config.within:
            return sparsity_grad
        counts = self.counts()
        lr = self.optimizer.param_groups[0]["lr"]
        y = self.y
        for i, blk in enumerate(self.blocks):
            groups = block_groups(blk, self.scales[i])
            heads, dim_sets, mlp = removal_sets(groups, counts[i, 0], counts[i, 1], counts[i, 2])
            factors = tuple(float(1.0 + 2.0 * lr * y[i, k]) for k in range(3))
            shrink_groups(blk, heads, dim_sets, mlp, factors)
            zero = groups.head.new_zeros(())
            removed = torch.stack([
                groups.head[heads].sum() if heads.numel() else zero,
                sum((groups.dim[h][idx].sum() for h, idx in dim_sets.items()), zero),
                groups.mlp[mlp].sum() if mlp.numel() else zero,
            ])
            mean_dims = (torch.stack([groups.dim[h].sort().values for h in dim_sets]).mean(0) if dim_sets
                         else groups.dim.new_zeros(0))
            nxt = torch.stack([next_norm(groups.head, counts[i, 0]), next_norm(mean_dims, counts[i, 1]),
                               next_norm(groups.mlp, counts[i, 2])])
            sparsity_grad[i] = y[i] * nxt * self.ub[i]
            with torch.no_grad():
                y[i] = (y[i] + self.config.y_lr * removed.to(self.device)).clamp_min(0)
        return sparsity_grad

    def _count_step(self, grad: torch.Tensor, step: int) -> None:
        """Step on the fractions: sparsity cost + z * dR/dfraction, max-norm clipped.

        UVC: ``clip_grad_norm_(s, 1.0, inf)``.
        """
        grad = grad / max(1.0, grad.abs().max().item())
        self.count_opt.zero_grad(set_to_none=True)
        # Anneal the count step (cosine to 0) so the primal-dual oscillation around R = B settles by the end of
        # a short search (our choice; the official code keeps its step constant).
        for group in self.count_opt.param_groups:
            group["lr"] = self.config.count_lr * 0.5 * (1 + math.cos(math.pi * step / max(self.config.steps, 1)))
        self.frac.grad = grad
        self.count_opt.step()
        with torch.no_grad():
            self.frac.clamp_(0.0, 1.0)

    def decide(self) -> SearchResult:
        """Hard decisions, moved into the band if needed; the searched model is unwrapped and returned."""
        config = self.config
        for i, w in enumerate(self.wrappers):
            self.model.blocks[i] = w.block
        self.model.eval()
        margin = (self.gates[:, 1] - self.gates[:, 0]).detach().cpu().tolist()
        kept = [m >= 0 for m in margin] if config.skip else [True] * self.depth
        state = Decisions(self.model, self.resource, self.scales, kept, self.counts().tolist(), margin,
                          config.dim_multiple)
        search_resource = state.ratio()
        adjusted = state.adjust(self.target, config.tolerance, within=config.within, skip=config.skip)
        plan = state.plan()
        return SearchResult(plan=plan, resource=self.resource.plan_ratio(plan), search_resource=search_resource,
                            adjusted=adjusted, model=self.model, decisions=state)


def sliced_student(teacher: nn.Module, result: SearchResult, *, restore: bool = True) -> nn.Module:
    """The physically sliced student of a search.

    ``restore``: every kept weight comes from ``teacher`` (the search decides the plan only), so the
    proximal shrink, which also dents groups that end up kept, leaves no trace; otherwise the searched
    (shrunk, fine-tuned) weights are sliced.
    """
    return slice_vit(teacher if restore else result.model, result.plan)


def search_uvc(teacher: nn.Module, train_loader: Iterable | Callable[[], Iterable], config: UVCConfig, *,
               device: str | torch.device = "cpu", log: Callable[[str], None] | None = None,
               progress=None, resource: ResourceModel | None = None) -> SearchResult:
    """Run UVC's primal-dual search on a copy of ``teacher``; return the plan (``teacher`` is not modified).

    ``train_loader`` yields ``(images, targets, n_skipped)`` batches (``vitshrink.data.make_loader``), or is a
    callable returning a fresh such iterable per pass. ``resource`` is what the budget counts: the teacher's
    MACs (default, ``config.flops_target``) or a fitted ``LatencyModel`` (``config.latency_target``). Raises
    ``UserError`` for a target outside (0, 1) or below what the allowed pruning can reach.
    """
    check_sliceable(teacher)
    if not config.skip and not config.within:
        raise UserError("--no-skip and --skip-only together leave nothing to prune")
    if config.objective not in SEARCH_OBJECTIVES:
        raise UserError(f"search_objective must be one of {sorted(SEARCH_OBJECTIVES)}, got {config.objective!r}")
    resource = resource or ResourceModel(teacher)
    target = check_target(config.latency_target if resource.kind == "latency" else config.flops_target, resource,
                          skip=config.skip, within=config.within, dim_multiple=config.dim_multiple,
                          flag=resource.flag, what=resource.kind if resource.kind == "latency" else "FLOPs")
    device = torch.device(device)
    search = _Search(teacher, config, resource, target, device)
    batches = iter(cycle(train_loader if callable(train_loader) else (lambda: train_loader)))
    history: list[dict[str, float]] = []
    # ``stats`` is the extra text column of the engine's progress bar.
    task = progress.add_task("UVC search", total=config.steps, stats="") if progress is not None else None
    for step in range(config.steps):
        images, targets, _ = next(batches)
        if len(targets) == 0:
            continue
        record = search.step(images.to(device), targets.to(device), step)
        history.append(record)
        if log is not None and config.log_every and (step % config.log_every == 0 or step == config.steps - 1):
            log(f"UVC search step {step}: loss {record['loss']:.4f}, R {record['resource']:.3f} "
                f"(target {target:g}), z {record['z']:.3g}")
        if task is not None:
            progress.update(task, advance=1, stats=f"R {record['resource']:.3f} (target {target:g})")
    if task is not None:
        progress.remove_task(task)
    result = search.decide()
    result.history = history
    return result
