"""Renaming the keys of checkpoints written by other codebases onto this package's model layouts."""
from __future__ import annotations

from collections.abc import Iterable

import torch


def rename_prefixes(state_dict: dict[str, torch.Tensor],
                    prefixes: Iterable[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Replace the first matching ``old`` prefix of each key with ``new``; other keys pass unchanged."""
    prefixes = tuple(prefixes)
    out = {}
    for key, value in state_dict.items():
        for old, new in prefixes:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out
