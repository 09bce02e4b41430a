"""Teachers a recipe distils from: frozen live models, by role.

:class:`LiveTeacher` wraps one frozen model (eval mode, no gradients, never wrapped in DDP) so that it takes
the *student's* batch: the student's normalisation is converted to the teacher's own (decided once, not per
step) and the images are resized to the teacher's own input size when it differs. The teacher sees the same
augmented view as the student ("consistent" teaching, Beyer et al. 2022): no second augmentation happens.
It is timm's ``DistillationTeacher`` (so timm's distillation tasks accept it) around :class:`TeacherInput`.

:class:`Teachers` maps a role to a teacher; role ``"teacher"`` is the user's TEACHER. A recipe declares the
roles it needs in ``teacher_roles`` (role -> the recipe option holding its SPEC, ``""`` for the main
TEACHER); the pipeline loads them and builds the mapping. A logit cache (later) implements the same
``logits(images, extras)`` by reading ``extras["key"]``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from timm.task import DistillationTeacher
from torch import nn

from vitshrink.distill.taps import FeatureTaps


class TeacherInput(nn.Module):
    """A teacher that accepts the student's batch: resized to the teacher's own input size when it differs.

    Normalisation is converted by the wrapping :class:`LiveTeacher` (timm's ``DistillationTeacher`` reads
    the ``pretrained_cfg`` forwarded here); resizing is what timm lacks, and a teacher trained at another
    resolution than the student needs it.
    """

    def __init__(self, teacher: nn.Module, student_input_size: Iterable[int]):
        super().__init__()
        from vitshrink.io import data_config

        self.teacher = teacher
        self.pretrained_cfg = dict(data_config(teacher))
        self.size = tuple(int(v) for v in data_config(teacher)["input_size"][1:])
        self.resize = self.size != tuple(int(v) for v in student_input_size)

    def fit(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize:
            return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from vitshrink.models.blockwise_vit import as_logits

        out = self.teacher(self.fit(x))
        # A distilled-ViT teacher in eval mode already averages its heads; a tuple means train mode.
        # A head that ends in softmax gives probabilities: distillation takes their log.
        return as_logits(self.teacher, sum(out) / len(out) if isinstance(out, (tuple, list)) else out)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher.forward_features(self.fit(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.teacher.forward_head(x, pre_logits=pre_logits)


class LiveTeacher(DistillationTeacher):
    """A frozen model fed the student's batches (its own normalisation and input size)."""

    def __init__(self, model: nn.Module, student_data_config: Mapping[str, Any]):
        for param in model.parameters():
            param.requires_grad_(False)
        model.eval()
        device = next(model.parameters()).device
        super().__init__(TeacherInput(model, student_data_config["input_size"][1:]), device=device)
        mean = torch.tensor(student_data_config["mean"], dtype=self.mean_kd.dtype).view(1, -1, 1, 1)
        std = torch.tensor(student_data_config["std"], dtype=self.std_kd.dtype).view(1, -1, 1, 1)
        self.register_buffer("student_mean", mean.to(device), persistent=False)
        self.register_buffer("student_std", std.to(device), persistent=False)
        # Decided once, so a step does not compare tensors (a host sync on CUDA) every iteration.
        self.renormalise = not (torch.allclose(mean, self.mean_kd.cpu()) and torch.allclose(std, self.std_kd.cpu()))

    @property
    def module(self) -> nn.Module:
        """The teacher model itself (hooks and feature points go on it)."""
        return self.model.teacher

    def train(self, mode: bool = True) -> "LiveTeacher":
        return super().train(False)  # never trained: dropout / batch-norm stay in eval

    def to_teacher_input(self, images: torch.Tensor) -> torch.Tensor:
        """The student's batch in the teacher's normalisation (same size; resizing happens in forward)."""
        if self.renormalise:
            return (images * self.student_std + self.student_mean - self.mean_kd) / self.std_kd
        return images

    def logits(self, images: torch.Tensor, extras: Mapping[str, Any] | None = None) -> torch.Tensor:
        """The teacher's logits for a student batch (no gradient)."""
        with torch.no_grad():
            return self(self.to_teacher_input(images))

    def features(self, images: torch.Tensor, points: Iterable[str]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(logits, {point: tensor})`` for a student batch; points name modules of :attr:`module`."""
        with torch.no_grad(), FeatureTaps(self.module, points, detach=True) as feats:
            logits = self(self.to_teacher_input(images))
        return logits, dict(feats)


class Teachers(Mapping):
    """Role -> teacher. Role ``"teacher"`` is the user's TEACHER."""

    MAIN = "teacher"

    def __init__(self, teachers: Mapping[str, Any]):
        self._teachers = dict(teachers)

    @classmethod
    def live(cls, models: Mapping[str, nn.Module], student_data_config: Mapping[str, Any]) -> "Teachers":
        """Live teachers for ``models`` (role -> frozen model), fed batches in the student's data config."""
        return cls({role: LiveTeacher(model, student_data_config) for role, model in models.items()})

    def __getitem__(self, role: str):
        return self._teachers[role]

    def __iter__(self) -> Iterator[str]:
        return iter(self._teachers)

    def __len__(self) -> int:
        return len(self._teachers)

    @property
    def main(self):
        return self._teachers[self.MAIN]


def as_teachers(teachers: "Teachers | nn.Module", student: nn.Module) -> Teachers:
    """``teachers`` as given, or a bare model as the main live teacher of ``student``."""
    if isinstance(teachers, Teachers):
        return teachers
    from vitshrink.io import data_config

    return Teachers.live({Teachers.MAIN: teachers}, data_config(student))
