"""``uvc``: Unified Visual Transformer Compression (Yu et al., ICLR 2022). Settings: recipes/uvc.yaml.

The student is the teacher itself, searched (``vitshrink.prune.uvc_search``), sliced (``vitshrink.prune.surgery``) to
``flops_target`` (``--flops-target``, ``--set flops_target=...``) and post-trained with logit KD from the unpruned teacher.
"""
from __future__ import annotations

import copy
import json
from typing import Any

from torch import nn

from vitshrink._atomic import atomic_write_text
from vitshrink.distill.tasks import LogitKDTask
from vitshrink.errors import UserError
from vitshrink.io import record_of
from vitshrink.recipes.base import Recipe, RecipeContext, register_recipe
from vitshrink.prune.surgery import check_sliceable, plan_to_json, slice_vit
from vitshrink.prune.uvc_search import ResourceModel, UVCConfig, check_flops_target, search_uvc


def uvc_config(cfg: dict[str, Any]) -> UVCConfig:
    """The search settings of a merged recipe configuration (uvc's own options: recipes/uvc.yaml)."""
    if cfg.get("no_skip") and cfg.get("skip_only"):
        raise UserError("--no-skip and --skip-only together leave nothing to prune")
    target = check_flops_target(cfg["flops_target"])
    return UVCConfig(
        flops_target=target, steps=int(cfg["search_steps"]), lr=float(cfg["search_lr"]),
        count_lr=float(cfg["count_lr"]), gate_lr=float(cfg["gate_lr"]), gate_momentum=float(cfg["gate_momentum"]),
        gate_init=float(cfg["gate_init"]), gumbel_tau=float(cfg["gumbel_tau"]),
        gating_weight=float(cfg["gating_weight"]), z_lr=float(cfg["z_lr"]), z_clip=float(cfg["z_clip"]),
        y_lr=float(cfg["y_lr"]), kd_weight=float(cfg["search_kd_weight"]), temperature=float(cfg["temperature"]),
        skip=not cfg.get("no_skip", False), within=not cfg.get("skip_only", False),
        head_dims=bool(cfg.get("prune_head_dims", True)), tolerance=float(cfg["flops_tolerance"]),
        clip_grad=float(cfg.get("clip_grad") or 1.0),
    )


@register_recipe("uvc")
class UVC(Recipe):
    """Search + slice + KD post-training; ``no_kd`` trains on labels alone, ``no_skip``/``skip_only`` ablate."""

    def build_student(self, teacher: nn.Module, student: nn.Module | str | None, ctx: RecipeContext) -> nn.Module:
        if student is not None:
            raise UserError("--student: the uvc recipe prunes the teacher itself; leave --student out")
        check_sliceable(teacher)
        config = uvc_config(ctx.cfg)
        # Fail before any training if the target cannot be reached at all.
        check_flops_target(config.flops_target, ResourceModel(teacher), skip=config.skip, within=config.within)
        return copy.deepcopy(teacher)

    def prepare(self, teacher: nn.Module, student: nn.Module, ctx: RecipeContext) -> nn.Module:
        from vitshrink.measure import count_flops

        config = uvc_config(ctx.cfg)
        loader = ctx.train_loader(student, batch_size=int(ctx.cfg["search_batch_size"]))
        result = search_uvc(student, loader, config, device=ctx.device, log=ctx.log, progress=ctx.progress)
        sliced = slice_vit(result.model, result.plan).to(ctx.device)
        measured = count_flops(sliced).macs / count_flops(teacher).macs
        band = f"[{config.flops_target - config.tolerance:g}, {config.flops_target:g}]"
        note = (f"UVC: counted FLOPs ratio {measured:.4f} (target {config.flops_target:g}, band {band}); "
                f"search decisions gave {result.search_resource:.4f}"
                + ("; greedy adjustment by group norm moved them into the band" if result.adjusted else ""))
        ctx.log(note)
        if not config.flops_target - config.tolerance - 1e-9 <= measured <= config.flops_target + 1e-9:
            if config.within:
                raise UserError(f"--flops-target {config.flops_target:g} is unreachable for this model: the nearest "
                                f"sliced model has {measured:.3f} of the teacher's FLOPs")
            ctx.log(f"note: --skip-only removes whole blocks only; {measured:.3f} is the closest under the target")
        summary = {"flops_target": config.flops_target, "flops_ratio": measured, **result.summary(),
                   "plan": plan_to_json(result.plan), "ablation": {"no_skip": not config.skip,
                                                                   "skip_only": not config.within}}
        record = record_of(sliced)
        record.provenance = {**record.provenance, "uvc": {k: v for k, v in summary.items() if k != "plan"}}
        if ctx.out_dir is not None and ctx.rank == 0:
            atomic_write_text(ctx.out_dir / "uvc_plan.json", json.dumps(summary, indent=2) + "\n")
        return sliced

    def task(self, teachers: Any, student: nn.Module, cfg: dict[str, Any]):
        if cfg.get("no_kd"):
            from timm.task import ClassificationTask

            return ClassificationTask(student, criterion=nn.CrossEntropyLoss(label_smoothing=float(cfg["smoothing"])),
                                      verbose=False)
        return LogitKDTask(student, teachers, kd_weight=float(cfg["kd_weight"]), temperature=float(cfg["temperature"]),
                           smoothing=float(cfg["smoothing"]))
