"""``deit``: the DeiT distillation token (Touvron et al. 2021). Settings: recipes/deit.yaml.

The student gets a distillation token and a second head (timm's ``VisionTransformerDistilled`` for the original
DeiT layout, else ``vitshrink_vit_distilled``, which keeps the teacher's LayerScale, registers, ``norm_pre``,
qk-norm, ``no_embed_class`` and pooling); the class head learns from the labels, the distillation head from the
teacher (a CNN or a ViT). At inference the two heads' logits are averaged, so the exported model has one output.
A derived student (no ``--student``) is checked to cost fewer MACs than the teacher before training starts;
families whose blocks it cannot copy are refused first (``vitshrink.applicability``).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from vitshrink.applicability import check_deit_applies
from vitshrink.distill.tasks import TokenKDTask
from vitshrink.errors import UserError
from vitshrink.recipes.base import Recipe, RecipeContext, register_recipe
from vitshrink.students import add_distillation_token, check_student_cost, deit_tiny_student


@register_recipe("deit")
class DeiT(Recipe):
    """DeiT: a distillation token and head on the student; hard (teacher argmax) or soft (T^2 KL) targets."""

    def configure(self, cfg: dict[str, Any]) -> dict[str, Any]:
        if cfg.get("kl_reduction", "numel") not in ("numel", "batchmean"):
            raise UserError(f"--kl-reduction must be numel or batchmean, got {cfg['kl_reduction']!r}")
        # kd_weight null in the preset means the published weight of the chosen mode.
        if cfg.get("kd_weight") is None:
            cfg = {**cfg, "kd_weight": 0.5 if cfg["distill_type"] == "hard" else 0.1}
        return cfg

    def build_student(self, teacher: nn.Module, student: nn.Module | str | None, ctx: RecipeContext) -> nn.Module:
        check_deit_applies(teacher, student)
        if student is None and getattr(teacher, "blocks", None) is None:
            # DeiT's own setting: a CNN teacher, a ViT student (paper sec. 5); nothing to copy from the teacher.
            derived, note = deit_tiny_student(teacher)
            ctx.log(note)
            distilled = add_distillation_token(derived)
        else:
            distilled = add_distillation_token(super().build_student(teacher, student, ctx))
        if student is None:  # the distillation token adds a little: the student as trained must still be smaller
            check_student_cost(distilled, teacher, "the derived DeiT student (with its distillation token)")
        return distilled

    def task(self, teachers: Any, student: nn.Module, cfg: dict[str, Any]) -> TokenKDTask:
        return TokenKDTask(student, teachers, distill_type=str(cfg["distill_type"]), kd_weight=float(cfg["kd_weight"]),
                           temperature=float(cfg["temperature"]), smoothing=float(cfg["smoothing"]),
                           kl_reduction=str(cfg.get("kl_reduction", "numel")))

    def finalize(self, student: nn.Module, cfg: dict[str, Any]) -> nn.Module:
        # Eval mode with distilled training off: forward returns (cls + dist) / 2, a single output.
        student.set_distilled_training(False)
        return student.eval()
