"""Data-free synthesis: optimise images from noise until the teacher sees its target classes in them.

``synthesize(teacher, num, out_dir)`` writes an ImageFolder of PNGs (class folder = target class) plus
``manifest.csv`` (file, target, teacher_top1, confidence), usable as ``--data`` by every recipe. Each batch of
images is optimised with (DeepInversion, Yin et al. CVPR 2020; PSAQ-ViT, Li et al. ECCV 2022; DearKD, Chen et al.
CVPR 2022):

    CE(teacher(jitter(flip(x))), target) + w_prior * prior + w_tv_l1 * TV_l1 + w_tv_l2 * TV_l2 + w_l2 * ||x||
    + w_tv_range * |TV_l2 - target TV| + w_div * intra_divergence(teacher embedding, target)

where the prior is BatchNorm statistics (BN teachers) or patch-similarity entropy (ViT teachers), see
``vitshrink.distill.priors``. The weights, lr, schedule, jitter stages and which iterate is kept come from an
official script's settings chosen from the teacher (``vitshrink.data.synthesis_settings``). Work is resumable
batch by batch: a finished batch (its images and its part of the manifest, written atomically) is never redone,
and every batch's noise and jitter come from its own seed, so a resumed run writes the same images an
uninterrupted one would.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitshrink._atomic import atomic_path, atomic_write_text
from vitshrink.data.synthesis_settings import SynthesisSettings, settings_for, with_overrides
from vitshrink.distill.priors import choose_prior, image_l2, intra_divergence_loss, make_prior, total_variation_l1, \
    total_variation_l2, total_variation_range
from vitshrink.errors import UserError
from vitshrink.io import record_of
from vitshrink.guard import LOCK_NAME
from vitshrink.validate import check_output_dir

SETTINGS_FILE = "synthesis.json"
MANIFEST = "manifest.csv"
PROGRESS_DIR = ".progress"  # per-batch manifest parts; no images, so ImageFolder readers skip it
MANIFEST_FIELDS = ("file", "target", "teacher_top1", "confidence")


@dataclass
class SynthesisResult:
    out_dir: Path
    num: int
    prior: str
    batches_made: int
    batches_skipped: int
    seconds: float
    images_per_s: float | None  # over the images made in this call
    target_agreement: float  # share of all images the teacher classifies as their target
    settings: SynthesisSettings  # the set used (its ``name``: which official set) with any overrides


def class_folder_names(teacher: nn.Module, num_classes: int) -> list[str]:
    """Class folder names: the teacher's recorded names when they are as many as its outputs and already in
    sorted order (ImageFolder numbers classes by sorted folder name), else zero-padded indices."""
    record = record_of(teacher)
    names = record.class_names if record is not None else None
    if names and len(names) == num_classes and list(names) == sorted(names) and len(set(names)) == num_classes \
            and all(_plain_folder_name(n) for n in names):
        return [str(n) for n in names]
    width = max(3, len(str(num_classes - 1)))
    return [f"{i:0{width}d}" for i in range(num_classes)]


def _plain_folder_name(name: Any) -> bool:
    """A recorded class name usable as one folder of OUT (records are files the user can edit: '../x' is not)."""
    from vitshrink.validate import plain_name

    try:
        return not str(name).startswith(".") and plain_name(str(name), "class name") == str(name)
    except UserError:
        return False


def _num_classes(teacher: nn.Module, input_size: Sequence[int], device: torch.device) -> int:
    count = getattr(teacher, "num_classes", None)
    if isinstance(count, int) and count > 0:
        return count
    with torch.no_grad():
        return int(teacher(torch.zeros(1, *input_size, device=device)).shape[1])


def _teacher_fingerprint(teacher: nn.Module) -> dict[str, Any]:
    params = [p.detach() for p in teacher.parameters()]
    # Summed on the CPU in float64 and rounded, so a resume on another device recognises the same teacher.
    checksum = sum(p.cpu().double().sum().item() for p in params)
    return {"class": type(teacher).__name__, "params": sum(p.numel() for p in params), "checksum": round(checksum, 6)}


def _prepare_out_dir(out_dir: Path, record: dict[str, Any]) -> None:
    """Create ``out_dir`` or check that it holds the same synthesis (resume); refuse anything else."""
    settings_path = out_dir / SETTINGS_FILE
    check_output_dir(out_dir)
    if settings_path.exists():
        try:
            old = json.loads(settings_path.read_text())
            changed = [key for key in record if old.get(key) != record[key]]
        except (OSError, ValueError, AttributeError, RecursionError) as exc:
            raise UserError(f"{settings_path}: not a readable synthesis record ({type(exc).__name__}); delete the "
                            "folder to start over or choose another --out") from None
        if changed:
            raise UserError(f"{out_dir}: holds a synthesis with other settings ({', '.join(changed)} differ); "
                            "resume with the same settings or choose another --out")
        return
    if out_dir.exists() and any(p.name != LOCK_NAME for p in out_dir.iterdir()):
        raise UserError(f"{out_dir}: exists and is not a synthesis folder (no {SETTINGS_FILE}); choose an empty "
                        "or new --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(settings_path, json.dumps(record, indent=2))


def _lr_at(settings: SynthesisSettings, step: int, iterations: int) -> float:
    """The lr at ``step`` of a stage of ``iterations`` steps (DeepInversion utils.lr_cosine_policy, or constant)."""
    if settings.lr_schedule == "constant":
        return settings.lr
    warmup = max(1, min(settings.warmup_iterations, iterations // 5))
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, iterations - warmup))) * settings.lr


class BestIterate:
    """DeepInversion's best-image bookkeeping (NVlabs/DeepInversion deepinversion.py, ``get_images``): after each
    step and clip, ``if best_cost > loss.item() or iteration == 1: best_inputs = inputs.data.clone();
    best_cost = loss.item()``, with ``best_cost`` starting at 1e4. As there, the cost is the whole batch's total
    loss from the forward pass before the step, and the images kept are those after it."""

    def __init__(self) -> None:
        self.cost, self.iteration, self.images = 1e4, 0, None

    def update(self, loss: float, images: torch.Tensor) -> None:
        self.iteration += 1
        if self.cost > loss or self.iteration == 1:
            self.images, self.cost = images.detach().clone(), loss


def _classifier_input_hook(teacher: nn.Module, store: dict[str, torch.Tensor]):
    """Record the classifier's input (the teacher's embedding) for the intra-divergence loss; None when the
    teacher has no separate classifier module (the loss then uses the logits)."""
    head = teacher.get_classifier() if hasattr(teacher, "get_classifier") else None
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
        return None
    return head.register_forward_pre_hook(lambda module, inputs: store.__setitem__("embedding", inputs[0]))


def _jitter(images: torch.Tensor, limit: int, settings: SynthesisSettings, rng: random.Random) -> torch.Tensor:
    """Random roll by up to ``limit`` pixels and, with ``settings.flip``, a horizontal flip with p = 0.5, drawing
    from ``rng`` in the official order (offsets, then the flip)."""
    if settings.jitter_same_offset:
        offset = rng.randint(-limit, limit)
        shifts = (offset, offset)
    else:
        shifts = (rng.randint(-limit, limit), rng.randint(-limit, limit))
    shifted = torch.roll(images, shifts=shifts, dims=(2, 3))
    if settings.flip and rng.random() > 0.5:
        shifted = torch.flip(shifted, dims=(3,))
    return shifted


def _batch_loss(logits: torch.Tensor, shifted: torch.Tensor, targets: torch.Tensor, prior, store: dict,
                settings: SynthesisSettings, tv_target: float | None) -> torch.Tensor:
    """The total loss of one step (see the module doc); terms with weight 0 are skipped."""
    loss = settings.ce_weight * F.cross_entropy(logits.float(), targets)
    if prior is not None:
        weight = settings.bn_weight if hasattr(prior, "first_multiplier") else settings.patch_sim_weight
        loss = loss + weight * prior.loss()
    if settings.tv_l1_weight:
        loss = loss + settings.tv_l1_weight * total_variation_l1(shifted)
    if settings.tv_l2_weight:
        loss = loss + settings.tv_l2_weight * total_variation_l2(shifted)
    if settings.l2_weight:
        loss = loss + settings.l2_weight * image_l2(shifted)
    if tv_target is not None:
        loss = loss + settings.tv_range_weight * total_variation_range(shifted, tv_target)
    if settings.divergence_weight:
        embedding = store.pop("embedding", logits)
        loss = loss + settings.divergence_weight * intra_divergence_loss(embedding, targets,
                                                                         margin=settings.divergence_margin)
    return loss


def optimise_batch(teacher: nn.Module, prior, targets: torch.Tensor, *, input_size: Sequence[int],
                   mean: torch.Tensor, std: torch.Tensor, settings: SynthesisSettings, seed: int,
                   on_step=None) -> torch.Tensor:
    """Optimise one batch of normalised images from Gaussian noise toward ``targets`` for ``settings.iterations``
    steps (split over the jitter stages); returns the kept images (``settings.keep``: best or last) in [0, 1].

    ``prior`` is an entered ``BNStatisticsPrior`` / ``PatchSimilarityPrior`` (or None), read after each forward.
    """
    device = targets.device
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    images = torch.randn((len(targets), *input_size), generator=generator).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([images], lr=settings.lr, betas=settings.betas, eps=1e-8)
    low, high = (0 - mean) / std, (1 - mean) / std  # the valid pixel range, normalised
    tv_target = settings.tv_range_target(images.numel(), rng.random()) if settings.tv_range_weight else None
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    store: dict[str, torch.Tensor] = {}
    handle = _classifier_input_hook(teacher, store) if settings.divergence_weight else None
    best = BestIterate()
    try:
        for fraction, count in zip(settings.jitter_stages, settings.stage_iterations()):
            limit = max(1, int(round(input_size[-1] * fraction)))
            for step in range(count):
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(settings, step, count)
                shifted = _jitter(images, limit, settings, rng)
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    logits = teacher(shifted)
                loss = _batch_loss(logits, shifted, targets, prior, store, settings, tv_target)
                loss.backward()
                optimizer.step()
                if settings.clip:  # keep pixels in range (DeepInversion's / PSAQ-ViT's clip)
                    with torch.no_grad():
                        images.data = torch.maximum(torch.minimum(images.data, high), low)
                if settings.keep == "best":
                    best.update(loss.item(), images.data)
                if on_step is not None:
                    on_step()
    finally:
        if handle is not None:
            handle.remove()
    kept = best.images if settings.keep == "best" and best.images is not None else images.detach()
    return (kept * std + mean).clamp(0, 1)


def _quantise(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 [B, H, W, C] exactly as written to PNG."""
    return (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def _write_batch(out_dir: Path, batch_index: int, first: int, pixels: torch.Tensor, targets: Sequence[int],
                 names: list[str], top1: Sequence[int], confidence: Sequence[float]) -> list[dict[str, Any]]:
    from PIL import Image

    rows = []
    for offset, array in enumerate(pixels.numpy()):
        target = int(targets[offset])
        relative = f"{names[target]}/{first + offset:07d}.png"
        image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
        with atomic_path(out_dir / relative) as tmp:
            image.save(tmp, format="PNG")
        rows.append({"file": relative, "target": target, "teacher_top1": int(top1[offset]),
                     "confidence": f"{float(confidence[offset]):.6f}"})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / PROGRESS_DIR / f"batch_{batch_index:06d}.csv", buffer.getvalue())
    return rows


def _read_part(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _progress_bar(enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=Console(stderr=True))


def _resolve_device(device: str | torch.device) -> torch.device:
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return torch.device(name)


def synthesize(teacher: nn.Module, num: int, out_dir: str | os.PathLike, *, prior: str = "auto",
               iterations: int | None = None, batch_size: int | None = None, device: str | torch.device = "auto",
               seed: int = 0, progress: bool = True, settings: str | SynthesisSettings = "auto",
               divergence_weight: float | None = None) -> SynthesisResult:
    """Synthesise ``num`` images balanced over the teacher's classes into ``out_dir`` (see the module doc).

    ``settings``: a ``SynthesisSettings`` or the name of an official set (``auto``: chosen from the teacher by
    ``settings_for``); ``iterations``, ``batch_size`` and ``divergence_weight`` override the set's when given.
    The teacher is put in eval mode on ``device``; its parameters are frozen while the images are optimised and
    made trainable again afterwards."""
    from vitshrink.validate import check_batch_size, check_finite_weights, check_int, check_seed

    check_int(num, "--num", low=1, high=10**8)
    if iterations is not None:
        check_int(iterations, "--iterations", low=1, high=10**7)
    if batch_size is not None:
        check_batch_size(batch_size)
    if divergence_weight is not None and not (math.isfinite(divergence_weight) and divergence_weight >= 0):
        raise UserError(f"--divergence-weight must be a finite number >= 0, got {divergence_weight}")
    check_seed(seed)
    check_finite_weights(teacher, "teacher")
    out_dir, device = Path(out_dir), _resolve_device(device)
    chosen = choose_prior(teacher, prior)
    if not isinstance(settings, SynthesisSettings):
        from vitshrink.io import data_config

        settings = settings_for(chosen, data_config(teacher)["input_size"], str(settings))
    settings = with_overrides(settings, iterations=iterations, batch_size=batch_size,
                              divergence_weight=divergence_weight)
    teacher = teacher.to(device).eval()
    trainable = [p for p in teacher.parameters() if p.requires_grad]
    try:
        for parameter in trainable:  # only the images are optimised
            parameter.requires_grad_(False)
        return _synthesize(teacher, num, out_dir, chosen, device, seed, progress, settings)
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)


def _synthesize(teacher: nn.Module, num: int, out_dir: Path, chosen: str, device: torch.device, seed: int,
                progress: bool, settings: SynthesisSettings) -> SynthesisResult:
    from vitshrink.io import data_config

    cfg = data_config(teacher)
    input_size = tuple(int(v) for v in cfg["input_size"])
    shape = (1, input_size[0], 1, 1)
    mean = torch.tensor(cfg["mean"], dtype=torch.float32, device=device).reshape(shape)
    std = torch.tensor(cfg["std"], dtype=torch.float32, device=device).reshape(shape)
    num_classes = _num_classes(teacher, input_size, device)
    names = class_folder_names(teacher, num_classes)
    iterations, batch_size = settings.iterations, settings.batch_size
    record = {"num": num, "prior": chosen, "iterations": iterations, "batch_size": batch_size, "seed": seed,
              "input_size": list(input_size), "class_names": names, "teacher": _teacher_fingerprint(teacher),
              "settings": json.loads(json.dumps(asdict(settings)))}
    _prepare_out_dir(out_dir, record)
    batches = [(b, b * batch_size, min(num, (b + 1) * batch_size)) for b in range(math.ceil(num / batch_size))]
    done = {b for b, _, _ in batches if (out_dir / PROGRESS_DIR / f"batch_{b:06d}.csv").exists()}
    todo = [batch for batch in batches if batch[0] not in done]
    made_images, started = 0, time.perf_counter()
    with _progress_bar(progress) as bar, make_prior(teacher, chosen, first_bn_multiplier=settings.first_bn_multiplier,
                                                    bandwidth=settings.kde_bandwidth) as hooks:
        task = bar.add_task(f"synthesize ({chosen}, {settings.name})", total=sum(e - s for _, s, e in todo),
                            rate="") if bar else None
        for b, first, end in todo:
            targets = torch.arange(first, end, device=device) % num_classes  # balanced: class = index mod classes
            step = _step_callback(bar, task, (end - first) / iterations, started)
            images = optimise_batch(teacher, hooks, targets, input_size=input_size, mean=mean, std=std,
                                    settings=settings, seed=seed * 1_000_003 + b, on_step=step)
            pixels = _quantise(images)
            top1, confidence = _teacher_view(teacher, pixels, mean, std, device)
            _write_batch(out_dir, b, first, pixels, targets.tolist(), names, top1, confidence)
            made_images += end - first
    rows = [row for b, _, _ in batches for row in _read_part(out_dir / PROGRESS_DIR / f"batch_{b:06d}.csv")]
    with atomic_path(out_dir / MANIFEST) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    seconds = time.perf_counter() - started
    agreement = sum(int(r["target"]) == int(r["teacher_top1"]) for r in rows) / len(rows)
    return SynthesisResult(out_dir, num, chosen, len(todo), len(done), seconds,
                           made_images / seconds if made_images else None, agreement, settings)


def _step_callback(bar, task, images_per_step: float, started: float):
    if bar is None:
        return None

    def step() -> None:
        bar.advance(task, images_per_step)
        elapsed = time.perf_counter() - started
        done = bar.tasks[task].completed
        bar.update(task, rate=f"{done / elapsed:.2f} img/s" if elapsed > 0 else "")
    return step


def _teacher_view(teacher: nn.Module, pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                  device: torch.device) -> tuple[list[int], list[float]]:
    """The teacher's top-1 and confidence on the images exactly as written (uint8)."""
    images = (pixels.permute(0, 3, 1, 2).float().to(device) / 255 - mean) / std
    with torch.no_grad():
        probs = teacher(images).float().softmax(dim=1)
    confidence, top1 = probs.max(dim=1)
    return top1.tolist(), confidence.tolist()
