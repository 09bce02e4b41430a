"""Resumable training state: ``last.pt`` (tensors and plain containers only, loads with ``weights_only=True``).

``last.pt`` holds the architecture record, the trainable module, optimizer and scheduler states, the position
(epoch, batch, step), the partial epoch's metrics, the summary rows so far and every rank's python/numpy/torch
RNG states; written atomically every ``checkpoint_steps`` optimizer steps and at each epoch end. Resuming
restores all of it, so an interrupted run ends with the same weights as an uninterrupted one (CPU).
"""
from __future__ import annotations

import csv
import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from vitshrink._atomic import atomic_path, atomic_write_text
from vitshrink.errors import UserError

CHECKPOINT_FORMAT = 1
SUMMARY_COLUMNS = ("epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr", "time")


@dataclass
class Checkpointing:
    """Where and how often the loop writes its state, and what it resumes from.

    ``save_best(model_epoch, top1)`` writes the best student (``student.safetensors``) when the epoch's top-1
    beats the best so far; ``resume_state`` is a loaded ``last.pt`` (or None for a fresh run).
    """

    out_dir: Path
    every_steps: int
    arch_json: str
    save_best: Callable[[int, float], None]
    resume_state: dict[str, Any] | None = None

    @property
    def path(self) -> Path:
        return self.out_dir / "last.pt"


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``last.pt``: tensors and plain containers only (loads with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--resume: {path} not found (nothing to resume)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a vitshrink training checkpoint")
    return state


def write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
