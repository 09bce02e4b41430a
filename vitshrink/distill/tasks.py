"""Training objectives recipes compose: logit KD, token KD (DeiT), multi-token KD, feature KD.

Each is a ``timm.task.TrainingTask`` whose ``forward(images, targets, extras=None)`` returns a dict with at
least ``"loss"`` (scalar) and ``"output"`` (student logits, for the train accuracy shown). They share
:class:`DistillTask`: the student is the trainable module (the only part DDP wraps and ``compile`` compiles
for training), the teachers come from :mod:`vitshrink.distill.teachers` (frozen, eval, never trained), and
``extras`` (e.g. ``extras["key"]``, each image's (epoch, index)) is passed on to ``teacher.logits`` so a
logit cache can answer instead of a live model. Losses live in :mod:`vitshrink.distill.losses` and receive
tensors (logits, or the dict of tapped features), never a model.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.task import TrainingTask
from timm.utils import unwrap_model
from torch import nn

from vitshrink.distill import losses
from vitshrink.distill.taps import FeatureTaps
from vitshrink.distill.teachers import Teachers, as_teachers
from vitshrink.errors import UserError


class DistillTask(TrainingTask):
    """A student trained against ``teachers``; DDP and ``compile`` touch the trainable module only."""

    wants_extras = True  # the loop passes each batch's extras as the third argument
    # Whether ``target`` may be probabilities [B, K] (mixup / cutmix, vitshrink.train.mixup); each task says so
    # for itself (its label terms go through losses.cross_entropy), so a new task is refused mixup until it does.
    soft_targets: bool | None = None

    def __init__(self, trainable: nn.Module, teachers: Teachers):
        device = next(trainable.parameters()).device
        super().__init__(device=device, verbose=False)
        self.trainable_module = trainable
        self.teachers = teachers
        self.teacher_modules = nn.ModuleDict({role: t for role, t in teachers.items() if isinstance(t, nn.Module)})

    @property
    def teacher(self):
        """The main teacher (role ``"teacher"``)."""
        return self.teachers.main

    def train(self, mode: bool = True) -> "DistillTask":
        super().train(mode)
        for teacher in self.teacher_modules.values():
            teacher.eval()
        return self

    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs: Any) -> "DistillTask":
        from torch.nn.parallel import DistributedDataParallel

        self.trainable_module = DistributedDataParallel(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = "inductor", mode: str | None = None, **kwargs: Any) -> nn.Module:
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **kwargs)
        self.eval_model = self.trainable_module
        for teacher in self.teacher_modules.values():
            if hasattr(teacher, "compile"):
                teacher.compile(backend=backend, mode=mode, **kwargs)
        return self.eval_model


class LogitKDTask(DistillTask):
    """``(1 - kd_weight) * CE(student, y) + kd_weight * T^2 KL(teacher_T || student_T)`` (Hinton et al. 2015).

    With ``kd_weight == 1`` the labels are never read, so label-free data works.
    """

    soft_targets = True

    def __init__(self, student: nn.Module, teachers: Teachers | nn.Module, *, kd_weight: float, temperature: float,
                 smoothing: float = 0.0, role: str = Teachers.MAIN):
        super().__init__(student, as_teachers(teachers, student))
        self.kd_weight, self.temperature, self.smoothing, self.role = kd_weight, temperature, smoothing, role

    def teacher_logits(self, images: torch.Tensor, extras: Mapping[str, Any] | None = None) -> torch.Tensor:
        return self.teachers[self.role].logits(images, extras)

    def forward(self, input: torch.Tensor, target: torch.Tensor | None = None,
                extras: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        student_logits = self.trainable_module(input)
        result = losses.kd_loss(student_logits, self.teacher_logits(input, extras), target, kd_weight=self.kd_weight,
                                temperature=self.temperature, smoothing=self.smoothing)
        return {**result, "output": student_logits}


class TokenKDTask(DistillTask):
    """DeiT (Touvron et al. 2021): ``(1 - kd_weight) * CE(cls, y) + kd_weight * D(dist, teacher)``.

    The student is a timm distilled ViT in distilled training (two heads). ``D`` is ``CE(dist, argmax
    teacher)`` (``hard``) or ``T^2 KL`` (``soft``); label smoothing applies to the label term only (as in the
    official code). The reported ``output`` is the two heads' average, which is what inference predicts.
    """

    soft_targets = True

    def __init__(self, student: nn.Module, teachers: Teachers | nn.Module, *, distill_type: str, kd_weight: float,
                 temperature: float, smoothing: float = 0.0, role: str = Teachers.MAIN,
                 kl_reduction: str = "numel"):
        if distill_type not in ("hard", "soft"):
            raise UserError(f"deit distill_type must be hard or soft, got {distill_type!r}")
        if not hasattr(unwrap_model(student), "set_distilled_training"):
            raise UserError(f"token KD needs a distilled ViT student, got {type(student).__name__}")
        unwrap_model(student).set_distilled_training(True)
        super().__init__(student, as_teachers(teachers, student))
        self.distill_type, self.kd_weight, self.temperature = distill_type, kd_weight, temperature
        self.smoothing, self.role, self.kl_reduction = smoothing, role, kl_reduction

    def forward(self, input: torch.Tensor, target: torch.Tensor,
                extras: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        cls_logits, dist_logits = self.trainable_module(input)
        teacher_logits = self.teachers[self.role].logits(input, extras)
        task_loss = losses.cross_entropy(cls_logits, target, self.smoothing)
        distill_loss = token_distillation_loss(dist_logits, teacher_logits, self.distill_type, self.temperature,
                                                self.kl_reduction)
        loss = (1.0 - self.kd_weight) * task_loss + self.kd_weight * distill_loss
        return {"loss": loss, "output": (cls_logits.detach() + dist_logits.detach()) / 2,
                "task_loss": task_loss.detach(), "kd_loss": distill_loss.detach()}


def token_distillation_loss(token_logits: torch.Tensor, teacher_logits: torch.Tensor, distill_type: str,
                            temperature: float, kl_reduction: str = "numel") -> torch.Tensor:
    """DeiT's distillation term: CE to the teacher's argmax (``hard``) or ``T^2 KL`` (``soft``; the official
    code divides the summed KL by the number of logits, ``kl_reduction="numel"``)."""
    if distill_type == "hard":
        return losses.cross_entropy(token_logits, teacher_logits.argmax(dim=-1))
    return losses.kd_kl(token_logits, teacher_logits, temperature, kl_reduction)


class MultiTokenKDTask(DistillTask):
    """One distillation term per (student head, teacher role) pair, e.g. co-advise's CNN and INN tokens.

    The student's forward returns a tuple of logits: ``heads[0]`` is the class head (CE to the labels, weight
    ``task_weight``; ``None`` means ``1 - sum(weights)``), and ``pairs`` lists ``(head index, teacher role,
    weight)``: ``weight * D(heads[index], teacher)`` with ``D`` as in DeiT (``hard``: CE to the teacher's
    argmax; ``soft``: ``T^2 KL``, batch mean). Head 0 may also be paired (soft targets for the class head).
    ``target`` may be class indices or probabilities [B, K] (mixup / cutmix). A pair of weight 0 is skipped
    (its teacher is not run). The reported ``output`` is the mean of all heads.
    """

    soft_targets = True

    def __init__(self, student: nn.Module, teachers: Teachers, *, pairs: Sequence[tuple[int, str, float]],
                 distill_type: str = "hard", temperature: float = 1.0, smoothing: float = 0.0,
                 task_weight: float | None = None):
        super().__init__(student, teachers)
        if distill_type not in ("hard", "soft"):
            raise UserError(f"multi-token KD distill_type must be hard or soft, got {distill_type!r}")
        for _, role, _ in pairs:
            if role not in teachers:
                raise UserError(f"multi-token KD: no teacher for role {role!r} (have: {', '.join(teachers)})")
        self.pairs, self.distill_type = list(pairs), distill_type
        self.temperature, self.smoothing = temperature, smoothing
        self.task_weight = 1.0 - sum(w for _, _, w in self.pairs) if task_weight is None else float(task_weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor,
                extras: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        heads = self.trainable_module(input)
        task_loss = losses.cross_entropy(heads[0], target, self.smoothing)
        loss = self.task_weight * task_loss
        result: dict[str, torch.Tensor] = {"task_loss": task_loss.detach()}
        for head, role, weight in self.pairs:
            if weight == 0:
                continue
            # Co-advise's KL is KLDivLoss(reduction="batchmean") (official main.py), not DeiT's sum / numel.
            term = token_distillation_loss(heads[head], self.teachers[role].logits(input, extras),
                                           self.distill_type, self.temperature, kl_reduction="batchmean")
            loss = loss + weight * term
            result[f"kd_loss_{role}"] = term.detach()
        output = torch.stack([h.detach() for h in heads]).mean(0)
        return {**result, "loss": loss, "output": output}


class FeatureProjector(nn.Module):
    """The student plus a learned projection of its tapped features onto the teacher's widths.

    ``forward(x) -> (logits, {point: projected feature})``; trained with the student (and checkpointed), but
    only the student is saved as the model.
    """

    def __init__(self, student: nn.Module, points: Sequence[str], widths: Sequence[tuple[int, int]]):
        super().__init__()
        self.student, self.points = student, list(points)
        self.projections = nn.ModuleList(nn.Linear(s, t) for s, t in widths)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with FeatureTaps(self.student, self.points) as feats:
            logits = self.student(x)
        projected = {}
        for point, projection in zip(self.points, self.projections):
            feature = feats[point]
            # (B, C, H, W) maps become tokens (B, HW, C) so one linear layer projects either layout.
            tokens = feature.flatten(2).transpose(1, 2) if feature.dim() == 4 else feature
            projected[point] = projection(tokens)
        return logits, projected


def feature_mse(student_tokens: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """MSE after bringing the teacher's map to the student's token grid (patch tokens only).

    A (B, C, H, W) teacher map is resized (bilinear) to the student's patch grid; prefix tokens (class,
    distillation) of the student are dropped when the token count exceeds the grid.
    """
    teacher = teacher_feature.float()
    if teacher.dim() == 4:
        tokens = student_tokens.shape[1]
        side = int(round(tokens ** 0.5))
        while side * side > tokens or (tokens - side * side) > 8:
            side -= 1
        student_tokens = student_tokens[:, tokens - side * side:]
        teacher = F.interpolate(teacher, size=(side, side), mode="bilinear", align_corners=False)
        teacher = teacher.flatten(2).transpose(1, 2)
    return F.mse_loss(student_tokens.float(), teacher)


class FeatureKDTask(DistillTask):
    """Logit KD plus ``feature_weight`` x MSE between projected student features and teacher features.

    ``pairs`` lists ``(student point, teacher point)``; ``widths`` the (student, teacher) channel widths of each
    pair (the projection's shape). For DearKD's stage I (CNN teacher's early layers -> student's early blocks).
    """

    soft_targets = True

    def __init__(self, student: nn.Module, teachers: Teachers | nn.Module, *, pairs: Sequence[tuple[str, str]],
                 widths: Sequence[tuple[int, int]], feature_weight: float, kd_weight: float, temperature: float,
                 role: str = Teachers.MAIN):
        teachers = as_teachers(teachers, student)
        super().__init__(FeatureProjector(student, [s for s, _ in pairs], widths), teachers)
        self.pairs, self.feature_weight = list(pairs), feature_weight
        self.kd_weight, self.temperature, self.role = kd_weight, temperature, role

    def forward(self, input: torch.Tensor, target: torch.Tensor | None = None,
                extras: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        student_logits, projected = self.trainable_module(input)
        teacher_logits, teacher_feats = self.teachers[self.role].features(input, [t for _, t in self.pairs])
        kd = losses.kd_loss(student_logits, teacher_logits, target, kd_weight=self.kd_weight,
                            temperature=self.temperature)
        feature = torch.stack([feature_mse(projected[s], teacher_feats[t]) for s, t in self.pairs]).mean()
        loss = kd["loss"] + self.feature_weight * feature
        return {**kd, "loss": loss, "output": student_logits, "feature_loss": feature.detach()}
