"""``ce``: no distillation, cross-entropy to the labels only — the baseline KD must beat. Settings: recipes/ce.yaml."""
from __future__ import annotations

from typing import Any

from timm.task import ClassificationTask
from torch import nn

from vitshrink.recipes.base import Recipe, register_recipe


@register_recipe("ce")
class CrossEntropyOnly(Recipe):
    """The same student, schedule and data as the KD recipes, trained on labels alone (timm's ClassificationTask
    fits as is: the teacher only supplies the student's initial weights and the report's comparison)."""

    def task(self, teachers: Any, student: nn.Module, cfg: dict[str, Any]) -> ClassificationTask:
        return ClassificationTask(student, criterion=nn.CrossEntropyLoss(label_smoothing=float(cfg["smoothing"])),
                                  verbose=False)
