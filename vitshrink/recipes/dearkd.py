"""``dearkd``: DearKD (Chen et al., CVPR 2022, arXiv 2204.12997). Settings: recipes/dearkd.yaml.

Two stages over one run, switched at epoch ``stage1_epochs`` (0-based epochs ``< stage1_epochs`` are stage I):

* **Stage I** -- early knowledge distillation: DeiT token distillation from the main TEACHER (a distilled
  student, as the ``deit`` recipe) plus alignment of the student's early blocks to the early-stage feature
  maps of a CNN teacher (role ``cnn``): the student's patch tokens go through a learned linear projection to
  the CNN's width, and the CNN map is resized (bilinear) to the student's patch grid before the MSE::

      (1 - kd_weight) * CE(cls, y) + kd_weight * D(dist, teacher) + feature_weight * mean_l MSE(P_l(s_l), c_l)

* **Stage II** -- "full rein": the labels only, no teacher: ``(CE(cls, y) + CE(dist, y)) / 2`` (ours: both
  heads learn from the labels, so the averaged prediction of the exported model stays meaningful).

The stage is read from each batch's ``extras["key"][:, 0]`` (the epoch the data source stamps on every
image), so a resumed run (``--resume``) is in the right stage from its first step; callers without extras set
``task.epoch``. The CNN teacher is ``--cnn-teacher SPEC``; without it, the main TEACHER serves when it is
itself a CNN (a DeiT-style CNN -> ViT run with one teacher), otherwise the missing SPEC is an error.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from timm.utils import unwrap_model
from torch import nn

from vitshrink.distill import losses
from vitshrink.distill.taps import FeatureTaps
from vitshrink.distill.tasks import DistillTask, FeatureProjector, feature_mse, token_distillation_loss
from vitshrink.distill.teachers import Teachers
from vitshrink.errors import UserError
from vitshrink.io import data_config
from vitshrink.recipes.base import Recipe, RecipeContext, register_recipe
from vitshrink.students import add_distillation_token

CNN = "cnn"


def is_cnn(model: nn.Module) -> bool:
    """A convolutional network: convolutions and no self-attention (a ViT's patch embedding is one conv)."""
    modules = list(unwrap_model(model).modules())
    convs = sum(isinstance(m, nn.Conv2d) for m in modules)
    attention = any(isinstance(getattr(m, "qkv", None), nn.Linear) for m in modules)
    return convs > 1 and not attention


def default_cnn_points(model: nn.Module, count: int = 2) -> list[str]:
    """The first ``count`` stages a timm-style model lists in ``feature_info`` (e.g. ``layer1``, ``layer2``)."""
    info = getattr(unwrap_model(model), "feature_info", None) or []
    names = [entry.get("module") for entry in info if isinstance(entry, Mapping) and entry.get("module")]
    # Skip a stem entry (stride 1/2 conv before the first stage) only when stages follow it.
    stages = [name for name in names if not name.startswith(("act", "bn", "conv", "stem"))] or names
    if len(stages) < count:
        raise UserError("--cnn-points: the CNN teacher lists no feature stages (feature_info); name its early "
                        "stages, e.g. --cnn-points '[layer1, layer2]' or '[stages.0, stages.1]'")
    return stages[:count]


class DearKDTask(DistillTask):
    """Stage I (token KD + early feature alignment) before ``stage1_epochs``, stage II (labels only) after.

    ``forward`` returns ``loss``, ``output`` (mean of the two heads) and the terms ``task_loss``, ``kd_loss``,
    ``feature_loss`` (zero in stage II) and ``stage`` (1 or 2).
    """

    soft_targets = True  # both label terms go through losses.cross_entropy

    def __init__(self, student: nn.Module, teachers: Teachers, *, student_points: Sequence[str],
                 cnn_points: Sequence[str], widths: Sequence[tuple[int, int]], stage1_epochs: int,
                 distill_type: str, kd_weight: float, temperature: float, feature_weight: float,
                 smoothing: float = 0.0):
        if distill_type not in ("hard", "soft"):
            raise UserError(f"dearkd distill_type must be hard or soft, got {distill_type!r}")
        unwrap_model(student).set_distilled_training(True)
        super().__init__(FeatureProjector(student, student_points, widths), teachers)
        self.pairs = list(zip(student_points, cnn_points))
        self.stage1_epochs, self.distill_type, self.kd_weight = int(stage1_epochs), distill_type, kd_weight
        self.temperature, self.feature_weight, self.smoothing = temperature, feature_weight, smoothing
        self.epoch = 0  # used when a batch comes without extras

    def stage_of(self, extras: Mapping[str, Any] | None) -> int:
        key = None if extras is None else extras.get("key")
        epoch = int(key[0, 0]) if key is not None and len(key) else self.epoch
        return 1 if epoch < self.stage1_epochs else 2

    def forward(self, input: torch.Tensor, target: torch.Tensor,
                extras: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        stage = self.stage_of(extras)
        (cls_logits, dist_logits), projected = self.trainable_module(input)
        output = (cls_logits.detach() + dist_logits.detach()) / 2
        task_loss = losses.cross_entropy(cls_logits, target, self.smoothing)
        zero = task_loss.new_zeros(())
        if stage == 2:
            dist_label_loss = losses.cross_entropy(dist_logits, target, self.smoothing)
            # The projections get no gradient now; the zero term keeps them in the graph (DDP needs every
            # parameter of the trainable module to take part in each step).
            unused = sum(p.sum() for p in projected.values()) * 0.0
            loss = (task_loss + dist_label_loss) / 2 + unused
            return {"loss": loss, "output": output, "task_loss": task_loss.detach(), "kd_loss": zero,
                    "feature_loss": zero, "stage": torch.tensor(2)}
        teacher_logits = self.teachers[Teachers.MAIN].logits(input, extras)
        kd = token_distillation_loss(dist_logits, teacher_logits, self.distill_type, self.temperature)
        _, cnn_feats = self.teachers[CNN].features(input, [c for _, c in self.pairs])
        feature = torch.stack([feature_mse(projected[s], cnn_feats[c]) for s, c in self.pairs]).mean()
        loss = (1.0 - self.kd_weight) * task_loss + self.kd_weight * kd + self.feature_weight * feature
        return {"loss": loss, "output": output, "task_loss": task_loss.detach(), "kd_loss": kd.detach(),
                "feature_loss": feature.detach(), "stage": torch.tensor(1)}


def feature_widths(student: nn.Module, cnn_teacher, student_points: Sequence[str], cnn_points: Sequence[str]
                   ) -> list[tuple[int, int]]:
    """(student width, CNN channels) of each pair, from one dry forward of a blank batch (RNG untouched)."""
    cfg = data_config(student)
    device = next(student.parameters()).device
    blank = torch.zeros(2, *[int(v) for v in cfg["input_size"]], device=device)
    was_training = student.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            student.eval()
            with FeatureTaps(student, student_points) as feats:
                student(blank)
            _, cnn_feats = cnn_teacher.features(blank, cnn_points)
    except ValueError as exc:  # a point that names no module
        raise UserError(f"dearkd: {exc} (set --student-points / --cnn-points)") from None
    finally:
        student.train(was_training)
    widths = []
    for s, c in zip(student_points, cnn_points):
        s_feat, c_feat = feats[s], cnn_feats[c]
        if c_feat.dim() != 4:
            raise UserError(f"--cnn-points {c}: expected a (B, C, H, W) feature map, got shape {tuple(c_feat.shape)}")
        widths.append((int(s_feat.shape[-1] if s_feat.dim() == 3 else s_feat.shape[1]), int(c_feat.shape[1])))
    return widths


@register_recipe("dearkd")
class DearKD(Recipe):
    """DearKD: stage I token KD + CNN early-feature alignment, stage II labels only."""

    teacher_roles = {Teachers.MAIN: "", CNN: "cnn_teacher"}

    def configure(self, cfg: dict[str, Any]) -> dict[str, Any]:
        if cfg.get("stage1_epochs") is None:
            cfg = {**cfg, "stage1_epochs": math.ceil(float(cfg["stage1_share"]) * int(cfg["epochs"]))}
        stage1 = cfg["stage1_epochs"]
        if not isinstance(stage1, int) or isinstance(stage1, bool) or stage1 < 0:
            raise UserError(f"--stage1-epochs must be an integer >= 0, got {stage1!r}")
        if len(cfg["student_points"] or []) < 1:
            raise UserError("--student-points: name at least one student block, e.g. '[blocks.0, blocks.1]'")
        return cfg

    def stand_in_teacher(self, role: str, loaded: dict[str, nn.Module]) -> nn.Module | None:
        main = loaded.get(Teachers.MAIN)
        if role == CNN and main is not None and is_cnn(main):
            return main
        if role == CNN:
            raise UserError("--cnn-teacher: recipe dearkd needs a CNN teacher for its early-feature stage; the "
                            "TEACHER is not a CNN, so pass --cnn-teacher SPEC (e.g. a CIFAR ResNet .th)")
        return None

    def build_student(self, teacher: nn.Module, student: nn.Module | str | None, ctx: RecipeContext) -> nn.Module:
        return add_distillation_token(super().build_student(teacher, student, ctx), recipe="dearkd")

    def task(self, teachers: Any, student: nn.Module, cfg: dict[str, Any]) -> DearKDTask:
        if not isinstance(teachers, Teachers) or CNN not in teachers:
            raise UserError("dearkd needs Teachers with roles 'teacher' and 'cnn' (see DearKD.teacher_roles)")
        student_points = list(cfg["student_points"])
        cnn_points = list(cfg["cnn_points"] or default_cnn_points(teachers[CNN].module, len(student_points)))
        if len(cnn_points) != len(student_points):
            raise UserError(f"--cnn-points {cnn_points} and --student-points {student_points}: need as many of each")
        widths = feature_widths(student, teachers[CNN], student_points, cnn_points)
        return DearKDTask(student, teachers, student_points=student_points, cnn_points=cnn_points, widths=widths,
                          stage1_epochs=int(cfg["stage1_epochs"]), distill_type=str(cfg["distill_type"]),
                          kd_weight=float(cfg["kd_weight"]), temperature=float(cfg["temperature"]),
                          feature_weight=float(cfg["feature_weight"]), smoothing=float(cfg["smoothing"]))

    def finalize(self, student: nn.Module, cfg: dict[str, Any]) -> nn.Module:
        # Eval mode with distilled training off: forward returns (cls + dist) / 2, a single output.
        student.set_distilled_training(False)
        return student.eval()
