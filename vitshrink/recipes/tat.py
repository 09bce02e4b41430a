"""``tat``: knowledge distillation via the target-aware transformer (Lin et al., CVPR 2022). Settings:
recipes/tat.yaml.

Logit KD plus TaT between the student's and the teacher's last blocks as feature maps (patch tokens on their
grid): the student's map goes through a query and a value embedding (3x3 conv + BatchNorm, to the teacher's
width); each student position is rebuilt from every student value weighted by ``softmax_j(q_i . t_j)`` over
the teacher's positions and must equal the teacher there. ``tat_form: one_to_all`` is the official
classification loss (``sihaoevery/TaT`` ``MaskedFM``); ``hierarchical`` is the patch-group + anchor-point form
of the official segmentation code (``sihaoevery/TaT-seg``), for large grids.
"""
from __future__ import annotations

from typing import Any

from timm.utils import unwrap_model
from torch import nn

from vitshrink.distill.feature_tasks import TargetAwareTask
from vitshrink.distill.teachers import as_teachers
from vitshrink.errors import UserError
from vitshrink.recipes.base import Recipe, register_recipe

FORMS = ("one_to_all", "hierarchical")


def vit_layout(model: nn.Module, role: str) -> tuple[str, tuple[int, int], int]:
    """(last block's name, patch grid, width) of a timm-style ViT."""
    model = unwrap_model(model)
    blocks, embed = getattr(model, "blocks", None), getattr(model, "patch_embed", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or embed is None or not hasattr(model, "embed_dim"):
        raise UserError(f"tat: the {role} is a {type(model).__name__}, not a ViT with blocks and a patch grid")
    grid = tuple(int(v) for v in embed.grid_size)
    return f"blocks.{len(blocks) - 1}", grid, int(model.embed_dim)


@register_recipe("tat")
class TargetAware(Recipe):
    """Logit KD + tat_weight x TaT (one-to-all, or patch-group + anchor-point) on the last blocks."""

    needs_teacher_features = True  # TaT reads the teacher's feature map: no logit cache

    def configure(self, cfg: dict[str, Any]) -> dict[str, Any]:
        if cfg["tat_form"] not in FORMS:
            raise UserError(f"--tat-form must be one of {', '.join(FORMS)}, got {cfg['tat_form']!r}")
        for key in ("patch_grid", "anchors"):
            value = cfg[key]
            if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v >= 1 for v in value)):
                raise UserError(f"--{key.replace('_', '-')} must be two integers >= 1, e.g. '[2, 2]', got {value!r}")
        return cfg

    def task(self, teachers: Any, student: nn.Module, cfg: dict[str, Any]) -> TargetAwareTask:
        teachers = as_teachers(teachers, student)
        s_point, s_grid, s_width = vit_layout(student, "student")
        t_point, t_grid, t_width = vit_layout(teachers.main.module, "teacher")
        rows, cols = cfg["patch_grid"]
        heads = int(cfg["patch_heads"])
        if cfg["tat_form"] == "hierarchical":
            if s_grid[0] % rows or s_grid[1] % cols or any(g % a for g, a in zip(s_grid, cfg["anchors"])):
                raise UserError(f"--patch-grid {cfg['patch_grid']} / --anchors {cfg['anchors']}: must divide the "
                                f"student's {s_grid[0]}x{s_grid[1]} patch grid")
            if heads < 1 or (rows * cols * t_width) % heads:
                raise UserError(f"--patch-heads {heads}: must divide regions x teacher width ({rows * cols * t_width})")
        return TargetAwareTask(student, teachers, teacher_point=cfg["teacher_point"] or t_point, teacher_grid=t_grid,
                               kd_weight=float(cfg["kd_weight"]), temperature=float(cfg["temperature"]),
                               tat_weight=float(cfg["tat_weight"]), smoothing=float(cfg["smoothing"]),
                               point=cfg["student_point"] or s_point, grid=s_grid, widths=(s_width, t_width),
                               form=cfg["tat_form"], patch_grid=(rows, cols), heads=heads, anchors=cfg["anchors"],
                               patch_weight=float(cfg["patch_weight"]), anchor_weight=float(cfg["anchor_weight"]))
