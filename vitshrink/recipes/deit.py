"""``deit``: the DeiT distillation token (Touvron et al. 2021). Settings: recipes/deit.yaml.

The student gets a distillation token and a second head (timm's ``VisionTransformerDistilled``); the class
head learns from the labels, the distillation head from the teacher (a CNN or a ViT). At inference the two
heads' logits are averaged, so the exported model has one output.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitshrink.distill.tasks import TokenKDTask
from vitshrink.errors import UserError
from vitshrink.io import create_model, data_config, set_data_config
from vitshrink.recipes.base import Recipe, RecipeContext, register_recipe
from vitshrink.students import copy_data_config, vit_kwargs

# timm's registered distilled ViT; the shape kwargs given override the name's defaults.
DISTILLED_ARCH = "deit_tiny_distilled_patch16_224"


def add_distillation_token(student: nn.Module) -> VisionTransformerDistilled:
    """The distilled twin of a uniform timm ViT, keeping every weight it has.

    The new distillation token, its position embedding and the distillation head start as copies of the
    class token, its position embedding and the class head: the two tokens stay equal through every block,
    so both heads start out agreeing. (The duplicated token is attended to twice, so the logits are close
    to the original model's, not identical.)
    """
    if isinstance(student, VisionTransformerDistilled):
        return student
    if not isinstance(student, VisionTransformer) or getattr(student, "cls_token", None) is None \
            or student.num_reg_tokens or student.global_pool != "token":
        raise UserError(f"--recipe deit needs a timm ViT student with a class token and token pooling, got "
                        f"{type(student).__name__}")
    distilled = create_model(DISTILLED_ARCH, **vit_kwargs(student))
    set_data_config(distilled, input_size=data_config(student)["input_size"])
    copy_data_config(distilled, student)
    state = student.state_dict()
    pos = state["pos_embed"]
    state["pos_embed"] = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)
    state["dist_token"] = state["cls_token"].clone()
    state["head_dist.weight"] = state["head.weight"].clone()
    state["head_dist.bias"] = state["head.bias"].clone()
    distilled.load_state_dict(state)
    return distilled


@register_recipe("deit")
class DeiT(Recipe):
    """DeiT: a distillation token and head on the student; hard (teacher argmax) or soft (T^2 KL) targets."""

    def configure(self, cfg: dict[str, Any]) -> dict[str, Any]:
        # kd_weight null in the preset means the published weight of the chosen mode.
        if cfg.get("kd_weight") is None:
            cfg = {**cfg, "kd_weight": 0.5 if cfg["distill_type"] == "hard" else 0.1}
        return cfg

    def build_student(self, teacher: nn.Module, student: nn.Module | str | None, ctx: RecipeContext) -> nn.Module:
        return add_distillation_token(super().build_student(teacher, student, ctx))

    def task(self, teachers: Any, student: nn.Module, cfg: dict[str, Any]) -> TokenKDTask:
        return TokenKDTask(student, teachers, distill_type=str(cfg["distill_type"]), kd_weight=float(cfg["kd_weight"]),
                        temperature=float(cfg["temperature"]), smoothing=float(cfg["smoothing"]))

    def finalize(self, student: nn.Module, cfg: dict[str, Any]) -> nn.Module:
        # Eval mode with distilled training off: forward returns (cls + dist) / 2, a single output.
        student.set_distilled_training(False)
        return student.eval()
