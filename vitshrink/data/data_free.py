"""The data-free training source: images synthesised from the teacher into the run folder, no real image.

``synthetic_training_data`` runs (or resumes) ``vitshrink.data.synthetic.synthesize`` into ``OUT/synthetic``
with the teacher's prior and returns the labelled splits a run trains on: the synthesised folder as the
training split and, for validation, the user's labelled ``--val-data`` or nothing at all (then no accuracy is
measured; the bundled images are never used in its place).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitshrink.data.folders import ImageSplit, LabelledData, _class_names, _open_reader, resolve_data
from vitshrink.data.synthesis_settings import SETTING_SETS
from vitshrink.errors import UserError

SYNTHETIC_DIR = "synthetic"


def synthetic_training_data(teacher: nn.Module, out_dir: str | os.PathLike, cfg: dict[str, Any], *,
                            data: Any = None, val_data: str | os.PathLike | None = None,
                            device: torch.device | str = "cpu", seed: int = 0, progress: bool = True) -> LabelledData:
    """Synthesise ``cfg["synth_num"]`` images from ``teacher`` into ``OUT/synthetic`` (resumable) and return
    them as the training split, validated on ``val_data`` (None: no validation split)."""
    from vitshrink.data.synthetic import synthesize
    from vitshrink.io import data_config

    if data is not None:
        raise UserError(f"--data-free and --data {data}: a data-free run trains on images synthesised from the "
                        "teacher; drop one of the two (--val-data still names labelled validation images)")
    num = cfg["synth_num"]
    if not isinstance(num, int) or isinstance(num, bool) or num < 1:
        raise UserError(f"--synth-num must be a positive integer, got {num!r}")
    settings = str(cfg.get("synth_settings") or "auto")
    if settings not in ("auto", *SETTING_SETS):
        raise UserError(f"setting synth_settings must be auto or one of {', '.join(SETTING_SETS)}, got {settings!r}")
    batch = cfg.get("batch_size")
    if isinstance(batch, int) and batch > num:  # checked now, not after the synthesis
        raise UserError(f"--batch-size {batch} is larger than the {num} images --synth-num makes: no full batch to "
                        "train on; lower --batch-size or raise --synth-num")
    folder = Path(out_dir) / SYNTHETIC_DIR
    result = synthesize(teacher, num, folder, prior=str(cfg["synth_prior"]),
                        iterations=_optional_int(cfg, "synth_iterations"),
                        batch_size=_optional_int(cfg, "synth_batch_size"), device=device, seed=seed,
                        progress=progress, settings=settings,
                        divergence_weight=_optional_float(cfg, "synth_divergence_weight"))
    synthetic = {"folder": str(folder), "images": num, "prior": result.prior, "settings": result.settings.name,
                 "iterations": result.settings.iterations, "batch_size": result.settings.batch_size,
                 "divergence_weight": result.settings.divergence_weight,
                 "images_per_s": result.images_per_s, "batches_made": result.batches_made,
                 "batches_resumed": result.batches_skipped, "teacher_agreement": result.target_agreement}
    in_chans = int(data_config(teacher)["input_size"][0])
    if val_data is not None:
        labelled = resolve_data(folder, val_data, in_chans=in_chans)
        labelled.description = f"{num} images synthesised from the teacher ({result.prior} prior; validation: " \
                               f"{val_data})"
        labelled.synthetic = synthetic
        return labelled
    reader = _open_reader(folder)
    train = ImageSplit(reader, img_mode="L" if in_chans == 1 else "RGB")
    return LabelledData(train, None, _class_names(reader),
                        f"{num} images synthesised from the teacher ({result.prior} prior; no validation set)",
                        synthetic=synthetic)


def _optional_int(cfg: dict[str, Any], key: str) -> int | None:
    """``cfg[key]`` as an int, None (absent or null: the chosen settings set's value) kept."""
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"setting {key} must be an integer or null, got {value!r}")
    return value


def _optional_float(cfg: dict[str, Any], key: str) -> float | None:
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"setting {key} must be a number or null, got {value!r}")
    return float(value)
