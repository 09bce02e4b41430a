"""Type and range checks for fields read from files (architecture records, HF config.json).

Each check raises a one-line ``UserError`` naming the file, the field, what it must be and what it is, so a
crafted or damaged file never reaches a model constructor (a traceback, or an absurd allocation).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Collection

from vitshrink.errors import UserError


def read_json(path: Path, what: str = "JSON file", kind: type | None = dict) -> Any:
    """A JSON file a run reads back (its own or a user's): damaged, too deeply nested or of the wrong top-level
    type is a one-line UserError naming the file."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise UserError(f"{path}: not a readable {what} ({type(exc).__name__}); delete it or use another "
                        "folder") from None
    if kind is not None and not isinstance(value, kind):
        raise UserError(f"{path}: not a {what} (a JSON {kind.__name__} was expected)")
    return value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_int(where: str, name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserError(f"{where}: field {name} must be an integer in [{low}, {high}], got {_shown(value)}")
    return value


def check_float(where: str, name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise UserError(f"{where}: field {name} must be a number in [{low:g}, {high:g}], got {_shown(value)}")
    return float(value)


def check_bool(where: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{where}: field {name} must be true or false, got {_shown(value)}")
    return value


def check_str(where: str, name: str, value: Any, choices: Collection[str] | None = None) -> str:
    if not isinstance(value, str) or not value or (choices is not None and value not in choices):
        allowed = f" (one of {', '.join(choices)})" if choices is not None else ""
        raise UserError(f"{where}: field {name} must be a non-empty string{allowed}, got {_shown(value)}")
    return value


def check_vector(where: str, name: str, value: Any, kind: str, low: float, high: float,
                 lengths: Collection[int] | None = None) -> list:
    """A list of ints or finite floats in [low, high], with a length in ``lengths`` (any length >= 1 if None)."""
    if not isinstance(value, (list, tuple)) or not value or (lengths is not None and len(value) not in lengths):
        count = f" of {'/'.join(map(str, lengths))} " if lengths is not None and len(lengths) < 4 else " of "
        raise UserError(f"{where}: field {name} must be a list{count}numbers, got {_shown(value)}")
    check = check_int if kind == "int" else check_float
    return [check(where, f"{name}[{i}]", v, low, high) for i, v in enumerate(value)]


def check_image_size(where: str, name: str, value: Any, low: int, high: int) -> Any:
    """An image or patch size: one integer, or a [height, width] pair."""
    if isinstance(value, (list, tuple)):
        return check_vector(where, name, value, "int", low, high, lengths=(1, 2))
    return check_int(where, name, value, low, high)
