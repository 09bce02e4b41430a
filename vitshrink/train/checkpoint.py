"""Resumable training state: ``last.pt`` (tensors and plain containers only, loads with ``weights_only=True``).

``last.pt`` holds the architecture record, the trainable module, optimizer and scheduler states, the position
(epoch, batch, step), the partial epoch's metrics, the summary rows so far and every rank's python/numpy/torch
RNG states; written atomically every ``checkpoint_steps`` optimizer steps and at each epoch end. Resuming
restores all of it, so an interrupted run ends with the same weights as an uninterrupted one (CPU).
"""
from __future__ import annotations

import csv
import hashlib
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
    identity: dict[str, Any] | None = None  # what --resume must match (recipe, data, seed, batch, teacher)

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


# Each field of last.pt and the type it must have (checked on load: the file can be damaged or edited).
_FIELDS = {"arch": str, "epoch": int, "batch": int, "global_step": int, "trainable": dict, "optimizer": dict,
           "scheduler": dict, "rng": list, "best_top1": (int, float), "summary": list, "accum": list,
           "elapsed": (int, float)}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``last.pt``: tensors and plain containers only (loads with ``weights_only=True``); a damaged or edited
    file is a one-line ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--resume: {path} not found (nothing to resume)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (truncated zip, unpickling refused, bad magic: all "damaged")
        text = " ".join(str(exc).split())[:160]
        raise UserError(f"{path}: damaged checkpoint, cannot resume ({type(exc).__name__}: {text}); run again "
                        "without --resume or use another --out") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a vitshrink training checkpoint")
    for key, kind in _FIELDS.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"{path}: damaged checkpoint (field {key!r} is {type(value).__name__})")
    from vitshrink.io.record import ModelRecord

    ModelRecord.from_json(state["arch"], f"{path} (field arch)")  # the student is rebuilt from it
    for key in ("epoch", "batch", "global_step"):
        if state[key] < 0:
            raise UserError(f"{path}: damaged checkpoint (field {key!r} is {state[key]})")
    if not state["rng"] or len(state["accum"]) != 3 or not all(isinstance(v, torch.Tensor)
                                                              for v in state["trainable"].values()):
        raise UserError(f"{path}: damaged checkpoint (rng, accum or trainable weights malformed)")
    return state


# ---------------------------------------------------------------------------------------------- resume
def data_fingerprint(labelled, roots: list[str] | None = None) -> str:
    """A hash of the data paths (resolved) and of every training and validation image name with its label:
    another --data, other files in it or a different hold-out give another fingerprint."""
    digest = hashlib.sha256()
    for root in roots or []:
        digest.update(f"{root}\n".encode())
    for split in (labelled.train, labelled.val):
        if split is None:
            digest.update(b"none")
            continue
        names = split.filename if hasattr(split, "filename") else (lambda i: str(i))
        targets = split.targets if hasattr(split, "targets") else [None] * len(split)
        for index, target in enumerate(targets):
            digest.update(f"{names(index)}\t{target}\n".encode())
        digest.update(b"--")
    digest.update("\n".join(labelled.class_names).encode())
    return digest.hexdigest()[:16]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of a model's weights (CPU bytes, so any device gives the same value)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def student_identity(student: Any) -> str:
    """What --student asked for, as --resume compares it: derived, a spec, or a file (resolved path)."""
    if student is None:
        return "derived from the teacher"
    if isinstance(student, torch.nn.Module):
        return f"module {type(student).__name__}"
    return str(Path(student).resolve()) if Path(str(student)).exists() else str(student)


def normalisation_identity(teacher: torch.nn.Module) -> str:
    """The mean/std every image is normalised with (--mean/--std or the teacher's record)."""
    from vitshrink.io import data_config

    cfg = data_config(teacher)
    return "mean " + ",".join(f"{v:.6g}" for v in cfg["mean"]) + " std " + ",".join(f"{v:.6g}" for v in cfg["std"])


def check_resume(state: dict[str, Any], identity: dict[str, Any], path: Path) -> None:
    """``--resume`` must continue the same run: recipe, data, seed, batch size and teacher as ``last.pt``."""
    saved = state.get("run")
    if not isinstance(saved, dict):
        return  # written before runs were recorded: nothing to compare
    differs = []
    for key, value in identity.items():
        if key in saved and saved[key] != value:
            shown = "other images or labels" if key == "data" else "other weights" if key == "teacher" \
                else f"{saved[key]!r} in last.pt, {value!r} now"
            differs.append(f"{key} ({shown})")
    if differs:
        raise UserError(f"--resume {path}: this run differs from the one that wrote it: {'; '.join(differs)}; "
                        "resume with the same settings or use another --out")


def write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
