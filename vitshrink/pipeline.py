"""The distillation pipeline: settings -> teachers -> student -> prepare -> train -> finalize -> export -> measure
-> report. Each stage is a function of this module (callable from a notebook); :func:`distill` runs them all.

The loop itself (``vitshrink.train.train``) only trains; recipes (``vitshrink.recipes``) supply the student,
the training source and the task; teachers are frozen live models (``vitshrink.distill.teachers``).
"""
from __future__ import annotations

import dataclasses
import contextlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DistributedSampler, Subset

import vitshrink
from vitshrink._atomic import atomic_write_text
from vitshrink.config import Settings, resolve_settings
from vitshrink.data import LabelledData, make_loader, resolve_data
from vitshrink.data.sources import eval_transform, train_transform, with_transform
from vitshrink.distill.teachers import Teachers
from vitshrink.errors import UserError
from vitshrink.io import architecture_record, data_config, model_from_record, record_of, save_model
from vitshrink.recipes.base import Recipe, RecipeContext, get_recipe
from vitshrink.train import (Checkpointing, Dist, Evaluation, Schedule, TrainEnv, TrainResult, init_distributed,
                             load_checkpoint, select_device, train)
from vitshrink.train.checkpoint import (check_resume, data_fingerprint, normalisation_identity, student_identity,
                                        weights_fingerprint)
from vitshrink.train.mixup import check_mixup_allowed, mixup_from_settings
from vitshrink.validate import check_run_options
# The stages after training (export, measure, report) live in run_outputs; re-exported for callers.
from vitshrink.run_outputs import data_notes, export_student, measure_models, top1_on, write_run_report  # noqa: E402,F401

BUNDLED_TEACHER = Path(vitshrink.__file__).parent / "assets" / "teacher_vit_cifar10.safetensors"


@dataclass
class DistillResult:
    student: nn.Module  # the finalized best student (eval mode, CPU)
    out_dir: Path
    report: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)


@dataclass
class Run:
    """What the stages of one run share."""

    recipe: Recipe
    settings: Settings
    out_dir: Path
    device: torch.device
    ddp: Dist
    seed: int = 0
    amp: bool = False
    compile: bool = False
    progress: Any = None
    log: Callable[[str], None] = print
    logit_caches: dict[str, str] = field(default_factory=dict)  # role -> cache folder (vitshrink cache-logits)
    identity: dict[str, Any] | None = None  # recorded in last.pt; --resume must match it

    @property
    def cfg(self) -> dict[str, Any]:
        return self.settings.values


# ------------------------------------------------------------------------------------------------ stages
def resolve_run_settings(recipe_name: str, *, config: str | Path | None = None, flags: dict[str, Any] | None = None,
                         overrides: dict[str, Any] | None = None) -> tuple[Recipe, Settings]:
    """The recipe and its merged settings (base < preset < --config < flags < --set), after ``configure``."""
    recipe = get_recipe(recipe_name)
    settings = resolve_settings(recipe_name, config, flags, overrides)
    recipe.check_sources(settings.values, settings.sources)
    configured = recipe.configure(dict(settings.values))
    for key, value in configured.items():
        if settings.values.get(key) != value or key not in settings.values:
            settings.set(key, value, f"recipe {recipe_name} (configure)")
    return recipe, settings


def load_bundled_teacher() -> nn.Module:
    from vitshrink.io import load_model

    if not BUNDLED_TEACHER.exists():
        raise UserError(f"no TEACHER given and the bundled teacher {BUNDLED_TEACHER.name} is not installed; "
                        "pass a TEACHER (timm name, .safetensors, .pt/.pth/.th or HF directory)")
    return load_model(BUNDLED_TEACHER)


def load_teachers(recipe: Recipe, teacher: nn.Module | None, cfg: dict[str, Any]) -> dict[str, nn.Module]:
    """Role -> teacher model for every role the recipe declares (``""``: the user's TEACHER, else the SPEC in
    that recipe option, loaded with ``vitshrink.io.load_model``)."""
    from vitshrink.io import load_model

    models: dict[str, nn.Module] = {}
    for role, option in recipe.teacher_roles.items():
        if not option:
            models[role] = teacher if teacher is not None else load_bundled_teacher()
            continue
        spec = cfg.get(option)
        if not spec and (stand_in := recipe.stand_in_teacher(role, models)) is not None:
            models[role] = stand_in
            continue
        if not spec:
            raise UserError(f"--{option.replace('_', '-')}: recipe {recipe.name} needs a SPEC for its {role} teacher")
        try:
            models[role] = load_model(str(spec))
        except UserError as exc:  # name the flag: the same file may be given to several roles
            raise UserError(f"--{option.replace('_', '-')} {spec}: {exc}") from None
    return models


def load_data(data: str | os.PathLike | LabelledData | None, val_data: str | os.PathLike | None, *,
              teacher: nn.Module, val_split: float, seed: int) -> LabelledData:
    """The labelled splits (bundled CIFAR-10 when ``data`` is None), checked against the teacher's classes."""
    from timm.utils import unwrap_model

    labelled = data if isinstance(data, LabelledData) else resolve_data(
        data, val_data, val_split=val_split, seed=seed, in_chans=int(data_config(teacher)["input_size"][0]))
    if labelled.train is None:
        raise UserError(f"--data {data}: no training images")
    t_classes = getattr(unwrap_model(teacher), "num_classes", None)
    if t_classes is not None and t_classes != labelled.num_classes:
        raise UserError(f"teacher has {t_classes} classes but --data {data or 'bundled'} has "
                        f"{labelled.num_classes}; distil on the data the teacher was trained for")
    record = record_of(teacher)
    return labelled.matched_to(record.class_names if record is not None else None, f"--data {data or 'bundled'}")


def load_training_data(run: Run, data: Any, val_data: Any, *, teacher: nn.Module, val_split: float,
                       show_progress: bool) -> LabelledData:
    """The data stage: labelled images (``data``; bundled CIFAR-10 when None) or, with the ``data_free``
    setting, images synthesised from ``teacher`` into ``OUT/synthetic`` (``vitshrink.data.data_free``)."""
    if not run.cfg.get("data_free"):
        return load_data(data, val_data, teacher=teacher, val_split=val_split, seed=run.seed)
    from vitshrink.data.data_free import synthetic_training_data

    if run.ddp.world_size > 1:
        raise UserError("--data-free: synthesise first (vitshrink synthesize TEACHER --out DIR), then distil "
                        "with --data DIR on several processes")
    return synthetic_training_data(teacher, run.out_dir, run.cfg, data=data, val_data=val_data, device=run.device,
                                   seed=run.seed, progress=show_progress)


def freeze(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def recipe_context(run: Run, labelled: LabelledData, teachers: dict[str, nn.Module]) -> RecipeContext:
    """What the recipe's student / prepare / source stages may use."""

    def train_loader_for(model: nn.Module, batch_size: int | None = None):
        split = with_transform(labelled.train, train_transform(model, run.cfg))
        sampler = DistributedSampler(split, num_replicas=run.ddp.world_size, rank=run.ddp.rank, shuffle=True,
                                     seed=run.seed)
        return make_loader(split, batch_size or run.cfg["batch_size"], sampler=sampler, workers=run.cfg["workers"],
                           drop_last=True, seed=run.seed)

    return RecipeContext(cfg=run.cfg, device=run.device, data=labelled, train_loader=train_loader_for,
                         progress=run.progress, rank=run.ddp.rank, world_size=run.ddp.world_size, out_dir=run.out_dir,
                         log=run.log, teachers=teachers, seed=run.seed,
                         evaluate=lambda model: top1_on(run, model, labelled))


def build_student(run: Run, ctx: RecipeContext, student: nn.Module | str | None,
                  resume_state: dict[str, Any] | None) -> nn.Module:
    """The recipe's student, prepared (e.g. searched and sliced); on resume, rebuilt from ``last.pt``'s record."""
    from timm.utils import unwrap_model

    teacher = ctx.teachers[Teachers.MAIN]
    if resume_state is not None:
        # The student's architecture may come from a search (prepare): rebuild it from the record.
        model = model_from_record(json.loads(resume_state["arch"]))
    else:
        model = run.recipe.build_student(teacher, student, ctx).to(run.device)
        model = run.recipe.prepare(teacher, model, ctx)
    model = model.to(run.device)
    t_classes = getattr(unwrap_model(teacher), "num_classes", None)
    s_classes = getattr(model, "num_classes", None)
    if t_classes is not None and s_classes is not None and s_classes != t_classes:
        raise UserError(f"--student has {s_classes} classes, the teacher {t_classes}")
    if record_of(model) is None:
        raise UserError("the student must be built by vitshrink.io.create_model (its architecture is "
                        "recorded for saving and resuming)")
    return model


def validation_loader(run: Run, labelled: LabelledData, model: nn.Module):
    """This rank's shard of the validation split, in ``model``'s evaluation transform (None: no split)."""
    if labelled.val is None:
        return None
    val = with_transform(labelled.val, eval_transform(model))
    shard = Subset(val, range(run.ddp.rank, len(val), run.ddp.world_size))
    return make_loader(shard, run.cfg["eval_batch_size"], workers=run.cfg["workers"])


def run_args(run: Run, *, teacher: nn.Module, student: nn.Module | str | None, data: Any, labelled: LabelledData,
             val_data: Any, device_name: str) -> dict[str, Any]:
    """``args.yaml``: what was run, every merged setting and the layer each came from."""
    return {"recipe": run.recipe.name, "teacher": describe_model(teacher), "student": _describe_student(student),
            "data": str(data) if not isinstance(data, LabelledData) else labelled.description,
            "val_data": None if val_data is None else str(val_data), "seed": run.seed, "device": device_name,
            "compile": run.compile, "world_size": run.ddp.world_size, "vitshrink_version": vitshrink.__version__,
            "config": run.cfg, "sources": run.settings.sources}


def train_student(run: Run, ctx: RecipeContext, model: nn.Module, labelled: LabelledData,
                  resume_state: dict[str, Any] | None, args: dict[str, Any]) -> TrainResult:
    """Task, source, schedule and checkpointing for ``model``; then ``vitshrink.train.train``."""
    cfg = run.cfg
    arch_json = json.dumps(architecture_record(model, class_names=labelled.class_names))
    teachers = cached_teachers(run, ctx, model, labelled, args)
    task = run.recipe.task(teachers, model, cfg).to(run.device)
    mixing = mixup_from_settings(cfg, num_classes=labelled.num_classes, seed=run.seed)
    if mixing is not None:
        check_mixup_allowed(task, cfg, recipe=run.recipe.name, uses_labels=run.recipe.uses_labels)
    source = run.recipe.source(model, ctx)
    schedule = Schedule.from_settings(cfg, amp=run.amp, compile=run.compile)
    steps_per_epoch = schedule.steps_per_epoch(source)
    evaluation = Evaluation(model, validation_loader(run, labelled, model),
                            select_best=cfg.get("select_epoch", "last") == "best")

    def save_best(epoch: int, top1: float) -> None:
        save_model(model, run.out_dir / "student.safetensors", class_names=labelled.class_names,
                   provenance={"recipe": run.recipe.name, "teacher": args["teacher"], "epoch": epoch, "top1": top1})

    checkpointing = Checkpointing(run.out_dir, int(cfg["checkpoint_steps"] or 0), arch_json, save_best, resume_state,
                                  identity=run.identity)
    if run.ddp.main:
        atomic_write_text(run.out_dir / "args.yaml", yaml.safe_dump(args, sort_keys=False))
        run.log(f"{run.recipe.name}: teacher {args['teacher']} -> student {json.loads(arch_json)['model']} "
                f"({sum(p.numel() for p in model.parameters()):,} params), {labelled.description}, "
                f"{cfg['epochs']} epochs x {steps_per_epoch} steps, batch {cfg['batch_size']} x "
                f"{run.ddp.world_size}, {run.device}{' bf16' if run.amp else ''}")
        if mixing is not None:
            run.log(f"{mixing.describe()}: the teacher sees the mixed images; no train accuracy is shown")
    env = TrainEnv(run.device, run.ddp, run.progress, run.log, uses_labels=run.recipe.uses_labels)
    return train(task, source, schedule, checkpointing, evaluation=evaluation, env=env, mixing=mixing)


FEATURE_RECIPES = ("probe", "dearkd")  # their teacher signal is features, which a logit cache does not hold


def check_logit_caches(run: Run) -> None:
    """Refuse ``--logit-cache`` for a recipe that reads teacher features, or for a role the recipe lacks."""
    if not run.logit_caches:
        return
    if getattr(run.recipe, "needs_teacher_features", run.recipe.name in FEATURE_RECIPES):
        raise UserError(f"--logit-cache: recipe {run.recipe.name} distils teacher features, which a logit cache "
                        f"does not hold; run it without --logit-cache")
    from vitshrink.data.logit_cache import check_replayable

    check_replayable(run.recipe.name, run.cfg)
    unknown = sorted(set(run.logit_caches) - set(run.recipe.teacher_roles))
    if unknown:
        raise UserError(f"--logit-cache {unknown[0]}=...: recipe {run.recipe.name} has no teacher role {unknown[0]!r} "
                        f"(roles: {', '.join(run.recipe.teacher_roles)})")


def cached_teachers(run: Run, ctx: RecipeContext, model: nn.Module, labelled: LabelledData,
                    args: dict[str, Any]) -> Teachers:
    """Live teachers, except the roles read from a logit cache (checked against this run's fingerprint; the
    fingerprint goes into ``args``)."""
    from vitshrink.data.logit_cache import CachedTeacher, cache_record, check_fingerprint, read_meta, run_fingerprint

    live = Teachers.live({r: m for r, m in ctx.teachers.items() if r not in run.logit_caches}, data_config(model))
    teachers = dict(live.items())
    for role, path in run.logit_caches.items():
        expected = run_fingerprint(ctx.teachers[role], labelled.train, data_config(model), run.cfg, seed=run.seed,
                                   topk=read_meta(path)["topk"])
        check_fingerprint(path, expected, epochs=int(run.cfg["epochs"]))
        teachers[role] = CachedTeacher(path)
        args.setdefault("logit_cache", {})[role] = cache_record(path)
    return Teachers(teachers)


def finalize_student(run: Run, model: nn.Module) -> nn.Module:
    """The best epoch's weights, through the recipe's ``finalize`` (the model to export), on the CPU."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(run.out_dir / "student.safetensors")))
    return run.recipe.finalize(model, run.cfg).cpu().eval()


def distill(
    teacher: nn.Module | None,
    recipe: str = "vanilla",
    *,
    student: nn.Module | str | None = None,
    data: str | os.PathLike | LabelledData | None = None,
    val_data: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = "output/distill",
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    device: str = "auto",
    amp: bool | None = None,
    resume: bool = False,
    seed: int = 0,
    config: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    workers: int | None = None,
    compile: bool = False,
    progress: bool = True,
    flops_target: float | None = None,
    val_split: float = 0.1,
    options: dict[str, Any] | None = None,
    logit_cache: dict[str, str] | None = None,
    data_free: bool | None = None,
    synth_num: int | None = None,
) -> DistillResult:
    """Distil ``teacher`` into a smaller student with ``recipe``; write the run folder; return the result.

    ``teacher=None`` uses the bundled ViT teacher. ``data`` is a path (ImageFolder dir or tar) or a
    ``LabelledData``; None means the bundled CIFAR-10 subset. Settings: ``recipes/base.yaml`` <
    ``recipes/RECIPE.yaml`` < ``config`` < the explicit arguments and ``options`` (any setting, as flags) <
    ``overrides`` (``--set``). ``flops_target`` is uvc's option of that name. ``logit_cache`` maps a teacher
    role (``"teacher"`` for TEACHER) to a ``cache-logits`` folder read instead of running that teacher in training
    (uvc's search still runs the live teacher; only post-training reads the cache). ``data_free`` (the setting of
    that name) trains on ``synth_num`` images synthesised from the teacher into ``out_dir/synthetic`` instead of
    ``data``; validation then needs ``val_data`` (without it no accuracy is measured).
    """
    check_run_options(seed=seed, val_split=val_split, flops_target=flops_target, workers=workers, epochs=epochs,
                      batch_size=batch_size, lr=lr, out_dir=out_dir)
    ddp = init_distributed(device)
    try:
        flags = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "workers": workers, "amp": amp,
                 "flops_target": flops_target, "data_free": data_free,
                 "synth_num": synth_num, **(options or {})}
        recipe_obj, settings = resolve_run_settings(recipe, config=config, flags=flags, overrides=overrides)
        run = Run(recipe_obj, settings, Path(out_dir), select_device(device, ddp), ddp, seed=seed, compile=compile,
                  logit_caches={role: str(path) for role, path in (logit_cache or {}).items()})
        check_logit_caches(run)
        run.amp = (bool(run.cfg["amp"]) if run.cfg["amp"] is not None else run.device.type == "cuda") \
            and run.device.type == "cuda"  # bf16 autocast on CPU is slower than fp32 there
        return run_pipeline(run, teacher, student=student, data=data, val_data=val_data, val_split=val_split,
                            resume=resume, device_name=device, show_progress=progress)
    finally:
        ddp.close()


def run_pipeline(run: Run, teacher: nn.Module | None, *, student: nn.Module | str | None, data: Any, val_data: Any,
                 val_split: float, resume: bool, device_name: str, show_progress: bool) -> DistillResult:
    """Every stage after the settings, in order."""
    teachers = load_teachers(run.recipe, teacher, run.cfg)
    for role, model in teachers.items():
        check_run_options(teacher=model, teacher_role=role)  # NaN weights: every number would be noise
    main_teacher = teachers[Teachers.MAIN]
    resume_state = load_checkpoint(run.out_dir / "last.pt") if resume else None
    rank_seed = run.seed + run.ddp.rank
    random.seed(rank_seed)
    np.random.seed(rank_seed)
    torch.manual_seed(rank_seed)
    labelled = load_training_data(run, data, val_data, teacher=main_teacher, val_split=val_split,
                                  show_progress=show_progress and run.ddp.main)
    run.identity = {"recipe": run.recipe.name, "data": data_fingerprint(labelled, [
        str(Path(p).resolve()) for p in (data, val_data) if isinstance(p, (str, os.PathLike))]), "seed": run.seed,
                    "batch_size": run.cfg["batch_size"], "teacher": weights_fingerprint(main_teacher),
                    "student": student_identity(student), "normalisation": normalisation_identity(main_teacher)}
    if resume_state is not None:
        check_resume(resume_state, run.identity, run.out_dir / "last.pt")
    # A cached role's teacher stays on the CPU (the student's default shape and the report read it);
    # uvc's search runs the live teacher on the device, so there it moves as usual.
    teachers = {role: freeze(model, torch.device("cpu") if role in run.logit_caches and run.recipe.name != "uvc"
                             else run.device)
                for role, model in teachers.items()}
    main_teacher = teachers[Teachers.MAIN]
    with _progress(show_progress and run.ddp.main) as bar:
        run.progress = bar
        run.log = lambda message: _log(bar, run.ddp, message)
        if labelled.note:
            run.log(f"note: {labelled.note}")
        ctx = recipe_context(run, labelled, teachers)
        model = build_student(run, ctx, student, resume_state)
        args = run_args(run, teacher=main_teacher, student=student, data=data, labelled=labelled,
                        val_data=val_data, device_name=device_name)
        trained = train_student(run, ctx, model, labelled, resume_state, args)
        paths = {name: run.out_dir / name for name in ("args.yaml", "summary.csv", "student.safetensors", "last.pt")}
        if not run.ddp.main:
            return DistillResult(model, run.out_dir, {}, paths)
        final = finalize_student(run, model)
        onnx = export_student(run, final, labelled)
        measured = measure_models(run, main_teacher, final, labelled)
        report = write_run_report(run, labelled, trained, onnx, measured)
        paths.update({name: run.out_dir / name for name in ("student.onnx", "report.json", "report.md")})
        return DistillResult(final.cpu(), run.out_dir, report, paths)


# ---------------------------------------------------------------------------------------------- helpers
def describe_model(model: nn.Module) -> str:
    """What the user typed for a model (its SPEC), else its timm name, else its class."""
    from timm.utils import unwrap_model

    record = record_of(unwrap_model(model))
    if record is None:
        return type(model).__name__
    return str(record.spec) if record.spec else record.name


def _describe_student(student: nn.Module | str | None) -> str | None:
    if student is None:
        return None
    return student if isinstance(student, str) else describe_model(student)


def _progress(enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class StatsColumn(ProgressColumn):
        # Loss / accuracy / lr of the training task; evaluation tasks (added by evaluate_loader) have none.
        def render(self, task) -> Text:
            return Text(task.fields.get("stats", ""))

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), StatsColumn(), console=Console(stderr=True))


def _log(progress, ddp: Dist, message: str) -> None:
    if not ddp.main:
        return
    if progress is not None:
        progress.console.print(message, markup=False, highlight=False)
    else:
        print(message, flush=True)
