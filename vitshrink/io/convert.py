"""``vitshrink convert``: any SPEC (with its loading options) -> a vitshrink safetensors with its record.

The written file is loaded back and must give the same logits as the converted model on real images
(limit 1e-4), or nothing is written. With labelled data, the head count is checked too: no tensor
shape reveals it, and a wrong guess still runs, at a lower accuracy.
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
from vitshrink.io.spec import load_model

PARITY_LIMIT = 1e-4
HEAD_CHECK_IMAGES = 500
HEAD_WIDTHS = (16, 32, 64, 128)  # head widths tried against an assumed head count


@dataclass
class ConversionResult:
    path: Path
    max_abs_diff: float  # written file vs converted model, on real images
    n_parity_images: int
    top1: float | None = None  # on the --data sample
    n_eval_images: int = 0
    heads_top1: dict[int, float] = field(default_factory=dict)  # head count -> top-1, when the count was assumed
    notes: list[str] = field(default_factory=list)


def convert(spec: str | os.PathLike, output: str | os.PathLike, *, data: str | os.PathLike | None = None,
            **load_kwargs: Any) -> ConversionResult:
    """Load ``spec`` with ``load_kwargs`` (those of ``load_model``), check it, and write ``output`` atomically."""
    output = Path(output)
    if output.suffix.lower() != ".safetensors":
        raise UserError(f"-o {output}: the converted model is a .safetensors file")
    if output.is_dir():
        raise UserError(f"-o {output}: is a directory")
    model = load_model(spec, **load_kwargs)
    record = record_of(model)
    result_notes = list(record.notes)
    top1, n_eval, heads_top1 = None, 0, {}
    if data is not None:
        images, targets, class_names = _labelled_sample(model, data)
        top1, n_eval = _top1(model, images, targets), len(targets)
        if any(n.startswith("num_heads=") and "assumed" in n for n in record.notes):
            heads_top1 = _check_heads(model, spec, load_kwargs, images, targets, top1, data)
        num_classes = getattr(model, "num_classes", None)
        if record.class_names is None and class_names and len(class_names) == num_classes:
            record.class_names = list(class_names)
    sample = _parity_images(model, data)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Staged beside the output (same filesystem), so the final rename is atomic.
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as scratch:
        staged = save_model(model, Path(scratch) / "model.safetensors",
                            provenance={"converted_from": str(spec)})
        reloaded = load_model(staged)
        with torch.no_grad():
            diff = (_logits(reloaded, sample) - _logits(model, sample)).abs().max().item()
        if not diff <= PARITY_LIMIT:
            raise UserError(f"{spec}: the converted file gives logits {diff:.2e} away from the loaded model on "
                            f"{len(sample)} real images (limit {PARITY_LIMIT:g}); nothing written")
        os.replace(staged, output)
    return ConversionResult(output, diff, len(sample), top1, n_eval, heads_top1, result_notes)


def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = model.eval()(images)
    return sum(out) / len(out) if isinstance(out, (tuple, list)) else out


def _parity_images(model: nn.Module, data: str | os.PathLike | None) -> torch.Tensor:
    from vitshrink.data import sample_images

    return sample_images(data_config(model), data, n=16)


def _labelled_sample(model: nn.Module, data: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Up to ``HEAD_CHECK_IMAGES`` readable images spread over the classes of ``data``, with their labels."""
    from vitshrink.data import build_transform, resolve_eval_split
    from vitshrink.evaluation import align_classes

    cfg = data_config(model)
    split, _ = resolve_eval_split(data, in_chans=int(cfg["input_size"][0]))
    split = align_classes(model, split, "--data")  # by name; more classes than the model: refused
    split.transform = build_transform(cfg, is_training=False)
    stride = max(1, len(split) // HEAD_CHECK_IMAGES)
    images, targets = [], []
    for index in range(0, len(split), stride):
        item = split[index]
        if item is not None:
            images.append(item[0])
            targets.append(item[1])
        if len(images) == HEAD_CHECK_IMAGES:
            break
    if not images:
        raise UserError(f"--data {data}: no readable images")
    # timm's folder reader calls it class_to_idx, its tar reader class_name_to_idx.
    class_to_idx = (getattr(split.reader, "class_to_idx", None) or getattr(split.reader, "class_name_to_idx", None)
                    or {})
    names = sorted(class_to_idx, key=class_to_idx.get) if split.target_map is None else []
    return torch.stack(images), torch.tensor(targets), names


@torch.no_grad()
def _top1(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> float:
    hits = 0
    for start in range(0, len(images), 128):
        hits += (_logits(model, images[start:start + 128]).argmax(1) == targets[start:start + 128]).sum().item()
    return hits / len(images)


def _check_heads(model: nn.Module, spec: Any, load_kwargs: dict[str, Any], images: torch.Tensor,
                 targets: torch.Tensor, assumed_top1: float, data: Any) -> dict[int, float]:
    """Top-1 with other head counts; refuse when the assumed count is at chance level or clearly worse."""
    assumed = int(model.blocks[0].attn.num_heads)
    width = int(model.blocks[0].attn.qkv.weight.shape[0]) // 3
    candidates = sorted({width // w for w in HEAD_WIDTHS if width % w == 0} | {assumed})
    scores = {assumed: assumed_top1}
    for heads in candidates:
        if heads not in scores:
            scores[heads] = _top1(load_model(spec, **{**load_kwargs, "num_heads": heads}), images, targets)
    best = max(scores, key=scores.get)
    classes = max(2, len(set(targets.tolist())))
    table = ", ".join(f"{h}: {scores[h]:.3f}" for h in candidates)
    if assumed_top1 <= 1.5 / classes and scores[best] <= 1.5 / classes:
        raise UserError(f"{spec}: top-1 on {len(targets)} images of {data} is at chance level ({assumed_top1:.3f}, "
                        f"{classes} classes) with every head count tried ({table}); check --data's classes, "
                        f"--mean/--std and the layout; nothing written")
    if assumed_top1 <= 1.5 / classes or scores[best] - assumed_top1 >= 0.05:
        raise UserError(f"{spec}: top-1 on {len(targets)} images of {data} is {assumed_top1:.3f} with the assumed "
                        f"num_heads={assumed} but {scores[best]:.3f} with {best} (head counts tried: {table}); "
                        f"pass --num-heads {best}; nothing written")
    return scores
