"""``vanilla``: Hinton et al. 2015 knowledge distillation on logits. Settings: recipes/vanilla.yaml."""
from __future__ import annotations

from typing import Any

from torch import nn

from vitshrink.distill.tasks import LogitKDTask
from vitshrink.recipes.base import Recipe, register_recipe


@register_recipe("vanilla")
class Vanilla(Recipe):
    """Hinton KD: ``(1 - kd_weight) * CE(student, y) + kd_weight * T^2 KL(teacher_T || student_T)``."""

    def task(self, teachers: Any, student: nn.Module, cfg: dict[str, Any]) -> LogitKDTask:
        return LogitKDTask(student, teachers, kd_weight=float(cfg["kd_weight"]), temperature=float(cfg["temperature"]),
                           smoothing=float(cfg["smoothing"]))
