"""``coadvise``: Co-advise (Ren et al., CVPR 2022) -- a CiT student advised by a convolution teacher and an
involution teacher. Settings: recipes/coadvise.yaml (each value cites OliverRensu/co-advise or says it is ours).

The student is a CiT (``vitshrink.models.cit``): three heads (cls, conv, inv). Loss (official ``main.py``
``train_one_epoch``): ``CE(cls, labels) + KL(conv head || conv teacher) + KL(inv head || inv teacher)``,
batch-mean KL at T 1, every weight 1 -- :class:`vitshrink.distill.tasks.MultiTokenKDTask` with
``task_weight`` 1 and ``distill_type`` soft. Teachers: role ``conv`` from ``--conv-teacher SPEC``, ``inv`` from
``--inv-teacher SPEC`` (train one with ``vitshrink train-teacher rednet_cifar26 ...``); the user's TEACHER
(the bundled ViT when none is given) is the report's reference and, when it is a timm ViT, the CiT's
initialisation (our extension, as the default ViT student is derived from the teacher).

Our extension, off by default: ``cls_teacher_weight`` > 0 adds ``w * KL(cls head || TEACHER)`` (soft targets
for the class head); with ``task_weight`` 0 they replace the labels. ``finalize`` puts the CiT in eval mode,
where it returns the average of its three heads: one output.
"""
from __future__ import annotations

from typing import Any

from timm.models.vision_transformer import VisionTransformer
from timm.utils import unwrap_model
from torch import nn

from vitshrink.distill.tasks import MultiTokenKDTask
from vitshrink.distill.teachers import Teachers
from vitshrink.errors import UserError
from vitshrink.io import create_model, data_config, set_data_config
from vitshrink.recipes.base import Recipe, RecipeContext, register_recipe

TEACHER_FLAGS = {"conv": "--conv-teacher", "inv": "--inv-teacher", Teachers.MAIN: "TEACHER"}


def default_cit(teacher: nn.Module, cfg: dict[str, Any]) -> nn.Module:
    """A CiT for the teacher's input size: patch 4 at <= 64 px (like ``cit_tiny_patch4_32``), else patch 16."""
    in_chans, height, _ = (int(v) for v in data_config(teacher)["input_size"])
    patch = 4 if height <= 64 else 16
    if height % patch:
        raise UserError(f"coadvise: input size {height} is not a multiple of the CiT patch size {patch}; "
                        "give --student vitshrink_cit:img_size=...,patch_size=...")
    student = create_model("vitshrink_cit", img_size=height, patch_size=patch, in_chans=in_chans,
                           num_classes=int(getattr(unwrap_model(teacher), "num_classes")),
                           embed_dim=int(cfg["cit_embed_dim"]), depth=int(cfg["cit_depth"]),
                           num_heads=int(cfg["cit_num_heads"]))
    set_data_config(student, input_size=(in_chans, height, height))
    from vitshrink.students import copy_data_config

    copy_data_config(student, teacher)
    return student


def check_teacher_classes(teachers: dict[str, nn.Module], num_classes: int) -> None:
    """One line naming the flag of a teacher whose class count differs from the data's."""
    for role, model in teachers.items():
        classes = getattr(unwrap_model(model), "num_classes", None)
        if classes is not None and int(classes) != num_classes:
            raise UserError(f"{TEACHER_FLAGS.get(role, role)}: the {role} teacher has {classes} classes but the "
                            f"data has {num_classes}; train one on this data (vitshrink train-teacher)")


@register_recipe("coadvise")
class CoAdvise(Recipe):
    """CiT student; cls head <- labels, conv head <- conv teacher, inv head <- involution teacher."""

    teacher_roles = {Teachers.MAIN: "", "conv": "conv_teacher", "inv": "inv_teacher"}

    def build_student(self, teacher: nn.Module, student: nn.Module | str | None, ctx: RecipeContext) -> nn.Module:
        from vitshrink.models.cit import CrossInductiveViT, cit_from_vit_teacher
        from vitshrink.students import resolve_student

        check_teacher_classes(ctx.teachers, ctx.data.num_classes)
        init = bool(ctx.cfg.get("init_from_teacher", True))
        if student is not None:
            # A named CiT starts from its own init: a ViT teacher's weights only fit a CiT derived from it.
            model = resolve_student(student, teacher, init=False)
        elif isinstance(unwrap_model(teacher), VisionTransformer) and bool(ctx.cfg["cit_from_teacher"]):
            model = cit_from_vit_teacher(unwrap_model(teacher), depth_ratio=float(ctx.cfg["student_depth_ratio"]),
                                         init=init)
        else:
            model = default_cit(teacher, ctx.cfg)
        if not isinstance(unwrap_model(model), CrossInductiveViT):
            raise UserError(f"--recipe coadvise needs a CiT student (vitshrink_cit, cit_*), got "
                            f"{type(unwrap_model(model)).__name__}")
        return model

    def source(self, student: nn.Module, ctx: RecipeContext):
        check_teacher_classes(ctx.teachers, ctx.data.num_classes)  # also on --resume, where build_student is skipped
        return super().source(student, ctx)

    def task(self, teachers: Any, student: nn.Module, cfg: dict[str, Any]) -> MultiTokenKDTask:
        unwrap_model(student).set_distilled_training(True)
        pairs = [(1, "conv", float(cfg["conv_weight"])), (2, "inv", float(cfg["inv_weight"]))]
        if float(cfg["cls_teacher_weight"]) > 0:
            pairs.append((0, Teachers.MAIN, float(cfg["cls_teacher_weight"])))
        return MultiTokenKDTask(student, teachers, pairs=pairs, distill_type=str(cfg["distill_type"]),
                                temperature=float(cfg["temperature"]), smoothing=float(cfg["smoothing"]),
                                task_weight=float(cfg["task_weight"]))

    def finalize(self, student: nn.Module, cfg: dict[str, Any]) -> nn.Module:
        # Eval mode: the CiT returns the mean of its three heads, so the export has one output.
        unwrap_model(student).set_distilled_training(False)
        return student.eval()
