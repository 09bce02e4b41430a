"""``select-wild``: pick the unlabelled images a teacher finds meaningful (Attention Probe, ICASSP 2022).

The pool (any folder tree of images, no labels) is streamed in batches through the teacher with its own
eval transform. Every readable image gets its scores appended to ``OUT/scores.csv`` as they are computed,
so a rerun on the same ``OUT`` continues where it stopped. After all images are scored, the best N by the
chosen criterion (smaller is better for every score) are marked ``selected`` (the CSV is rewritten
atomically) and, in copy/link mode, placed in ``OUT/<predicted class>/``: a pseudo-labelled ImageFolder.

Scores (formulas and defaults: recipes/probe.yaml):
  probe_b<i>     cosine of the class token's attention over the patches at block i with uniform (head 0)
  probe          sum of the probe_b<i>
  confidence     cross-entropy of the teacher's logits against its own argmax
  energy         -logsumexp(logits) (Liu et al. 2020, energy-based OOD score; an addition to the paper)
  combined       0.05 * probe + 0.9 * confidence (the official weighting)
"""
from __future__ import annotations

import csv
import heapq
import json
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vitshrink._atomic import NO_ROOM, atomic_path, atomic_write_text
from vitshrink.data.pool import (IMAGE_EXTENSIONS, SCORES_NAME, SELECTED_LIST_NAME, SUMMARY_NAME,  # noqa: F401
                                 check_out_dir, iter_pool, pool_notes, read_image)
from vitshrink.distill.attention_probe import ClassTokenAttention, check_probeable, uniform_cosine
from vitshrink.errors import UserError
from vitshrink.validate import (check_batch_size, check_finite_weights, check_float, check_int, check_workers, contained,
                                plain_name)

CRITERIA = ("combined", "probe", "confidence", "energy")
MODES = ("copy", "link", "list")
PROBE_WEIGHT = 0.05  # official --attnlier
CONFIDENCE_WEIGHT = 0.9  # official --outlier


@dataclass
class SelectionSummary:
    """What a ``select_wild`` run did. Counts cover the whole out dir, resumed runs included."""

    out_dir: Path
    scores_csv: Path
    criterion: str
    mode: str
    blocks: list[int]
    scored: int  # readable images with scores
    skipped: dict[str, int]  # unreadable images by reason
    resumed: int  # images (scored or skipped) already in scores.csv before this run
    selected: int
    class_histogram: dict[str, int]  # selected images per predicted class
    other_files: int = 0  # files without an image extension, ignored
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["out_dir"], data["scores_csv"] = str(self.out_dir), str(self.scores_csv)
        return data


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


def criterion_key(row: dict[str, str], criterion: str) -> float:
    """The value a criterion ranks by for one scores.csv row (smaller is better; NaN ranks last)."""
    value = float(row[criterion])
    return value if value == value else float("inf")


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


def _iter_rows(scores: Path) -> Iterator[dict[str, str]]:
    with scores.open(newline="") as handle:
        yield from csv.DictReader(handle)


def _safe_dir_name(name: str) -> str:
    cleaned = "".join("_" if ch in '/\\:*?"<>|' or ord(ch) < 32 else ch for ch in str(name)).strip()
    return cleaned.lstrip(".") or "_"


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
    N // C of each of the C predicted classes first, the rest by global rank (see ``_choose``).
    """
    from vitshrink.data import build_transform
    from vitshrink.io import data_config, record_of

    pool, out_dir = Path(pool), Path(out_dir)
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
    _previous_class_dirs(out_dir)  # refuse a tampered selection.json before any work
    needs_probe = criterion in ("combined", "probe")
    try:
        probe_blocks = check_probeable(teacher, blocks)
    except UserError:
        if needs_probe or blocks is not None:
            raise
        probe_blocks = []  # confidence/energy work for any classifier
    cfg = data_config(teacher)
    img_mode = "L" if int(cfg["input_size"][0]) == 1 else "RGB"
    transform = build_transform(cfg, is_training=False)
    record = record_of(teacher)
    class_names = (record.class_names if record is not None else None) or None

    out_dir.mkdir(parents=True, exist_ok=True)
    scores_path = out_dir / SCORES_NAME
    header = _header(probe_blocks)
    done, resumed = _read_done(scores_path, header, pool)

    counts: Counter = Counter()
    total = sum(1 for p in iter_pool(pool, out_dir, counts) if p not in done)
    if total + resumed == 0:
        raise UserError(f"--pool {pool}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")

    device = torch.device(device)
    was_training = teacher.training
    teacher.eval().to(device)
    if workers is None:
        workers = min(4, max(0, (os.cpu_count() or 1) - 1))
    loader = DataLoader(_PoolImages(pool, done, transform, img_mode, out_dir), batch_size=batch_size,
                        num_workers=workers, collate_fn=_collate, pin_memory=device.type == "cuda")
    bar, task, own_bar = _progress(progress, total)
    probe_ctx = ClassTokenAttention(teacher, probe_blocks) if probe_blocks else None
    try:
        with scores_path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if resumed == 0 and handle.tell() == 0:
                writer.writerow(header)
            if probe_ctx is not None:
                probe_ctx.__enter__()
            for rels, images, bad in loader:
                rows = [[rel, reason, *([""] * (len(header) - 2))] for rel, reason in bad]
                if images is not None:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                        s = score_batch(teacher, images.to(device, non_blocking=True), probe_ctx)
                    if not (torch.isfinite(s.confidence).all() and torch.isfinite(s.energy).all()):
                        raise UserError(f"--teacher outputs NaN or infinite logits on pool images (e.g. {rels[0]}); "
                                        "check its weights and normalisation (--mean/--std)")
                    columns = [*(s.probe_blocks[b] for b in probe_blocks)]
                    probe = s.probe
                    columns += [probe if probe is not None else torch.full_like(s.confidence, float("nan")),
                                s.confidence, s.energy, s.combined]
                    values = torch.stack(columns, dim=1).cpu().tolist()
                    preds = s.pred.cpu().tolist()
                    for rel, vals, pred in zip(rels, values, preds):
                        name = class_names[pred] if class_names and pred < len(class_names) else str(pred)
                        rows.append([rel, "", *(f"{v:.6g}" for v in vals), pred, name, ""])
                writer.writerows(rows)
                handle.flush()  # a stopped run keeps every finished batch
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

    summary = _finish(pool, out_dir, scores_path, header, criterion, mode, num, fraction, probe_blocks,
                      resumed, counts["other"], balanced)
    summary.notes[:0] = pool_notes(counts)
    return summary


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


def _finish(pool: Path, out_dir: Path, scores_path: Path, header: list[str], criterion: str, mode: str,
            num: int | None, fraction: float | None, blocks: list[int], resumed: int,
            other_files: int, balanced: bool = False) -> SelectionSummary:
    """Rank the scored rows, rewrite scores.csv with the selected flag, place the selected images."""
    skipped: Counter = Counter()
    scored = 0
    predicted: set[str] = set()
    for row in _iter_rows(scores_path):
        if row["skipped"]:
            skipped[row["skipped"]] += 1
        else:
            scored += 1
            predicted.add(row["pred"])
    n_select = min(scored, num if num is not None else round(fraction * scored))
    notes = []
    if num is not None and num > scored:
        notes.append(f"--num {num} is more than the {scored} readable images: selected all of them")
    chosen = _choose(scores_path, criterion, n_select, len(predicted) if balanced else 0)
    histogram: Counter = Counter()
    with atomic_path(scores_path) as tmp, tmp.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=header)
        writer.writeheader()
        for row in _iter_rows(scores_path):
            picked = row["path"] in chosen
            row["selected"] = "" if row["skipped"] else str(int(picked))
            if picked:
                histogram[row["pred_name"]] += 1
            writer.writerow(row)
    class_dirs = _place(pool, out_dir, scores_path, mode)
    if mode == "list":
        with atomic_path(out_dir / SELECTED_LIST_NAME) as tmp, tmp.open("w") as out:
            for row in _iter_rows(scores_path):
                if row["selected"] == "1":
                    out.write(f"{contained(pool, row['path'], str(scores_path)).resolve()}\n")
    summary = SelectionSummary(out_dir, scores_path, criterion, mode, blocks, scored, dict(sorted(skipped.items())),
                               resumed, len(chosen), dict(sorted(histogram.items())), other_files, notes)
    record = summary.as_dict() | {"pool": str(pool.resolve()), "num": num, "fraction": fraction, "balanced": balanced,
                                  "class_dirs": class_dirs}
    atomic_write_text(out_dir / SUMMARY_NAME, json.dumps(record, indent=2))
    return summary


def _choose(scores_path: Path, criterion: str, n_select: int, classes: int) -> set[str]:
    """Paths of the ``n_select`` best rows (smallest key; ties broken by path so reruns select the same images).

    ``classes`` > 0 (balanced): first the best ``n_select // classes`` of each predicted class, then the rest
    by global rank. Why: a global ranking by confidence favours the teacher's easiest classes (a 5-class CIFAR
    teacher's best 1000 of a 7500-image wild pool held 46 birds and 475 cars, benchmarks/select_wild.py), so a student distilled on it sees some
    classes hardly at all. Not in the paper (the official code selects globally; its --robust option instead
    reweights the KD loss by inverse class frequency). Memory: O(n_select) either way.
    """
    def rows() -> Iterator[tuple[float, str, str]]:
        return ((criterion_key(r, criterion), r["path"], r["pred"]) for r in _iter_rows(scores_path)
                if not r["skipped"])

    chosen: set[str] = set()
    quota = n_select // classes if classes else 0
    if quota:
        worst_first: dict[str, list] = {}  # per class, a max-heap (negated keys) of its best `quota` rows
        for key, path, pred in rows():
            heap = worst_first.setdefault(pred, [])
            item = (-key, _Reversed(path))
            if len(heap) < quota:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)
        chosen = {item[1].value for heap in worst_first.values() for item in heap}
    rest = n_select - len(chosen)
    if rest > 0:
        chosen |= {path for _, path, _ in heapq.nsmallest(rest, (r for r in rows() if r[1] not in chosen))}
    return chosen


class _Reversed:
    """Inverts a path's order inside a max-heap of negated keys, so ties keep the smallest paths."""

    __slots__ = ("value",)

    def __init__(self, value: str):
        self.value = value

    def __lt__(self, other: "_Reversed") -> bool:
        return self.value > other.value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Reversed) and self.value == other.value


def _previous_class_dirs(out_dir: Path) -> list[str]:
    """The class folders an earlier selection in ``out_dir`` made, each checked to be a plain folder of
    ``out_dir``: selection.json is a file the user can edit, and these folders are deleted."""
    summary = out_dir / SUMMARY_NAME
    if not summary.exists():
        return []
    try:
        record = json.loads(summary.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{summary}: not a readable selection record ({type(exc).__name__}); it says which "
                        "folders a rerun may replace: delete it with those folders, or use another --out") from None
    if not isinstance(record, dict):
        raise UserError(f"{summary}: not a selection record (a JSON object); delete it with the folders of "
                        "the previous selection, or use another --out")
    names = record.get("class_dirs", [])
    if not isinstance(names, list):
        raise UserError(f"{summary}: class_dirs must be a list of folder names; fix or delete the file")
    what = f"{summary} (class_dirs)"
    for name in names:
        plain_name(name, what)
        if name in _RESERVED or name.startswith("."):
            raise UserError(f"{what}: {name!r} is not a class folder")
        path = out_dir / name
        if path.is_symlink():
            raise UserError(f"{what}: {path} is a symlink, not a class folder of a previous selection; "
                            "nothing was deleted")
        contained(out_dir, name, what)
    return list(names)


_RESERVED = {SCORES_NAME, SUMMARY_NAME, SELECTED_LIST_NAME, ".selection.partial"}


def _place(pool: Path, out_dir: Path, scores_path: Path, mode: str) -> list[str]:
    """Copy or link the selected images into OUT/<predicted class>/, replacing a previous selection
    (in list mode the previous selection's folders are only removed)."""
    previous = _previous_class_dirs(out_dir)
    staging = out_dir / ".selection.partial"
    if staging.is_symlink() or staging.is_file():
        staging.unlink()
    elif staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    class_dirs: set[str] = set()
    for row in _iter_rows(scores_path):
        if row["selected"] != "1" or mode == "list":
            continue
        class_dir = _safe_dir_name(row["pred_name"])
        if class_dir in _RESERVED:
            class_dir = f"_{class_dir}"
        if class_dir not in class_dirs:
            if class_dir not in previous and ((out_dir / class_dir).exists() or (out_dir / class_dir).is_symlink()):
                shutil.rmtree(staging)
                raise UserError(f"{out_dir / class_dir}: already exists and is not from a previous selection; "
                                "use an empty --out")
            class_dirs.add(class_dir)
            (staging / class_dir).mkdir()
        source = contained(pool, row["path"], str(scores_path)).resolve()
        target = staging / class_dir / row["path"].replace("/", "__")  # flattened: names stay unique
        if mode == "link":
            os.symlink(source, target)
        else:
            shutil.copy2(source, target)
    for name in previous:
        if (out_dir / name).is_dir() and not (out_dir / name).is_symlink():
            shutil.rmtree(out_dir / name)
    for name in sorted(class_dirs):
        os.replace(staging / name, out_dir / name)
    staging.rmdir()
    return sorted(class_dirs)
