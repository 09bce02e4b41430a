"""``crossarch``: cross-architecture distillation, ViT teacher -> CNN student (Liu et al. 2022, arXiv
2207.05273; no public code). Settings: recipes/crossarch.yaml.

The student is a CNN (``--student`` a timm CNN or a registered CIFAR ResNet, e.g. ``cifar_resnet20``; default
the preset's ``cnn_student``). Its last stage's map (brought to the teacher's patch grid) goes through

* the partially cross attention (PCA) projector: three 3x3 convs give Q, K, V in the teacher's width and
  heads; during training each element is replaced by the teacher's (last block's q, k, v) with probability
  ``cross_probability``; loss: attention and value relations against the teacher's;
* the group-wise linear (GL) projector: per tile of neighbouring positions a linear map to the teacher's
  width; loss: MSE to the teacher's last-block patch tokens;

with multi-view robust training: random views of the batch (erased square + noise) for student and teacher,
and a discriminator telling teacher from projected student features (adversarial through a reversed
gradient). Loss: ``CE(y) + pca_weight L_PCA + gl_weight L_GL + adversarial_weight L_adv``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from timm.utils import unwrap_model
from torch import nn

from vitshrink.distill.feature_tasks import CrossArchTask
from vitshrink.distill.taps import FeatureTaps
from vitshrink.distill.teachers import as_teachers
from vitshrink.errors import UserError
from vitshrink.io import data_config
from vitshrink.recipes.base import Recipe, RecipeContext, register_recipe


def last_stage(model: nn.Module) -> str:
    """The last stage a timm-style CNN lists in ``feature_info`` (CIFAR ResNet: ``layer3``)."""
    info = getattr(unwrap_model(model), "feature_info", None) or []
    names = [entry.get("module") for entry in info if isinstance(entry, Mapping) and entry.get("module")]
    if not names:
        raise UserError("--student-point: the CNN student lists no feature stages (feature_info); name its last "
                        "stage, e.g. --student-point layer3 or stages.3")
    return names[-1]


def stage_width(student: nn.Module, point: str) -> int:
    """Channels of the student's map at ``point``, from one dry forward of a blank batch (RNG untouched)."""
    blank = torch.zeros(2, *[int(v) for v in data_config(student)["input_size"]],
                        device=next(student.parameters()).device)
    was_training = student.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), FeatureTaps(student.eval(), [point]) as feats:
            student(blank)
    except ValueError as exc:
        raise UserError(f"crossarch: {exc} (set --student-point)") from None
    finally:
        student.train(was_training)
    if feats[point].dim() != 4:
        raise UserError(f"--student-point {point}: expected a (B, C, H, W) map, got shape {tuple(feats[point].shape)}")
    return int(feats[point].shape[1])


@register_recipe("crossarch")
class CrossArch(Recipe):
    """ViT -> CNN: CE + PCA projector + GL projector losses, multi-view robust training."""

    needs_teacher_features = True  # the projectors read the teacher's q, k, v and tokens: no logit cache

    def configure(self, cfg: dict[str, Any]) -> dict[str, Any]:
        if not 0.0 <= float(cfg["cross_probability"]) <= 1.0:
            raise UserError(f"--cross-probability must be in [0, 1], got {cfg['cross_probability']!r}")
        if not isinstance(cfg["gl_group"], int) or isinstance(cfg["gl_group"], bool) or cfg["gl_group"] < 1:
            raise UserError(f"--gl-group must be an integer >= 1, got {cfg['gl_group']!r}")
        return cfg

    def build_student(self, teacher: nn.Module, student: nn.Module | str | None, ctx: RecipeContext) -> nn.Module:
        from vitshrink.students import resolve_student

        spec = student if student is not None else ctx.cfg.get("cnn_student")
        if spec is None:
            raise UserError("--student: recipe crossarch needs a CNN student, e.g. --student cifar_resnet20")
        # A CNN shares no weights with the ViT teacher: it trains from its own init.
        model = resolve_student(spec, teacher, init=False)
        if hasattr(unwrap_model(model), "blocks"):
            raise UserError(f"--student {spec}: recipe crossarch distils a ViT into a CNN; this student has ViT "
                            "blocks (use manifold, tat or vanilla for a ViT student)")
        return model

    def task(self, teachers: Any, student: nn.Module, cfg: dict[str, Any]) -> CrossArchTask:
        teachers = as_teachers(teachers, student)
        vit = unwrap_model(teachers.main.module)
        if not hasattr(vit, "blocks") or not hasattr(vit, "patch_embed"):
            raise UserError(f"crossarch: the teacher is a {type(vit).__name__}, not a ViT with blocks (the "
                            "projectors map the CNN into a ViT teacher's attention and token space)")
        block = f"blocks.{len(vit.blocks) - 1}"
        point = cfg["student_point"] or last_stage(student)
        return CrossArchTask(student, teachers, teacher_block=block, prefix_tokens=int(vit.num_prefix_tokens),
                             pca_weight=float(cfg["pca_weight"]), gl_weight=float(cfg["gl_weight"]),
                             adversarial_weight=float(cfg["adversarial_weight"]),
                             view_probability=float(cfg["view_probability"]), view_erase=float(cfg["view_erase"]),
                             view_noise=float(cfg["view_noise"]), smoothing=float(cfg["smoothing"]),
                             point=point, grid=tuple(int(v) for v in vit.patch_embed.grid_size),
                             widths=(stage_width(student, point), int(vit.embed_dim)),
                             heads=int(vit.blocks[-1].attn.num_heads),
                             cross_probability=float(cfg["cross_probability"]), group=int(cfg["gl_group"]))
