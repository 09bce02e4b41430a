"""``manifold``: fine-grained manifold distillation (Hao et al., NeurIPS 2022). Settings: recipes/manifold.yaml.

Logit KD plus the patch-level manifold terms (intra-image, inter-image, randomly sampled patches) between pairs
of student and teacher blocks (official huawei-noah/Efficient-Computing ``Distillation/ManifoldKD``). Without
``--student-points`` / ``--teacher-points`` the pairs are the first and last third of the student's blocks with
as many of the teacher's first and last blocks (the official DeiT-Tiny <- CaiT-S24 run: student blocks
0-3 and 8-11 with teacher blocks 0-3 and 20-23).
"""
from __future__ import annotations

from typing import Any

from timm.utils import unwrap_model
from torch import nn

from vitshrink.distill.feature_tasks import ManifoldTask
from vitshrink.distill.teachers import as_teachers
from vitshrink.errors import UserError
from vitshrink.recipes.base import Recipe, register_recipe


def block_count(model: nn.Module, role: str) -> int:
    blocks = getattr(unwrap_model(model), "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not len(blocks):
        raise UserError(f"manifold: the {role} is a {type(unwrap_model(model)).__name__}, not a ViT with blocks "
                        f"(blocks.N); manifold distillation relates patch tokens of ViT blocks")
    return len(blocks)


def default_pairs(student_depth: int, teacher_depth: int) -> list[tuple[str, str]]:
    """The first and last third of the student's blocks, paired with the teacher's first and last blocks."""
    if student_depth < 2:
        return [("blocks.0", f"blocks.{teacher_depth - 1}")]
    n = max(1, student_depth // 3)
    student = list(range(n)) + list(range(student_depth - n, student_depth))
    teacher = list(range(n)) + list(range(teacher_depth - n, teacher_depth))
    return [(f"blocks.{s}", f"blocks.{t}") for s, t in zip(student, teacher)]


@register_recipe("manifold")
class Manifold(Recipe):
    """Logit KD + beta x (inter-image, intra-image, random-patch manifold terms) over block pairs."""

    needs_teacher_features = True  # the manifold terms read teacher blocks: no logit cache

    def configure(self, cfg: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(cfg["num_random"], int) or isinstance(cfg["num_random"], bool) or cfg["num_random"] < 1:
            raise UserError(f"--num-random must be an integer >= 1, got {cfg['num_random']!r}")
        student_points, teacher_points = cfg["student_points"], cfg["teacher_points"]
        if (student_points is None) != (teacher_points is None) or \
                (student_points is not None and (len(student_points) != len(teacher_points) or not student_points)):
            raise UserError("--student-points and --teacher-points: give both, as lists of the same length "
                            "(e.g. '[blocks.0, blocks.2]' and '[blocks.0, blocks.5]'), or neither")
        return cfg

    def task(self, teachers: Any, student: nn.Module, cfg: dict[str, Any]) -> ManifoldTask:
        teachers = as_teachers(teachers, student)
        if cfg["student_points"] is None:
            pairs = default_pairs(block_count(student, "student"), block_count(teachers.main.module, "teacher"))
        else:
            pairs = list(zip(cfg["student_points"], cfg["teacher_points"]))
        return ManifoldTask(student, teachers, pairs=pairs, kd_weight=float(cfg["kd_weight"]),
                            temperature=float(cfg["temperature"]), beta=float(cfg["beta"]),
                            num_random=int(cfg["num_random"]), intra_weight=float(cfg["intra_weight"]),
                            inter_weight=float(cfg["inter_weight"]), random_weight=float(cfg["random_weight"]),
                            smoothing=float(cfg["smoothing"]))
