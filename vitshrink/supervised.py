"""Supervised training of a light teacher (``vitshrink train-teacher``): a fresh timm model trained on labels with
the distillation pipeline's own stages (settings, data, ``ce`` task and source, ``vitshrink.train`` loop with its
checkpoints and resume, ONNX export with parity), so a user can make e.g. the involution teacher co-advise needs
for their own classes.

The run folder holds ``model.safetensors`` (best epoch, loadable by every command), ``model.onnx``,
``report.json`` / ``report.md``, ``args.yaml``, ``summary.csv`` and ``last.pt``.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitshrink._atomic import atomic_write_text
from vitshrink.data import LabelledData
from vitshrink.errors import UserError
from vitshrink.io import create_model, data_config, set_data_config
from vitshrink.pipeline import (Run, _log, _progress, export_student, finalize_student, load_data, recipe_context,
                                resolve_run_settings, run_args, top1_on, train_student)
from vitshrink.train import init_distributed, load_checkpoint, select_device

# The pipeline's stages name their files for a student; a trained teacher is "the model".
_RENAMES = {"student.safetensors": "model.safetensors", "student.onnx": "model.onnx"}


@dataclass
class TeacherResult:
    model: nn.Module  # the best epoch's model (eval, CPU)
    out_dir: Path
    report: dict[str, Any]


def fresh_model(arch: str, *, num_classes: int, img_size: int | None = None, in_chans: int = 3,
                **kwargs: Any) -> nn.Module:
    """A randomly initialised timm model ``arch`` for ``num_classes`` (recorded for saving)."""
    extra = {"img_size": img_size} if img_size is not None and "vit" in arch else {}
    try:
        model = create_model(arch, num_classes=num_classes, in_chans=in_chans, **extra, **kwargs)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise UserError(f"ARCH {arch!r}: {exc}") from None
    if img_size is not None:
        set_data_config(model, input_size=(in_chans, img_size, img_size))
    return model


def train_teacher(arch: str, *, data: str | os.PathLike | LabelledData | None = None, val_data: str | os.PathLike | None = None,
                  out_dir: str | os.PathLike = "output/teacher", epochs: int | None = None,
                  batch_size: int | None = None, lr: float | None = None, img_size: int | None = None,
                  model_kwargs: dict[str, Any] | None = None, device: str = "auto", seed: int = 0,
                  resume: bool = False, config: str | Path | None = None, overrides: dict[str, Any] | None = None,
                  workers: int | None = None, progress: bool = True, val_split: float = 0.1) -> TeacherResult:
    """Train ``arch`` (a timm name, e.g. ``rednet_cifar26``) from scratch on ``data``'s labels; write ``out_dir``.

    Settings: the ``ce`` recipe's (recipes/base.yaml < recipes/ce.yaml < ``config`` < arguments < ``overrides``).
    """
    from vitshrink.data import resolve_data
    from vitshrink.io.record import check_kwargs
    from vitshrink.io.weights import require_timm_name
    from vitshrink.validate import MAX_IMG_SIZE, check_int

    # Before any work: a registered timm name (a hub id would reach the network), sizes in range.
    require_timm_name(arch, "ARCH (a timm model name; vitshrink does not download)")
    check_int(img_size, "--img-size", low=1, high=MAX_IMG_SIZE, optional=True)
    check_kwargs("model_kwargs", dict(model_kwargs or {}))
    ddp = init_distributed(device)
    try:
        flags = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "workers": workers}
        recipe, settings = resolve_run_settings("ce", config=config, flags=flags, overrides=overrides)
        run = Run(recipe, settings, Path(out_dir), select_device(device, ddp), ddp, seed=seed)
        run.amp = bool(run.cfg["amp"]) and run.device.type == "cuda"
        random.seed(seed + ddp.rank)
        np.random.seed(seed + ddp.rank)
        torch.manual_seed(seed + ddp.rank)
        probe = data if isinstance(data, LabelledData) else resolve_data(data, val_data, val_split=val_split,
                                                                          seed=seed)
        resume_state = load_checkpoint(run.out_dir / "last.pt") if resume else None
        if resume_state is not None:
            from vitshrink.io import model_from_record

            model = model_from_record(json.loads(resume_state["arch"]))
        else:
            model = fresh_model(arch, num_classes=probe.num_classes, img_size=img_size, **(model_kwargs or {}))
        model = model.to(run.device)
        labelled = load_data(probe, None, teacher=model, val_split=val_split, seed=seed)
        with _progress(progress and ddp.main) as bar:
            run.progress = bar
            run.log = lambda message: _log(bar, ddp, message)
            ctx = recipe_context(run, labelled, {})
            args = run_args(run, teacher=model, student=arch, data=data, labelled=labelled, val_data=val_data,
                            device_name=device)
            args["command"] = "train-teacher"
            trained = train_student(run, ctx, model, labelled, resume_state, args)
            if not ddp.main:
                return TeacherResult(model, run.out_dir, {})
            final = finalize_student(run, model)
            onnx = export_student(run, final, labelled)
            top1 = top1_on(run, final.to(run.device), labelled)
        for old, new in _RENAMES.items():
            os.replace(run.out_dir / old, run.out_dir / new)
        report = teacher_report(arch, final.cpu(), top1, trained, onnx.as_dict(), labelled.description, run.cfg)
        write_teacher_report(report, run.out_dir)
        return TeacherResult(final.cpu(), run.out_dir, report)
    finally:
        ddp.close()


def teacher_report(arch: str, model: nn.Module, top1: float, trained: Any, onnx: dict[str, Any], data: str,
                   cfg: dict[str, Any]) -> dict[str, Any]:
    from vitshrink.measure import count_flops, count_params
    from vitshrink.report import SELECTIONS

    flops = count_flops(model, data_config(model)["input_size"])
    return {"command": "train-teacher", "arch": arch, "data": data, "epochs": cfg["epochs"],
            "best_epoch": trained.best_epoch, "model_selection": SELECTIONS[cfg.get("select_epoch", "last")],
            "train_seconds": trained.seconds, "top1": top1,
            "params": count_params(model), "gmacs": flops.gmacs, "input_size": list(data_config(model)["input_size"]),
            "onnx": onnx}


def write_teacher_report(report: dict[str, Any], out_dir: Path) -> None:
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2, default=str))
    lines = [f"# train-teacher: {report['arch']}", "", f"- data: {report['data']}",
             f"- epochs: {report['epochs']} (model from epoch {report['best_epoch']}: "
             f"{report.get('model_selection', 'best validation top-1')}), {report['train_seconds']:.0f} s",
             f"- top-1 (validation): {100 * report['top1']:.2f}%",
             f"- params: {report['params']:,}, GMACs: {report['gmacs']:.3f}",
             "- files: model.safetensors, model.onnx (parity-checked), args.yaml, summary.csv, last.pt"]
    atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")
