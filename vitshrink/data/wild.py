"""``select-wild``: pick the unlabelled images a teacher finds meaningful (Attention Probe, ICASSP 2022).

The pool (any folder tree of images, no labels) is streamed in batches through the teacher with its own
eval transform. Every readable image gets its scores appended to ``OUT/scores.csv`` as they are computed,
so a rerun on the same ``OUT`` continues where it stopped. After all images are scored, the best N by the
chosen criterion (smaller is better for every score) are marked ``selected`` (the CSV is rewritten
atomically) and, in copy/link mode, placed in ``OUT/<predicted class>/``: a pseudo-labelled ImageFolder
(that last stage: ``vitshrink.data.selection``; the pool walk and output names: ``vitshrink.data.pool``).

Scores (formulas and defaults: recipes/probe.yaml):
  probe_b<i>     cosine of the class token's attention over the patches at block i with uniform (head 0)
  probe          sum of the probe_b<i>
  confidence     cross-entropy of the teacher's logits against its own argmax
  energy         -logsumexp(logits) (Liu et al. 2020, energy-based OOD score; an addition to the paper)
  combined       0.05 * probe + 0.9 * confidence (the official weighting)
"""
from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vitshrink._atomic import NO_ROOM, atomic_path
from vitshrink.data.pool import IMAGE_EXTENSIONS, SCORES_NAME, check_out_dir, iter_pool, pool_notes, read_image
from vitshrink.data.selection import SelectionSummary, finish_selection, previous_class_dirs
from vitshrink.distill.attention_probe import ClassTokenAttention, check_probeable, uniform_cosine
from vitshrink.errors import UserError
from vitshrink.validate import check_batch_size, check_finite_weights, check_float, check_int, check_workers, contained

CRITERIA = ("combined", "probe", "confidence", "energy")
MODES = ("copy", "link", "list")
PROBE_WEIGHT = 0.05  # official --attnlier
CONFIDENCE_WEIGHT = 0.9  # official --outlier


# ---------------------------------------------------------------------------------------------- pool
class _PoolImages(IterableDataset):
    """Pool images not yet scored, decoded and transformed; each loader worker takes every W-th path."""

    def __init__(self, root: Path, done: set[str], transform, mode: str, exclude: Path | None):
        self.root, self.done, self.transform, self.mode, self.exclude = root, done, transform, mode, exclude

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        todo = (p for p in iter_pool(self.root, self.exclude) if p not in self.done)
        for index, rel in enumerate(todo):
            if index % workers != worker:
                continue
            img, reason = read_image(self.root / rel, self.mode)
            yield rel, (self.transform(img) if img is not None else None), reason


def _collate(items: list) -> tuple[list[str], torch.Tensor | None, list[tuple[str, str]]]:
    good = [(rel, x) for rel, x, _ in items if x is not None]
    bad = [(rel, reason) for rel, x, reason in items if x is None]
    images = torch.stack([x for _, x in good]) if good else None
    return [rel for rel, _ in good], images, bad


# ------------------------------------------------------------------------------------------- scoring
def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, (tuple, list)):  # distilled ViTs: average the heads
        return sum(output) / len(output)
    return output


@dataclass
class BatchScores:
    probe_blocks: dict[int, torch.Tensor]  # block -> (B,)
    confidence: torch.Tensor
    energy: torch.Tensor
    pred: torch.Tensor

    @property
    def probe(self) -> torch.Tensor | None:
        return sum(self.probe_blocks.values()) if self.probe_blocks else None

    @property
    def combined(self) -> torch.Tensor:
        probe = self.probe
        return CONFIDENCE_WEIGHT * self.confidence + (PROBE_WEIGHT * probe if probe is not None else 0.0)


@torch.inference_mode()
def score_batch(teacher: nn.Module, images: torch.Tensor, probe: ClassTokenAttention | None) -> BatchScores:
    """All scores of one batch (the teacher must already be inside ``probe``'s context)."""
    logits = _logits(teacher(images)).float()
    log_probs = logits.log_softmax(dim=1)
    confidence, pred = (-log_probs).min(dim=1)  # CE against the teacher's own argmax
    energy = -torch.logsumexp(logits, dim=1)
    blocks = {b: uniform_cosine(rows) for b, rows in probe.rows.items()} if probe is not None else {}
    return BatchScores(blocks, confidence, energy, pred)


# ---------------------------------------------------------------------------------------------- csv
def _header(blocks: Sequence[int]) -> list[str]:
    return ["path", "skipped", *(f"probe_b{b}" for b in blocks), "probe", "confidence", "energy", "combined",
            "pred", "pred_name", "selected"]


def _read_done(scores: Path, header: list[str], pool: Path) -> tuple[set[str], int]:
    """Paths already in ``scores`` (rewriting it without a torn last line); a UserError if made differently
    or if a row names a path outside the pool."""
    if not scores.exists():
        return set(), 0
    with scores.open(newline="") as handle:
        reader = csv.reader(handle)
        found = next(reader, None)
        if found is None:
            return set(), 0
        if found != header:
            raise UserError(f"{scores}: written with other columns ({','.join(found)}); use the same --blocks "
                            "and teacher, or another --out")
        rows = [row for row in reader if len(row) == len(header)]
    for row in rows:
        contained(pool, row[0], str(scores))
    with atomic_path(scores) as tmp, tmp.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(rows)
    return {row[0] for row in rows}, len(rows)


# ------------------------------------------------------------------------------------------- select
def select_wild(
    teacher: nn.Module,
    pool: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    num: int | None = None,
    fraction: float | None = None,
    mode: str = "copy",
    criterion: str = "combined",
    blocks: Sequence[int] | None = None,
    batch_size: int = 256,
    workers: int | None = None,
    device: str | torch.device = "cpu",
    progress: Any = True,
    balanced: bool = False,
) -> SelectionSummary:
    """Score every image of ``pool`` with ``teacher`` and select the best ``num`` (or ``fraction``).

    Resumable: images already in ``out_dir/scores.csv`` are not scored again. ``progress`` is True (a rich
    bar on stderr), False, or a ``rich.progress.Progress`` to add a task to. ``balanced``: take the best
    N // C of each of the C predicted classes first, the rest by global rank (``vitshrink.data.selection``).
    """
    pool, out_dir = Path(pool), Path(out_dir)
    _check_request(teacher, pool, out_dir, num=num, fraction=fraction, mode=mode, criterion=criterion,
                   batch_size=batch_size, workers=workers)
    probe_blocks = _probe_blocks(teacher, blocks, criterion)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores_path = out_dir / SCORES_NAME
    header = _header(probe_blocks)
    done, resumed = _read_done(scores_path, header, pool)

    counts: Counter = Counter()
    total = sum(1 for p in iter_pool(pool, out_dir, counts) if p not in done)
    if total + resumed == 0:
        raise UserError(f"--pool {pool}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    if fraction is not None and round(fraction * (total + resumed)) < 1:  # before scoring: nothing would be chosen
        raise UserError(f"--fraction {fraction:g} of the {total + resumed} pool images selects none; give a larger "
                        "--fraction or --num")
    if workers is None:
        workers = min(4, max(0, (os.cpu_count() or 1) - 1))
    _score_pool(teacher, pool, out_dir, done, header, probe_blocks, total=total, append=resumed > 0,
                batch_size=batch_size, workers=workers, device=torch.device(device), progress=progress)
    summary = finish_selection(pool, out_dir, scores_path, header, criterion, mode, num, fraction, probe_blocks,
                               resumed, counts["other"], balanced)
    summary.notes[:0] = pool_notes(counts)
    return summary


def _check_request(teacher: nn.Module, pool: Path, out_dir: Path, *, num: int | None, fraction: float | None,
                   mode: str, criterion: str, batch_size: int, workers: int | None) -> None:
    """Every argument of ``select_wild``, before any work (one UserError line naming the flag)."""
    if not pool.is_dir():
        raise UserError(f"--pool {pool}: not a directory")
    if (num is None) == (fraction is None):
        raise UserError("give exactly one of --num and --fraction")
    check_int(num, "--num", low=1, optional=True)
    check_float(fraction, "--fraction", low=0.0, high=1.0, low_open=True, optional=True)
    check_batch_size(batch_size)
    check_workers(workers)
    check_finite_weights(teacher, "--teacher")
    if criterion not in CRITERIA:
        raise UserError(f"--criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    check_out_dir(pool, out_dir)
    previous_class_dirs(out_dir)  # refuse a tampered selection.json before any work


def _probe_blocks(teacher: nn.Module, blocks: Sequence[int] | None, criterion: str) -> list[int]:
    """The blocks probed; none for a teacher without them when the criterion does not need them
    (confidence/energy work for any classifier)."""
    try:
        return check_probeable(teacher, blocks)
    except UserError:
        if criterion in ("combined", "probe") or blocks is not None:
            raise
        return []


def _score_pool(teacher: nn.Module, pool: Path, out_dir: Path, done: set[str], header: list[str],
                probe_blocks: list[int], *, total: int, append: bool, batch_size: int, workers: int,
                device: torch.device, progress: Any) -> None:
    """Stream the pool images not in ``done`` through the teacher and append their rows to ``scores.csv``, one
    flushed batch at a time (a stopped run keeps every finished batch); the teacher's mode is restored."""
    from vitshrink.data import build_transform
    from vitshrink.io import data_config, record_of

    cfg = data_config(teacher)
    img_mode = "L" if int(cfg["input_size"][0]) == 1 else "RGB"
    transform = build_transform(cfg, is_training=False)
    record = record_of(teacher)
    class_names = (record.class_names if record is not None else None) or None
    scores_path = out_dir / SCORES_NAME
    was_training = teacher.training
    teacher.eval().to(device)
    loader = DataLoader(_PoolImages(pool, done, transform, img_mode, out_dir), batch_size=batch_size,
                        num_workers=workers, collate_fn=_collate, pin_memory=device.type == "cuda")
    bar, task, own_bar = _progress(progress, total)
    probe_ctx = ClassTokenAttention(teacher, probe_blocks) if probe_blocks else None
    try:
        with scores_path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if not append and handle.tell() == 0:
                writer.writerow(header)
            if probe_ctx is not None:
                probe_ctx.__enter__()
            for rels, images, bad in loader:
                rows = [[rel, reason, *([""] * (len(header) - 2))] for rel, reason in bad]
                if images is not None:
                    rows += _score_rows(teacher, images.to(device, non_blocking=True), rels, probe_ctx,
                                        probe_blocks, class_names)
                writer.writerows(rows)
                handle.flush()
                if bar is not None:
                    bar.advance(task, len(rows))
    except BaseException as exc:
        if bar is not None:
            bar.remove_task(task)  # the error line alone, not a half-finished bar above it
        if isinstance(exc, OSError) and exc.errno in NO_ROOM:
            raise UserError(f"{scores_path}: cannot write ({exc.strerror}); rerun with the same --out when "
                            "there is room: the scores written so far are kept") from None
        raise
    finally:
        if probe_ctx is not None:
            probe_ctx.__exit__(None, None, None)
        if own_bar:
            bar.stop()
        teacher.train(was_training)


def _score_rows(teacher: nn.Module, images: torch.Tensor, rels: list[str], probe_ctx: ClassTokenAttention | None,
                probe_blocks: list[int], class_names: list[str] | None) -> list[list]:
    """The scores.csv rows of one batch of readable images (bf16 autocast on CUDA)."""
    device = images.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        s = score_batch(teacher, images, probe_ctx)
    if not (torch.isfinite(s.confidence).all() and torch.isfinite(s.energy).all()):
        raise UserError(f"--teacher outputs NaN or infinite logits on pool images (e.g. {rels[0]}); "
                        "check its weights and normalisation (--mean/--std)")
    columns = [*(s.probe_blocks[b] for b in probe_blocks)]
    probe = s.probe
    columns += [probe if probe is not None else torch.full_like(s.confidence, float("nan")),
                s.confidence, s.energy, s.combined]
    values = torch.stack(columns, dim=1).cpu().tolist()
    rows = []
    for rel, vals, pred in zip(rels, values, s.pred.cpu().tolist()):
        name = class_names[pred] if class_names and pred < len(class_names) else str(pred)
        rows.append([rel, "", *(f"{v:.6g}" for v in vals), pred, name, ""])
    return rows


def _progress(progress: Any, total: int):
    if progress is False or progress is None:
        return None, None, False
    if progress is True:
        from rich.console import Console
        from rich.progress import MofNCompleteColumn, Progress, TimeRemainingColumn

        bar = Progress(*Progress.get_default_columns()[:-1], MofNCompleteColumn(), TimeRemainingColumn(),
                       console=Console(stderr=True))
        bar.start()
        return bar, bar.add_task("score pool", total=total), True
    return progress, progress.add_task("score pool", total=total), False


