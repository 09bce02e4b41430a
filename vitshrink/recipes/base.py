"""The recipe interface and the registry.

A recipe is one file ``vitshrink/recipes/NAME.py`` (a class registered with ``@register_recipe("NAME")``) plus
one overlay ``recipes/NAME.yaml`` holding only what differs from ``recipes/base.yaml`` (engine, optimiser and
augmentation keys), every value with a comment citing its source. The overlay's keys that base lacks are the
recipe's own *options* (uvc: ``flops_target``, ``no_skip``, ...): reachable as ``--kebab-name VALUE``, in
``--config`` and with ``--set``; ``vitshrink recipes show NAME`` lists them (``vitshrink.config``).

The pipeline (``vitshrink.pipeline``) calls, in order::

    cfg     = recipe.configure(cfg)                                  # settings that depend on settings
    student = recipe.build_student(teacher, student_or_none, ctx)   # choose / change the student
    student = recipe.prepare(teacher, student, ctx)                  # optional pre-training stage
    source  = recipe.source(student, ctx)                            # where training batches come from
    task    = recipe.task(teachers, student, cfg)                    # a timm.task.TrainingTask
    ...  vitshrink.train.train(task, source, schedule, checkpointing) trains task.get_trainable_module() ...
    model   = recipe.finalize(student, cfg)                          # e.g. fuse DeiT heads for export

* ``teacher_roles: dict[str, str]``: the teachers the recipe needs, role -> the recipe option holding its SPEC
  (``""``: the user's TEACHER). Default ``{"teacher": ""}``. The pipeline loads each with
  ``vitshrink.io.load_model`` into ``ctx.teachers`` (role -> frozen model) and, for ``task``, into a
  ``vitshrink.distill.teachers.Teachers`` of live teachers fed the student's batches.
  ``stand_in_teacher(role, loaded)`` may supply a role whose option is unset (dearkd: the main TEACHER
  serves as the CNN teacher when it is a CNN); the default ``None`` makes the missing SPEC an error.
* ``build_student(teacher, student, ctx) -> nn.Module``: ``teacher`` is the main teacher model, ``student`` what
  the user asked for (``None``, a module, a file or a ``NAME:k=v`` spec); the default derives the half-depth
  student or resolves the spec (``vitshrink.students``). The module returned must be built by
  ``vitshrink.io.create_model`` (its architecture is recorded for saving and resuming).
* ``prepare(teacher, student, ctx) -> nn.Module``: default returns ``student``. A search stage (UVC) runs here
  with ``ctx.train_loader(student, batch_size)``, ``ctx.device`` and ``ctx.progress`` and may return a
  different, physically smaller module. On ``--resume`` neither ``build_student`` nor ``prepare`` runs: the
  student is rebuilt from the architecture record in ``last.pt``.
* ``source(student, ctx) -> TrainingSource``: default: the labelled training split (folder, tar, a
  ``select-wild`` selection or a synthesised folder) with the student's training transform, as seeded
  ``(images, targets, extras)`` batches (``vitshrink.data.sources``).
* ``task(teachers, student, cfg) -> TrainingTask``: compose one of ``vitshrink.distill.tasks`` (logit KD,
  token KD, multi-token KD, feature KD); ``forward(images, targets[, extras])`` returns at least ``"loss"`` and
  ``"output"``. ``teachers`` may also be a bare model (the main teacher), for callers outside the pipeline.
  Extra trainable parts of a task (a feature projection) are checkpointed in ``last.pt``; only the student is
  saved as ``student.safetensors``. ``uses_labels = False`` marks a label-free recipe (no train accuracy).
* ``finalize(student, cfg) -> nn.Module``: the model to export and measure (default: ``student`` in eval).
* ``check_sources(cfg, sources)``: refuse settings the user set together that exclude each other (uvc:
  ``--latency-target`` with ``--flops-target``); ``report_fields(out_dir)``: extra report.json sections read from
  the run folder (uvc: ``pruning``, with the top-1 measured by ``ctx.evaluate`` right after slicing).

Recipes never import each other: shared objectives live in ``vitshrink.distill.tasks``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from timm.task import TrainingTask
from torch import nn

from vitshrink.errors import UserError

_REGISTRY: dict[str, type["Recipe"]] = {}


@dataclass
class RecipeContext:
    """What the pipeline lends a recipe's ``build_student`` / ``prepare`` / ``source`` stages."""

    cfg: dict[str, Any]
    device: torch.device
    data: Any  # vitshrink.data.LabelledData
    train_loader: Callable[..., Any]  # train_loader(model, batch_size=None) -> loader of (images, targets, n_bad)
    progress: Any = None  # rich.progress.Progress or None (not the main rank)
    rank: int = 0
    world_size: int = 1
    out_dir: Path | None = None
    log: Callable[[str], None] = field(default=print)
    teachers: dict[str, nn.Module] = field(default_factory=dict)  # role -> frozen teacher model
    seed: int = 0
    # evaluate(model) -> validation top-1 (None: no validation split); e.g. a pruned student before fine-tuning.
    evaluate: Callable[[nn.Module], float | None] | None = None


class Recipe:
    """Base recipe: derived/resolved student, no preparation, labelled source, ``student.eval()`` as final."""

    name: str = ""
    uses_labels: bool = True
    teacher_roles: dict[str, str] = {"teacher": ""}

    def configure(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """Fill settings whose default depends on other settings (e.g. a per-mode weight); default: as is."""
        return cfg

    def check_sources(self, cfg: dict[str, Any], sources: dict[str, str]) -> None:
        """Refuse settings that exclude each other when the user set both (``sources``: key -> the layer that set
        it; ``base``/``preset`` are defaults); default: nothing to refuse."""

    def build_student(self, teacher: nn.Module, student: nn.Module | str | None, ctx: RecipeContext) -> nn.Module:
        from vitshrink.students import derive_student, resolve_student

        init = bool(ctx.cfg.get("init_from_teacher", True))
        if student is None:
            return derive_student(teacher, depth_ratio=float(ctx.cfg.get("student_depth_ratio", 0.5)), init=init)
        return resolve_student(student, teacher, init=init)

    def prepare(self, teacher: nn.Module, student: nn.Module, ctx: RecipeContext) -> nn.Module:
        return student

    def stand_in_teacher(self, role: str, loaded: dict[str, nn.Module]) -> nn.Module | None:
        """A teacher for ``role`` when its option holds no SPEC (``loaded``: the roles loaded so far); default none."""
        return None

    def source(self, student: nn.Module, ctx: RecipeContext):
        from vitshrink.data.sources import labelled_source

        return labelled_source(ctx.data.train, student, ctx.cfg, seed=ctx.seed, rank=ctx.rank,
                               world_size=ctx.world_size)

    def task(self, teachers: Any, student: nn.Module, cfg: dict[str, Any]) -> TrainingTask:
        raise NotImplementedError

    def finalize(self, student: nn.Module, cfg: dict[str, Any]) -> nn.Module:
        return student.eval()

    def report_notes(self, out_dir: Path | None) -> list[str]:
        """Warnings for the report (read from the run folder, so they survive ``--resume``); default none."""
        return []

    def report_fields(self, out_dir: Path | None) -> dict[str, Any]:
        """Extra report.json sections (read from the run folder, e.g. uvc's ``pruning``); default none."""
        return {}


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
