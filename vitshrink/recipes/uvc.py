"""``uvc``: Unified Visual Transformer Compression (Yu et al., ICLR 2022). Settings: recipes/uvc.yaml.

The student is the teacher itself, searched (``vitshrink.prune.uvc_search``), sliced (``vitshrink.prune.surgery``) to
``flops_target`` (``--flops-target``, ``--set flops_target=...``) and post-trained with logit KD from the unpruned teacher.
"""
from __future__ import annotations

import copy
import json
from typing import Any

import torch
from torch import nn

from vitshrink._atomic import atomic_write_text
from vitshrink.applicability import check_uvc_applies
from vitshrink.distill.tasks import DistillTask, LogitKDTask
from vitshrink.distill.teachers import as_teachers
from vitshrink.errors import UserError
from vitshrink.io import record_of
from vitshrink.io.fields import read_json
from vitshrink.prune.decisions import magnitude_plan
from vitshrink.prune.resource import check_target
from vitshrink.recipes.base import Recipe, RecipeContext, register_recipe
from vitshrink.prune.surgery import plan_to_json, slice_vit
from vitshrink.prune.uvc_objective import OfficialLoss
from vitshrink.prune.latency_table import check_latency_runtime
from vitshrink.prune.latency_target import correct_with_measurements, latency_resource, measured_latency
from vitshrink.prune.uvc_search import ResourceModel, UVCConfig, check_flops_target, search_uvc, sliced_student

# |R of the search's own decisions - target| above which the report says the search ended far from its target.
FAR_FROM_TARGET = 0.1


def _optional(cfg: dict[str, Any], key: str, kind: type) -> Any:
    value = cfg.get(key)
    return None if value is None else kind(value)


def uvc_config(cfg: dict[str, Any]) -> UVCConfig:
    """The search settings of a merged recipe configuration (uvc's own options: recipes/uvc.yaml).

    Keys left ``null`` in the preset take ``search_objective``'s values (``uvc_objective.SEARCH_OBJECTIVES``).
    """
    if cfg.get("no_skip") and cfg.get("skip_only"):
        raise UserError("--no-skip and --skip-only together leave nothing to prune")
    target = check_flops_target(cfg["flops_target"])
    latency = cfg.get("latency_target")
    if latency is not None:
        latency = check_target(latency, flag="--latency-target", what="latency")
    return UVCConfig.for_objective(
        str(cfg.get("search_objective") or "kd"),
        flops_target=target, latency_target=latency, steps=int(cfg["search_steps"]), lr=float(cfg["search_lr"]),
        weight_decay=_optional(cfg, "search_weight_decay", float),
        warmup_steps=_optional(cfg, "search_warmup_steps", int),
        count_lr=float(cfg["count_lr"]), gate_lr=float(cfg["gate_lr"]), gate_momentum=float(cfg["gate_momentum"]),
        gate_init=_optional(cfg, "gate_init", float), gate_interval=_optional(cfg, "gate_interval", int),
        gate_weight_decay=_optional(cfg, "gate_weight_decay", float), gumbel_tau=float(cfg["gumbel_tau"]),
        gating_weight=float(cfg["gating_weight"]), z_lr=float(cfg["z_lr"]), z_clip=float(cfg["z_clip"]),
        two_sided_dual=bool(cfg.get("two_sided_dual", True)), z_bound=_optional(cfg, "z_bound", float),
        z_reset=_optional(cfg, "z_reset", bool), patience=_optional(cfg, "search_patience", int),
        loss_limit=_optional(cfg, "search_loss_limit", float), runaway=_optional(cfg, "search_runaway", float),
        max_restarts=_optional(cfg, "search_restarts", int), z_penalty=_optional(cfg, "z_penalty", float),
        relative_duals=_optional(cfg, "relative_duals", bool),
        y_lr=float(cfg["y_lr"]), kd_weight=float(cfg["search_kd_weight"]),
        temperature=float(cfg.get("search_temperature") or 1.0),
        skip=not cfg.get("no_skip", False), within=not cfg.get("skip_only", False),
        head_dims=bool(cfg.get("prune_head_dims", True)), tolerance=float(cfg["flops_tolerance"]),
        dim_multiple=int(cfg.get("dim_multiple") or 1),
        clip_grad=float(cfg.get("clip_grad") or 1.0),
    )


@register_recipe("uvc")
class UVC(Recipe):
    """Search + slice + KD post-training; ``no_kd`` trains on labels alone, ``no_skip``/``skip_only`` ablate."""

    def check_sources(self, cfg: dict[str, Any], sources: dict[str, str]) -> None:
        if cfg.get("latency_target") is not None and sources.get("flops_target") not in (None, "base", "preset"):
            raise UserError("--latency-target and --flops-target are alternatives: set only one of them")

    def build_student(self, teacher: nn.Module, student: nn.Module | str | None, ctx: RecipeContext) -> nn.Module:
        if student is not None:
            raise UserError("--student: the uvc recipe prunes the teacher itself; leave --student out")
        check_uvc_applies(teacher, ctx.cfg, ctx.log)  # before the search: families refused, qk-norm adjusted
        config = uvc_config(ctx.cfg)
        if config.within and config.head_dims and any(
                not isinstance(getattr(getattr(b, "attn", None), "q_norm", nn.Identity()), nn.Identity)
                for b in teacher.blocks):
            # Checked now, not after the search: slicing cannot narrow a head whose q/k norm spans all its dims.
            raise UserError("uvc: the teacher has qk_norm (a norm over each head's dims), so head dims cannot be "
                            "pruned; add --prune-head-dims false (heads, MLP units and blocks are still pruned)")
        for key, allowed in (("pruning_plan", ("search", "magnitude")), ("posttrain_objective", ("kd", "official"))):
            if ctx.cfg.get(key) is not None and ctx.cfg[key] not in allowed:
                raise UserError(f"{key} must be one of {', '.join(allowed)}, got {ctx.cfg[key]!r}")
        if config.latency_target is not None:
            check_latency_runtime(ctx.cfg.get("latency_runtime"))  # torch-cuda without CUDA: refused here
        else:  # fail before any training if the target cannot be reached at all
            check_flops_target(config.flops_target, ResourceModel(teacher), skip=config.skip, within=config.within,
                               dim_multiple=config.dim_multiple)
        return copy.deepcopy(teacher)

    def prepare(self, teacher: nn.Module, student: nn.Module, ctx: RecipeContext) -> nn.Module:
        from vitshrink.measure import count_flops

        config = uvc_config(ctx.cfg)
        method = str(ctx.cfg.get("pruning_plan") or "search")
        if method not in ("search", "magnitude"):
            raise UserError(f"pruning_plan must be 'search' or 'magnitude', got {method!r}")
        resource = None if config.latency_target is None else latency_resource(
            student, runtime=ctx.cfg.get("latency_runtime"), batch_size=int(ctx.cfg.get("latency_batch") or 1),
            dim_multiple=config.dim_multiple, out_dir=ctx.out_dir if ctx.rank == 0 else None, log=ctx.log,
            world_size=ctx.world_size)
        target = config.flops_target if resource is None else config.latency_target
        if method == "magnitude":
            if not config.within:
                raise UserError("pruning_plan magnitude prunes within blocks; it cannot be combined with --skip-only")
            plan = magnitude_plan(student, target, config.tolerance, resource, dim_multiple=config.dim_multiple)
            sliced, summary = slice_vit(student, plan).to(ctx.device), {"adjusted": False}
        else:
            loader = ctx.train_loader(student, batch_size=int(ctx.cfg["search_batch_size"]))
            result = search_uvc(student, loader, config, device=ctx.device, log=ctx.log, progress=ctx.progress,
                                resource=resource)
            restore = bool(ctx.cfg.get("restore_kept", True))
            sliced = sliced_student(student, result, restore=restore).to(ctx.device)
            plan, summary = result.plan, {**result.summary(), "restore_kept": restore,
                                          "search_objective": config.objective, "search": result.health}
            if abs(result.search_resource - target) > FAR_FROM_TARGET:
                summary["warning"] = (f"the UVC search ended at R {result.search_resource:.3f}, far from the target "
                                      f"{target:g}; the greedy adjustment by group norm, not the "
                                      f"search, chose most of what was removed")
                ctx.log(f"warning: {summary['warning']}")
            self._log_health(result.health, ctx)
        measured = count_flops(sliced).macs / count_flops(teacher).macs
        if resource is None:
            self._check_band(measured, config, ctx, summary, method)
        else:
            search = result if method == "search" else None
            plan, sliced, summary["latency"] = self._latency_stage(teacher, student, plan, resource, ctx, config,
                                                                   search)
            summary.update(search.summary() if search is not None else {})  # the corrected plan's counts
            measured = count_flops(sliced).macs / count_flops(teacher).macs
        summary = {"flops_target": None if resource is not None else config.flops_target, "flops_ratio": measured,
                   "pruning_plan": method, "dim_multiple": config.dim_multiple, **summary,
                   "plan": plan_to_json(plan), "ablation": {"no_skip": not config.skip,
                                                            "skip_only": not config.within}}
        if ctx.evaluate is not None and ctx.rank == 0:
            summary["top1_after_pruning"] = ctx.evaluate(sliced)  # before any fine-tuning
        record = record_of(sliced)
        record.provenance = {**record.provenance, "uvc": {k: v for k, v in summary.items() if k != "plan"}}
        if ctx.out_dir is not None and ctx.rank == 0:
            atomic_write_text(ctx.out_dir / "uvc_plan.json", json.dumps(summary, indent=2) + "\n")
        return sliced

    @staticmethod
    def _log_health(health: dict[str, Any], ctx: RecipeContext) -> None:
        """One line on the search's health, and its traces as uvc_search.png in the run folder."""
        ctx.log(f"UVC search: {health['steps_run']} steps"
                + (f" (stopped in the band at step {health['stopped_at']})" if health["stopped_at"] is not None
                   else "") + f", {len(health['restarts'])} restart(s); its own decisions "
                f"{'reached' if health['decisions_in_band'] else 'missed'} the band "
                f"(R {health['search_resource']:.4f}); the greedy made {health['greedy_moves']} move(s)")
        if ctx.out_dir is not None and ctx.rank == 0 and health["trace"]:
            from vitshrink.plots import plot_search_traces

            try:
                plot_search_traces(health, ctx.out_dir / "uvc_search.png")
            except Exception as exc:  # noqa: BLE001 - a picture must never cost the run
                ctx.log(f"warning: uvc_search.png not drawn: {type(exc).__name__}: {exc}")

    @staticmethod
    def _check_band(measured: float, config: UVCConfig, ctx: RecipeContext, summary: dict[str, Any],
                    method: str) -> None:
        band = f"[{config.flops_target - config.tolerance:g}, {config.flops_target:g}]"
        note = f"UVC ({method}): counted FLOPs ratio {measured:.4f} (target {config.flops_target:g}, band {band})"
        if "search_resource" in summary:
            note += f"; search decisions gave {summary['search_resource']:.4f}"
        if summary.get("adjusted"):
            note += "; greedy adjustment by group norm moved them into the band"
        ctx.log(note)
        if not config.flops_target - config.tolerance - 1e-9 <= measured <= config.flops_target + 1e-9:
            if config.within:
                raise UserError(f"--flops-target {config.flops_target:g} is unreachable for this model: the nearest "
                                f"sliced model has {measured:.3f} of the teacher's FLOPs")
            ctx.log(f"note: --skip-only removes whole blocks only; {measured:.3f} is the closest under the target")

    def _latency_stage(self, teacher, student, plan, resource, ctx: RecipeContext, config: UVCConfig, result):
        """Band check on the prediction, ``latency_corrections`` measured corrections (``prune.latency_target``),
        the final measurement; returns the plan, the sliced student and report.json's ``latency`` record."""
        self._check_latency_band(resource.plan_ratio(plan), config, ctx)
        restore = bool(ctx.cfg.get("restore_kept", True))
        runtime, batch = ctx.cfg.get("latency_runtime"), int(ctx.cfg.get("latency_batch") or 1)

        def decide(goal: float):
            if result is not None:
                return result.redecide(goal, config.tolerance, within=config.within, skip=config.skip)
            return magnitude_plan(student, goal, config.tolerance, resource, dim_multiple=config.dim_multiple)

        plan, goal, history = correct_with_measurements(
            teacher, plan, decide, resource, target=config.latency_target, runtime=runtime, batch_size=batch,
            steps=int(ctx.cfg.get("latency_corrections") or 0), log=ctx.log)
        if result is not None:  # the kept plan may be an earlier one than the last decided
            result.plan, result.resource = plan, resource.plan_ratio(plan)
        sliced = slice_vit(student if (result is None or restore) else result.model, plan).to(ctx.device)
        latency = measured_latency(teacher, sliced, resource, plan, target=config.latency_target, runtime=runtime,
                                   batch_size=batch, log=ctx.log)
        return plan, sliced, {**latency, "predicted_goal": goal, "corrections": history}

    @staticmethod
    def _check_latency_band(predicted: float, config: UVCConfig, ctx: RecipeContext) -> None:
        target = config.latency_target
        note = f"UVC: predicted latency ratio {predicted:.4f} (target {target:g}, band [{target - config.tolerance:g}, " \
               f"{target:g}])"
        # Not an error, unlike a FLOPs band: a whole block's fixed cost can jump over a 0.02 band, and timing noise
        # is larger than that anyway; the measured ratio (and its warning beyond 0.05) is what counts.
        if not target - config.tolerance - 1e-9 <= predicted <= target + 1e-9:
            note += "; the nearest plan the greedy found is outside the band"
        ctx.log(note)

    def report_fields(self, out_dir) -> dict[str, Any]:
        """report.json's ``pruning`` section: top-1 right after pruning, and the latency target's outcome."""
        path = None if out_dir is None else out_dir / "uvc_plan.json"
        if path is None or not path.exists():
            return {}
        plan = read_json(path, "uvc plan")
        fields = {key: plan[key] for key in ("top1_after_pruning", "flops_target", "flops_ratio", "dim_multiple",
                                             "latency", "search") if key in plan}
        return {"pruning": fields}

    def report_notes(self, out_dir) -> list[str]:
        """Warnings for report.md: a search that ended far from its target; a measured latency off its target."""
        path = None if out_dir is None else out_dir / "uvc_plan.json"
        if path is None or not path.exists():
            return []
        plan = read_json(path, "uvc plan")
        return [w for w in (plan.get("warning"), (plan.get("latency") or {}).get("warning")) if w]

    def task(self, teachers: Any, student: nn.Module, cfg: dict[str, Any]):
        if cfg.get("no_kd"):
            from timm.task import ClassificationTask

            return ClassificationTask(student, criterion=nn.CrossEntropyLoss(label_smoothing=float(cfg["smoothing"])),
                                      verbose=False)
        objective = str(cfg.get("posttrain_objective") or "kd")
        if objective == "official":
            return OfficialUVCTask(student, teachers)
        if objective != "kd":
            raise UserError(f"posttrain_objective must be 'official' or 'kd', got {objective!r}")
        return LogitKDTask(student, teachers, kd_weight=float(cfg["kd_weight"]), temperature=float(cfg["temperature"]),
                           smoothing=float(cfg["smoothing"]))


class OfficialUVCTask(DistillTask):
    """UVC's post-training loss (joint_train.py ``post_training``: the search's criterion): mixup/cutmix batches,
    the teacher on the mixed images, ``uvc_objective.official_loss`` (alpha 0.1, T 1, KL summed / numel)."""

    soft_targets = False  # it mixes its own batches: the shared mixup keys would mix them twice
    soft_targets_reason = "posttrain_objective official already mixes its batches with UVC's own settings"

    def __init__(self, student: nn.Module, teachers: Any):
        super().__init__(student, as_teachers(teachers, student))
        self.loss = OfficialLoss(int(student.num_classes))

    def forward(self, input: torch.Tensor, target: torch.Tensor | None,
                extras: Any = None) -> dict[str, torch.Tensor]:
        if target is None:
            raise UserError("posttrain_objective official needs labelled training data")
        images, soft_targets = self.loss.mix(input, target)
        # The teacher sees the mixed images, so a logit cache of unmixed views cannot stand in for it.
        teacher_logits = self.teachers.main.logits(images)
        student_logits = self.trainable_module(images)
        # No "output": accuracy against the unmixed labels would mean nothing on mixed images.
        return {**self.loss(student_logits, teacher_logits, soft_targets), "output": None}
