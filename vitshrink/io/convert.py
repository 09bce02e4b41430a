"""``vitshrink convert``: any SPEC (with its loading options) -> a vitshrink safetensors with its record.

What the weights cannot tell (heads, norm placement, activation, LayerNorm eps, input normalisation) is decided
by behaviour on labelled images (``vitshrink.io.resolve``): ``--data``, or the bundled CIFAR-10 sample when the
model has CIFAR-10's classes. Without images, a file is never written from such guesses: the user states the
values or gives the model code (``--module``). The written file is loaded back and must give the same logits as
the converted model on real images (limit 1e-4), or nothing is written.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitshrink.errors import UserError
from vitshrink.io.record import data_config, record_of, save_model
from vitshrink.io.resolve import Resolution, labelled_sample, load_resolved, top1

PARITY_LIMIT = 1e-4


@dataclass
class ConversionResult:
    path: Path
    max_abs_diff: float  # written file vs converted model, on real images
    n_parity_images: int
    top1: float | None = None  # on the --data sample
    n_eval_images: int = 0
    resolution: Resolution | None = None  # what the images decided, with the table of candidates
    notes: list[str] = field(default_factory=list)


def convert(spec: str | os.PathLike, output: str | os.PathLike, *, data: str | os.PathLike | None = None,
            module: str | None = None, module_args: str | None = None, **load_kwargs: Any) -> ConversionResult:
    """Load ``spec`` with ``load_kwargs`` (those of ``load_model``), decide what the weights leave open, check the
    result, and write ``output`` atomically."""
    output = Path(output)
    if output.suffix.lower() != ".safetensors":
        raise UserError(f"-o {output}: the converted model is a .safetensors file")
    if output.is_dir():
        raise UserError(f"-o {output}: is a directory")
    model, resolution = load_resolved(spec, load_kwargs, data, module=module, module_args=module_args,
                                      refuse_guesses=True)
    record = record_of(model)
    result_notes = list(record.notes)
    accuracy, n_eval = None, 0
    if resolution is not None:
        accuracy, n_eval = resolution.top1, resolution.n_images
    elif data is not None:
        raw, targets, class_names, _ = labelled_sample(model, data)
        cfg = data_config(model)
        accuracy, n_eval = top1(model, raw, targets, tuple(cfg["mean"]), tuple(cfg["std"])), len(targets)
        if record.class_names is None and class_names and len(class_names) == getattr(model, "num_classes", None):
            record.class_names = list(class_names)
    sample = _parity_images(model, data)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Staged beside the output (same filesystem), so the final rename is atomic.
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as scratch:
        staged = save_model(model, Path(scratch) / "model.safetensors",
                            provenance={"converted_from": str(spec)})
        from vitshrink.io.spec import load_model

        reloaded = load_model(staged)
        with torch.no_grad():
            diff = (_logits(reloaded, sample) - _logits(model, sample)).abs().max().item()
        if not diff <= PARITY_LIMIT:
            raise UserError(f"{spec}: the converted file gives logits {diff:.2e} away from the loaded model on "
                            f"{len(sample)} real images (limit {PARITY_LIMIT:g}); nothing written")
        os.replace(staged, output)
    return ConversionResult(output, diff, len(sample), accuracy, n_eval, resolution, result_notes)


def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = model.eval()(images)
    return sum(out) / len(out) if isinstance(out, (tuple, list)) else out


def _parity_images(model: nn.Module, data: str | os.PathLike | None) -> torch.Tensor:
    from vitshrink.data import sample_images

    return sample_images(data_config(model), data, n=16)
