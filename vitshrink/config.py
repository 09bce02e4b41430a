"""Settings: the recipe presets (YAML, every default with its source) and how a run's settings are merged.

Merge order: preset < ``--config`` file < explicit flags < ``--set KEY=VALUE`` overrides.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from vitshrink.errors import UserError
from vitshrink.validate import check_settings

PRESETS = Path(__file__).resolve().parent / "presets"
# Keys every run records besides the recipe's preset (they are not recipe defaults).
RUN_KEYS = ("recipe", "teacher", "student", "data", "val_data", "seed", "device", "compile", "flops_target",
            "world_size", "vitshrink_version")


def load_preset(name: str) -> dict[str, Any]:
    """The defaults of recipe ``name`` from its YAML preset."""
    path = PRESETS / f"{name}.yaml"
    if not path.exists():
        raise UserError(f"--recipe {name!r}: no preset {path}")
    return yaml.safe_load(path.read_text()) or {}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A user's ``-c/--config`` YAML (same keys as a preset)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: file not found")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"--config {path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"--config {path}: expected a mapping of key: value")
    return loaded


def resolve_config(recipe: str, config: str | Path | None, flags: dict[str, Any],
                   overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Preset < ``--config`` file < explicit flags < overrides; unknown keys are a UserError."""
    cfg = load_preset(recipe)
    layers: list[tuple[str, dict[str, Any]]] = []
    if config is not None:
        loaded = load_config_file(config)
        # An args.yaml of an earlier run holds the recipe's settings under "config".
        layers.append((f"--config {config}", loaded.get("config", loaded)))
    layers.append(("flag", {k: v for k, v in flags.items() if v is not None}))
    layers.append(("override", dict(overrides or {})))
    sources: dict[str, str] = {}
    for source, layer in layers:
        for key, value in layer.items():
            if key in RUN_KEYS and source != "flag":
                continue
            if key not in cfg:
                raise UserError(f"{source}: unknown setting {key!r} for recipe {recipe} "
                                f"(known: {', '.join(sorted(cfg))})")
            cfg[key] = value
            sources[key] = source
    check_settings(cfg, sources)
    return cfg
