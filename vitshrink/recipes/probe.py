"""``probe``: label-free probe distillation (Wang et al., ICASSP 2022, "Attention Probe: Vision Transformer
Distillation in the Wild"; official code IIGROUP/AttentionProbe). Settings: recipes/probe.yaml.

Made for the images ``vitshrink select-wild`` picks from an unlabelled pool: the labels (pseudo or
none) are never read. Loss = ``T^2 KL(teacher_T || student_T)`` + ``probe_weight`` x the probe
distillation loss (``vitshrink.distill.attention_probe.probe_distillation_loss``) on the outputs of the blocks at
1/3, 2/3 and all of each model's depth, so student blocks map to teacher blocks by relative depth.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from vitshrink.distill import losses
from vitshrink.distill.attention_probe import (DISTILL_FRACTIONS, blocks_at_fractions, num_prefix_tokens,
                                               probe_distillation_loss)
from vitshrink.distill.taps import FeatureTaps
from vitshrink.distill.tasks import LogitKDTask
from vitshrink.distill.teachers import as_teachers
from vitshrink.errors import UserError
from vitshrink.recipes.base import Recipe, register_recipe


def paired_blocks(teacher_depth: int, student_depth: int) -> list[tuple[int, int]]:
    """(teacher block, student block) pairs at the same share of each depth (12 vs 6: (3,1), (7,3), (11,5))."""
    return [(blocks_at_fractions(teacher_depth, [f])[0], blocks_at_fractions(student_depth, [f])[0])
            for f in DISTILL_FRACTIONS]


def _token_layout(model: nn.Module, role: str) -> tuple[int, int]:
    blocks = getattr(model, "blocks", None)
    patch_embed = getattr(model, "patch_embed", None)
    if blocks is None or patch_embed is None or getattr(model, "cls_token", None) is None:
        raise UserError(f"--recipe probe needs a ViT {role} with a class token and timm-style blocks, got "
                        f"{type(model).__name__}")
    return num_prefix_tokens(model), int(patch_embed.num_patches)


class ProbeTask(LogitKDTask):
    """Logit KD (kd_weight 1: labels unused) plus the probe distillation loss on paired block outputs.

    The shared logit-KD task (``vitshrink.distill.tasks``) with block outputs tapped
    (``vitshrink.distill.taps``) on the student and on the live teacher for the duration of each step only.
    """

    def __init__(self, student: nn.Module, teachers: Any, *, temperature: float, probe_weight: float):
        teachers = as_teachers(teachers, student)
        teacher = teachers.main.module
        teacher_layout, student_layout = _token_layout(teacher, "teacher"), _token_layout(student, "student")
        if teacher_layout != student_layout:
            raise UserError(f"--recipe probe matches token-similarity rows, so teacher and student need the same "
                            f"tokens: teacher has {teacher_layout[0]} prefix + {teacher_layout[1]} patch tokens, "
                            f"student {student_layout[0]} + {student_layout[1]}")
        super().__init__(student, teachers, kd_weight=1.0, temperature=temperature)
        self.raw_student = student  # taps go on the unwrapped student
        self.pairs = paired_blocks(len(teacher.blocks), len(student.blocks))
        self.prefix = teacher_layout[0]
        self.probe_weight = probe_weight

    def forward(self, input: torch.Tensor, target: torch.Tensor | None = None,
                extras: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        t_points = [f"blocks.{t}" for t, _ in self.pairs]
        s_points = [f"blocks.{s}" for _, s in self.pairs]
        with FeatureTaps(self.raw_student, sorted(set(s_points))) as s_feats:
            student_logits = self.trainable_module(input)
        teacher_logits, t_feats = self.teachers.main.features(input, sorted(set(t_points)))
        kd = losses.kd_kl(student_logits, teacher_logits, self.temperature)
        probe = probe_distillation_loss([t_feats[p] for p in t_points], [s_feats[p] for p in s_points],
                                        prefix=self.prefix)
        loss = kd + self.probe_weight * probe
        return {"loss": loss, "output": student_logits, "kd_loss": kd.detach(), "probe_loss": probe.detach()}


@register_recipe("probe")
class Probe(Recipe):
    """Probe distillation: ``T^2 KL`` on logits + ``probe_weight`` x class-token similarity MSE; no labels."""

    uses_labels = False

    def task(self, teachers: Any, student: nn.Module, cfg: dict[str, Any]) -> ProbeTask:
        return ProbeTask(student, teachers, temperature=float(cfg["temperature"]),
                         probe_weight=float(cfg["probe_weight"]))
