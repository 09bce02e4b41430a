"""``select-wild``'s last stage: rank the scored rows of ``scores.csv``, mark the selected ones (the CSV is rewritten
atomically) and, in copy/link mode, place them in ``OUT/<predicted class>/`` (a pseudo-labelled ImageFolder),
replacing an earlier selection's folders only. The scoring that fills ``scores.csv`` is ``vitshrink.data.wild``.
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
from typing import Any, Iterator

from vitshrink._atomic import atomic_path, atomic_write_text
from vitshrink.data.pool import SCORES_NAME, SELECTED_LIST_NAME, SUMMARY_NAME
from vitshrink.errors import UserError
from vitshrink.validate import contained, plain_name


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


def criterion_key(row: dict[str, str], criterion: str) -> float:
    """The value a criterion ranks by for one scores.csv row (smaller is better; NaN ranks last)."""
    value = float(row[criterion])
    return value if value == value else float("inf")



def _iter_rows(scores: Path) -> Iterator[dict[str, str]]:
    with scores.open(newline="") as handle:
        yield from csv.DictReader(handle)


def _safe_dir_name(name: str) -> str:
    cleaned = "".join("_" if ch in '/\\:*?"<>|' or ord(ch) < 32 else ch for ch in str(name)).strip()
    return cleaned.lstrip(".") or "_"


# ------------------------------------------------------------------------------------------- select
def finish_selection(pool: Path, out_dir: Path, scores_path: Path, header: list[str], criterion: str, mode: str,
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
    if n_select < 1 and scored:
        raise UserError(f"--fraction {fraction:g} of the {scored} readable images selects none; give a larger "
                        f"--fraction or --num (scores kept in {scores_path} for the next run)")
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


def previous_class_dirs(out_dir: Path) -> list[str]:
    """The class folders an earlier selection in ``out_dir`` made, each checked to be a plain folder of
    ``out_dir``: selection.json is a file the user can edit, and these folders are deleted."""
    summary = out_dir / SUMMARY_NAME
    if not summary.exists():
        return []
    try:
        record = json.loads(summary.read_text())
    except (OSError, ValueError, RecursionError) as exc:
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
    previous = previous_class_dirs(out_dir)
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
