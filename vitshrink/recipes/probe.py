"""``probe``: label-free probe distillation (Wang et al., ICASSP 2022, "Attention Probe: Vision Transformer
Distillation in the Wild"; official code IIGROUP/AttentionProbe). Defaults: recipes/probe.yaml.

Made for the images ``vitshrink select-wild`` picks from an unlabelled pool: the labels (pseudo or
none) are never read. Loss = ``T^2 KL(teacher_T || student_T)`` + ``probe_weight`` x the probe
distillation loss (``vitshrink.distill.attention_probe.probe_distillation_loss``) on the outputs of the blocks at
1/3, 2/3 and all of each model's depth, so student blocks map to teacher blocks by relative depth.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitshrink.distill import losses
from vitshrink.distill.attention_probe import (DISTILL_FRACTIONS, BlockOutputs, blocks_at_fractions, num_prefix_tokens,
                                       probe_distillation_loss)
from vitshrink.errors import UserError
from vitshrink.recipes.base import Recipe, register_recipe
from vitshrink.recipes.vanilla import LogitKDTask


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

    Reuses vanilla's task (timm's ``LogitDistillationTask``: teacher wrapping, renormalisation, student-only
    DDP). Block outputs are captured with forward hooks registered for the duration of each step only.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, temperature: float, probe_weight: float):
        teacher_layout, student_layout = _token_layout(teacher, "teacher"), _token_layout(student, "student")
        if teacher_layout != student_layout:
            raise UserError(f"--recipe probe matches token-similarity rows, so teacher and student need the same "
                            f"tokens: teacher has {teacher_layout[0]} prefix + {teacher_layout[1]} patch tokens, "
                            f"student {student_layout[0]} + {student_layout[1]}")
        super().__init__(student, teacher, kd_weight=1.0, temperature=temperature)
        self.raw_teacher, self.raw_student = teacher, student  # hooks go on the unwrapped modules
        self.pairs = paired_blocks(len(teacher.blocks), len(student.blocks))
        self.prefix = teacher_layout[0]
        self.probe_weight = probe_weight

    def forward(self, input: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        t_blocks = sorted({t for t, _ in self.pairs})
        s_blocks = sorted({s for _, s in self.pairs})
        with BlockOutputs(self.raw_student, s_blocks) as s_out, BlockOutputs(self.raw_teacher, t_blocks) as t_out:
            student_logits = self.trainable_module(input)
            teacher_logits = self.teacher_logits(input)
        kd = losses.kd_kl(student_logits, teacher_logits, self.temperature)
        probe = probe_distillation_loss([t_out.outputs[t].detach() for t, _ in self.pairs],
                                        [s_out.outputs[s] for _, s in self.pairs], prefix=self.prefix)
        loss = kd + self.probe_weight * probe
        return {"loss": loss, "output": student_logits, "kd_loss": kd.detach(), "probe_loss": probe.detach()}


@register_recipe("probe")
class Probe(Recipe):
    """Probe distillation: ``T^2 KL`` on logits + ``probe_weight`` x class-token similarity MSE; no labels."""

    uses_labels = False

    def task(self, teacher: nn.Module, student: nn.Module, cfg: dict[str, Any]) -> ProbeTask:
        return ProbeTask(student, teacher, temperature=float(cfg["temperature"]),
                         probe_weight=float(cfg["probe_weight"]))
