"""The unlabelled pool select-wild reads: walking it safely (symlinks, its own output, duplicates), the names of the
files select-wild writes, and reading one pool image."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Iterator

from PIL import Image

from vitshrink.data.images import IMAGE_EXTENSIONS, decode_image
from vitshrink.errors import UserError
from vitshrink.validate import check_output_dir, is_inside

SCORES_NAME = "scores.csv"
SUMMARY_NAME = "selection.json"
SELECTED_LIST_NAME = "selected.txt"


def iter_pool(root: Path, exclude: Path | None = None, counts: Counter | None = None) -> Iterator[str]:
    """Image paths under ``root`` relative to it (posix), in sorted order, found lazily with ``os.walk``.

    Symlinks are followed only to targets inside the pool, and each real folder and file is visited once (by
    resolved path, the first name in sorted order wins), so a symlink loop or a link out of the pool adds
    nothing. ``exclude`` (the out dir when it lies inside the pool) and any folder holding an earlier
    select-wild output (scores.csv + selection.json) are not entered: the tool never scores its own output.
    ``counts`` gets "other" (files without an image extension), "outside" (links leading out of the pool),
    "duplicate" (second names of one real file or folder) and "own_output" (output folders skipped).
    """
    counts = counts if counts is not None else Counter()
    root_real = os.path.realpath(root)
    exclude_real = os.path.realpath(exclude) if exclude is not None else None
    seen_dirs, seen_files = {root_real}, set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        kept = []
        for name in sorted(dirnames):
            full = os.path.join(dirpath, name)
            real = os.path.realpath(full)
            if name.startswith("."):
                continue
            if (exclude_real is not None and is_inside(real, exclude_real)) or is_selection_dir(full):
                counts["own_output"] += 1
            elif not is_inside(real, root_real):
                counts["outside"] += 1
            elif real in seen_dirs:
                counts["duplicate"] += 1
            else:
                seen_dirs.add(real)
                kept.append(name)
        dirnames[:] = kept
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                counts["other"] += 1
                continue
            real = os.path.realpath(os.path.join(dirpath, name))
            if not is_inside(real, root_real) or (exclude_real is not None and is_inside(real, exclude_real)):
                counts["outside"] += 1
            elif real in seen_files:
                counts["duplicate"] += 1
            else:
                seen_files.add(real)
                yield name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/")


def is_selection_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, SCORES_NAME)) and os.path.isfile(os.path.join(path, SUMMARY_NAME))


def pool_notes(counts: Counter) -> list[str]:
    notes = []
    if counts["outside"]:
        notes.append(f"skipped {counts['outside']} symlinked path(s) leading outside the pool")
    if counts["duplicate"]:
        notes.append(f"skipped {counts['duplicate']} duplicate path(s) (symlinks to a file or folder already "
                     "found): each real image is scored once")
    if counts["own_output"]:
        notes.append(f"skipped {counts['own_output']} folder(s) holding select-wild output inside the pool")
    return notes


def check_out_dir(pool: Path, out_dir: Path) -> None:
    """Refuse an out dir that is the pool or holds it (a rerun would score, or delete, the user's images)."""
    check_output_dir(out_dir)
    if is_inside(pool, out_dir):
        which = "is" if os.path.realpath(pool) == os.path.realpath(out_dir) else "contains"
        raise UserError(f"--out {out_dir}: {which} the --pool {pool}; choose a separate output folder")


def read_image(path: str | os.PathLike, mode: str) -> tuple[Image.Image | None, str]:
    """Decode an image fully in ``mode`` ('RGB' or 'L'); on failure return (None, reason)."""
    try:
        if os.path.getsize(path) == 0:
            return None, "empty file"
    except OSError:
        return None, "corrupt"
    return decode_image(path, mode)
