"""Matching a data set's class folders to a model's class names: by name, never by position."""
from __future__ import annotations

from typing import Sequence

from vitshrink.errors import UserError


def match_classes(data_names: Sequence[str], model_names: Sequence[str] | None, num_classes: int | None,
                  what: str) -> list[int] | None:
    """The model's class index for each data class, matched by name (None: the same order, or names unknown).

    More data classes than the model has, or names that only partly match the model's, are a UserError naming
    both lists; folders that share no name with the model's classes (e.g. ``0..9`` for named classes) keep their
    order, as before.
    """
    data_names = list(data_names)
    if num_classes and len(data_names) > num_classes:
        raise UserError(f"{what}: {len(data_names)} classes but the model has {num_classes}: "
                        f"{_shown_names(data_names)}")
    if not model_names or list(model_names[:len(data_names)]) == data_names:
        return None
    model_names = list(model_names)
    unknown = [name for name in data_names if name not in model_names]
    if len(unknown) == len(data_names):
        return None  # no shared name: the folders are not named after the classes
    if unknown:
        raise UserError(f"{what}: class folders {_shown_names(data_names)} do not match the model's class names "
                        f"{_shown_names(model_names)} (not in the model: {_shown_names(unknown)})")
    return [model_names.index(name) for name in data_names]


def _shown_names(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"
