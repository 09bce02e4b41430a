"""The recipe interface, the registry, presets, and the teacher wrapper every recipe shares.

A recipe is one class registered by name plus one YAML preset, ``recipes/NAME.yaml`` (shipped in the
package as ``vitshrink/presets/NAME.yaml``), holding every default with a comment citing its source. The
engine (``vitshrink.engine``) knows only this interface; it calls, in order::

    cfg     = recipe.configure(cfg)                                  # settings that depend on settings
    student = recipe.build_student(teacher, student_or_none, ctx)   # choose / change the student
    student = recipe.prepare(teacher, student, ctx)                  # optional pre-training stage
    task    = recipe.task(teacher, student, cfg)                     # a timm.task.TrainingTask
    ...  the engine trains task.get_trainable_module() with AdamW + cosine, eval, checkpoints ...
    model   = recipe.finalize(student, cfg)                          # e.g. fuse DeiT heads for export

* ``build_student(teacher, student, ctx) -> nn.Module``: ``student`` is what the user asked for
  (``None``, a module, a file or a ``NAME:k=v`` spec); the default resolves it with
  ``vitshrink.students.resolve_student`` (derived half-depth student, initialised from the teacher when
  ``cfg["init_from_teacher"]``). Any module returned must be built by ``vitshrink.io.create_model``
  (or carry ``vitshrink_arch``) so the engine can save it and rebuild it on ``--resume``.
* ``prepare(teacher, student, ctx) -> nn.Module``: default returns ``student`` unchanged. A search stage
  (UVC) runs here with ``ctx.train_loader(student)``, ``ctx.device``, ``ctx.progress`` and
  ``ctx.flops_target`` and may return a *different, physically smaller* module. On ``--resume`` neither
  ``build_student`` nor ``prepare`` runs: the engine rebuilds the student from the architecture record it
  stored in ``last.pt``.
* ``task(teacher, student, cfg) -> TrainingTask``: ``forward(images, targets)`` returns a dict with at least
  ``"loss"`` (scalar) and ``"output"`` (student logits, used for the train accuracy shown); other entries
  (``"task_loss"``, ``"kd_loss"``, ...) are optional, for callers that log them. The engine builds the optimizer over
  ``task.get_trainable_module()`` *before* calling ``task.prepare_distributed`` / ``task.compile``, so a task
  may own extra trainable parts (a feature projection for ``probe``); those are checkpointed in ``last.pt``
  but only ``student`` is saved as ``student.safetensors``. Wrap the teacher with :func:`teacher_for`
  (frozen, its own normalisation and input size). Set ``uses_labels = False`` on a recipe that never reads
  the targets (label-free KD): the engine then shows the loss alone (no train accuracy against targets).
  The loader still yields ``(images, targets)``; a label-free set is read as an ImageFolder whose class
  folders are arbitrary (targets ignored), and validation still needs a labelled split.
* ``finalize(student, cfg) -> nn.Module``: the model to export and measure (default: ``student`` in eval).

``ctx`` is a :class:`RecipeContext`. ``cfg`` is the merged configuration dict (preset < ``--config`` file
< flags < overrides).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
import yaml
from timm.task import DistillationTeacher, TrainingTask
from torch import nn

from vitshrink.errors import UserError

_REGISTRY: dict[str, type["Recipe"]] = {}


@dataclass
class RecipeContext:
    """What the engine lends a recipe's ``build_student`` / ``prepare`` stages."""

    cfg: dict[str, Any]
    device: torch.device
    data: Any  # vitshrink.data.LabelledData
    train_loader: Callable[..., Any]  # train_loader(model, batch_size=None) -> loader of (images, targets, n_bad)
    progress: Any = None  # rich.progress.Progress or None (not the main rank)
    flops_target: float | None = None
    rank: int = 0
    world_size: int = 1
    out_dir: Path | None = None
    log: Callable[[str], None] = field(default=print)


class Recipe:
    """Base recipe: derived/resolved student, no preparation, ``student.eval()`` as the final model."""

    name: str = ""
    uses_labels: bool = True

    def configure(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """Fill settings whose default depends on other settings (e.g. a per-mode weight); default: as is."""
        return cfg

    def build_student(self, teacher: nn.Module, student: nn.Module | str | None, ctx: RecipeContext) -> nn.Module:
        from vitshrink.students import derive_student, resolve_student

        init = bool(ctx.cfg.get("init_from_teacher", True))
        if student is None:
            return derive_student(teacher, depth_ratio=float(ctx.cfg.get("student_depth_ratio", 0.5)), init=init)
        return resolve_student(student, teacher, init=init)

    def prepare(self, teacher: nn.Module, student: nn.Module, ctx: RecipeContext) -> nn.Module:
        return student

    def task(self, teacher: nn.Module, student: nn.Module, cfg: dict[str, Any]) -> TrainingTask:
        raise NotImplementedError

    def finalize(self, student: nn.Module, cfg: dict[str, Any]) -> nn.Module:
        return student.eval()

    def report_notes(self, out_dir: Path | None) -> list[str]:
        """Warnings for the report (read from the run folder, so they survive ``--resume``); default none."""
        return []


def register_recipe(name: str) -> Callable[[type[Recipe]], type[Recipe]]:
    def decorate(cls: type[Recipe]) -> type[Recipe]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def recipe_names() -> list[str]:
    import vitshrink.recipes  # noqa: F401  (imports every recipe module, which registers it)

    return sorted(_REGISTRY)


def get_recipe(name: str) -> Recipe:
    names = recipe_names()
    if name not in _REGISTRY:
        raise UserError(f"--recipe {name!r}: unknown recipe (known: {', '.join(names)})")
    return _REGISTRY[name]()


class TeacherInput(nn.Module):
    """A teacher that accepts the student's batch: resized to the teacher's own input size when it differs.

    Normalisation is converted by timm's ``DistillationTeacher`` (which wraps this module and reads the
    ``pretrained_cfg`` forwarded here); resizing is what it lacks, and a teacher trained at another
    resolution than the student needs it. The teacher sees the *same augmented view* as the student
    (Beyer et al. 2022, "consistent" teaching): no second augmentation happens anywhere.
    """

    def __init__(self, teacher: nn.Module, student_input_size: tuple[int, int]):
        super().__init__()
        from vitshrink.io import data_config

        self.teacher = teacher
        self.pretrained_cfg = dict(data_config(teacher))
        self.size = tuple(int(v) for v in data_config(teacher)["input_size"][1:])
        self.resize = self.size != tuple(int(v) for v in student_input_size)

    def _fit(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize:
            return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.teacher(self._fit(x))
        # A distilled-ViT teacher in eval mode already averages its heads; a tuple means train mode.
        return sum(out) / len(out) if isinstance(out, (tuple, list)) else out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher.forward_features(self._fit(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.teacher.forward_head(x, pre_logits=pre_logits)


def teacher_for(teacher: nn.Module, student: nn.Module) -> DistillationTeacher:
    """The frozen teacher in timm's ``DistillationTeacher`` wrapper, fed the student's batches."""
    from vitshrink.io import data_config

    for param in teacher.parameters():
        param.requires_grad_(False)
    teacher.eval()
    wrapped = DistillationTeacher(TeacherInput(teacher, data_config(student)["input_size"][1:]))
    return wrapped.to(next(teacher.parameters()).device)


def normalisation_differs(task_teacher: DistillationTeacher, student: nn.Module) -> bool:
    """Decided once, so the step does not compare tensors (a host sync on CUDA) every iteration."""
    from vitshrink.io import data_config

    cfg = data_config(student)
    mean = torch.tensor(cfg["mean"], dtype=task_teacher.mean_kd.dtype).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"], dtype=task_teacher.std_kd.dtype).view(1, -1, 1, 1)
    return not (torch.allclose(mean, task_teacher.mean_kd.cpu()) and torch.allclose(std, task_teacher.std_kd.cpu()))
