"""Top-1/top-5 accuracy of a classifier on a labelled split, with a progress bar."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from vitshrink.data import ImageSplit, build_transform, make_loader
from vitshrink.data.folders import unsafe_member_count
from vitshrink.errors import UserError
from vitshrink.io import data_config
from vitshrink.validate import check_batch_size, check_finite_weights, check_outputs_finite, check_workers


@dataclass
class EvalResult:
    top1: float  # fraction in [0, 1]
    top5: float
    n_images: int
    n_skipped: int  # unreadable images, not counted in n_images
    loss: float  # mean cross-entropy

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _logits(output: Any) -> torch.Tensor:
    # Distilled ViTs return (cls, dist) in train mode; evaluation averages the two heads.
    if isinstance(output, (tuple, list)):
        return sum(output) / len(output)
    return output


@torch.no_grad()
def evaluate_loader(model: nn.Module, loader, *, device: str | torch.device = "cpu",
                    progress=None, description: str = "evaluate", amp: bool = False,
                    require_finite: bool = False) -> EvalResult:
    """Accuracy over every batch of ``loader`` (batches of ``(images, targets, n_skipped)``).

    ``progress`` is an optional ``rich.progress.Progress``; a task is added and advanced per batch.
    ``require_finite``: NaN/inf logits are a ``UserError`` (an accuracy from them would be meaningless).
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    correct1 = correct5 = seen = skipped = 0
    loss_sum = 0.0
    task = progress.add_task(description, total=len(loader), stats="") if progress is not None else None
    for images, targets, n_bad in loader:
        skipped += n_bad
        if len(targets):
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
                logits = _logits(model(images)).float()
            if require_finite and not torch.isfinite(logits).all():
                raise UserError(f"{description}: the model outputs NaN or infinite logits; its weights or "
                                "normalisation (--mean/--std) are broken")
            loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hits = top.eq(targets[:, None])
            correct1 += hits[:, 0].sum().item()
            correct5 += hits.any(dim=1).sum().item()
            seen += len(targets)
        if task is not None:
            progress.advance(task)
    if was_training:
        model.train()
    if seen == 0:
        return EvalResult(0.0, 0.0, 0, skipped, float("nan"))
    return EvalResult(correct1 / seen, correct5 / seen, seen, skipped, loss_sum / seen)


def align_classes(model: nn.Module, split: Any, what: str) -> Any:
    """``split`` with its labels matched to ``model``'s classes by name (``data.folders.match_classes``)."""
    from vitshrink.data.classes import match_classes
    from vitshrink.io import record_of

    if not hasattr(split, "remapped"):
        return split
    names = split.class_names if split.target_map is None else None
    if names is None:
        return split  # already aligned to another split's classes
    record = record_of(model)
    mapping = match_classes(names, record.class_names if record is not None else None,
                            getattr(model, "num_classes", None), f"{what} {getattr(split.reader, 'root', '')}".strip())
    return split if mapping is None else split.remapped(mapping)


def evaluate(model: nn.Module, dataset: ImageSplit, *, batch_size: int = 256, workers: int | None = None,
             device: str | torch.device = "cpu", progress=None) -> EvalResult:
    """Evaluate ``model`` on ``dataset`` using the model's own eval transform (timm's, from its data config).

    A model with NaN/inf weights, or whose logits are NaN/inf, is a ``UserError``.
    """
    from vitshrink.data.sources import with_transform

    batch_size = check_batch_size(batch_size)
    check_workers(workers)
    check_finite_weights(model, "evaluate")
    view = with_transform(dataset, build_transform(data_config(model), is_training=False))  # dataset untouched
    view = align_classes(model, view, "--data")
    model.to(device)
    first = next((item for item in (view[i] for i in range(min(len(view), 64))) if item is not None), None)
    if first is not None:
        check_outputs_finite(model, first[0][None], "evaluate")
    loader = make_loader(view, batch_size, shuffle=False, workers=workers)
    result = evaluate_loader(model, loader, device=device, progress=progress, require_finite=True)
    result.n_skipped += unsafe_member_count(dataset)  # tar members with unsafe names count as unreadable
    return result
