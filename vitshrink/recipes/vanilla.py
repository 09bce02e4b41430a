"""``vanilla``: Hinton et al. 2015 knowledge distillation on logits. Defaults: recipes/vanilla.yaml."""
from __future__ import annotations

from typing import Any

import torch
from timm.task import LogitDistillationTask
from torch import nn

from vitshrink.distill import losses
from vitshrink.recipes.base import Recipe, normalisation_differs, register_recipe, teacher_for


class LogitKDTask(LogitDistillationTask):
    """timm's LogitDistillationTask with vitshrink's loss (``losses.kd_loss``) in ``forward``.

    Reused from timm: the student/teacher wiring, DDP of the student only (``prepare_distributed``),
    ``compile``, and keeping the teacher in eval mode. Replaced, and why:
    * the loss is the convex combination ``(1 - kd_weight) * CE + kd_weight * T^2 KL`` from
      ``vitshrink.distill.losses`` (one tested definition for every recipe); with ``kd_weight == 1`` the labels are
      never read, so label-free data works;
    * whether the teacher needs other normalisation is decided once at construction, instead of two
      ``torch.equal`` calls per step (each a device-to-host sync on CUDA).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, kd_weight: float, temperature: float,
                 smoothing: float = 0.0):
        wrapped = teacher_for(teacher, student)
        super().__init__(student, wrapped, criterion=nn.CrossEntropyLoss(label_smoothing=smoothing),
                         task_loss_weight=1.0 - kd_weight, temperature=temperature,
                         device=wrapped.mean_kd.device, verbose=False)
        self.kd_weight = kd_weight
        self.smoothing = smoothing
        self.renormalise = normalisation_differs(wrapped, student)

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.renormalise:
                images = (images * self.student_std + self.student_mean - self.teacher.mean_kd) / self.teacher.std_kd
            return self.teacher(images)

    def forward(self, input: torch.Tensor, target: torch.Tensor | None) -> dict[str, torch.Tensor]:
        student_logits = self.trainable_module(input)
        result = losses.kd_loss(student_logits, self.teacher_logits(input), target, kd_weight=self.kd_weight,
                                temperature=self.temperature, smoothing=self.smoothing)
        return {**result, "output": student_logits}


@register_recipe("vanilla")
class Vanilla(Recipe):
    """Hinton KD: ``(1 - kd_weight) * CE(student, y) + kd_weight * T^2 KL(teacher_T || student_T)``."""

    def task(self, teacher: nn.Module, student: nn.Module, cfg: dict[str, Any]) -> LogitKDTask:
        return LogitKDTask(student, teacher, kd_weight=float(cfg["kd_weight"]), temperature=float(cfg["temperature"]),
                           smoothing=float(cfg["smoothing"]))
