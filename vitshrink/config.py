"""Settings: layered presets (every default cites its source) and how a run's settings are merged.

``recipes/base.yaml`` holds the keys every recipe shares (student derivation, optimiser, schedule,
augmentation, engine); ``recipes/NAME.yaml`` overlays only what differs, plus the recipe's own *options*
(its keys that base lacks, e.g. uvc's ``flops_target``). A run merges, later winning::

    base < preset (recipes/RECIPE.yaml) < --config FILE < flag < --set KEY=VALUE

and records every value with the layer it came from (:class:`Settings`, written to ``args.yaml``). A key that
is not a setting of the recipe is an error naming the known ones.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vitshrink.errors import UserError
from vitshrink.validate import check_settings

PRESETS = Path(__file__).resolve().parent / "presets"
BASE = "base"


@dataclass
class Settings:
    """A run's merged settings and, per key, the layer that set it (base, preset, --config FILE, flag, --set)."""

    recipe: str
    values: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)

    def set(self, key: str, value: Any, source: str) -> None:
        self.values[key] = value
        self.sources[key] = source


def _read_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def preset_path(name: str) -> Path:
    path = PRESETS / f"{name}.yaml"
    if not path.exists() or name == BASE:
        raise UserError(f"--recipe {name!r}: no preset {path}")
    return path


def preset_layers(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(base, overlay)`` of recipe ``name``."""
    return _read_yaml(PRESETS / f"{BASE}.yaml"), _read_yaml(preset_path(name))


def load_preset(name: str) -> dict[str, Any]:
    """The defaults of recipe ``name``: base overlaid with its preset."""
    base, overlay = preset_layers(name)
    return {**base, **overlay}


def recipe_options(name: str) -> list[str]:
    """The recipe's own options: keys of its overlay that base lacks (in file order)."""
    base, overlay = preset_layers(name)
    return [key for key in overlay if key not in base]


def default_settings(name: str) -> Settings:
    base, overlay = preset_layers(name)
    settings = Settings(name, {}, {})
    for key, value in base.items():
        settings.set(key, value, BASE)
    for key, value in overlay.items():
        settings.set(key, value, "preset")
    return settings


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A user's ``-c/--config`` YAML (any setting keys; an earlier run's args.yaml works too)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: file not found")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"--config {path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"--config {path}: expected a mapping of key: value")
    # An args.yaml of an earlier run holds the recipe's settings under "config".
    settings = loaded.get("config", loaded)
    if not isinstance(settings, dict):
        raise UserError(f"--config {path}: expected a mapping of key: value")
    return settings


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def resolve_settings(recipe: str, config: str | Path | None = None, flags: dict[str, Any] | None = None,
                     overrides: dict[str, Any] | None = None) -> Settings:
    """base < preset < ``--config`` file < flags (None values skipped) < overrides (``--set``)."""
    settings = default_settings(recipe)
    layers: list[tuple[str, dict[str, Any]]] = []
    if config is not None:
        layers.append((f"--config {config}", load_config_file(config)))
    layers.append(("flag", {k: v for k, v in (flags or {}).items() if v is not None}))
    layers.append(("--set", dict(overrides or {})))
    for source, layer in layers:
        for key, value in layer.items():
            if key not in settings.values:
                where = flag_name(key) if source == "flag" else f"{source}: {key!r}"
                raise UserError(f"{where}: unknown setting {key!r} for recipe {recipe} "
                                f"(known: {', '.join(sorted(settings.values))})")
            settings.set(key, value, source)
    check_settings(settings.values, settings.sources)  # type, range and finiteness of every value
    return settings


def resolve_config(recipe: str, config: str | Path | None, flags: dict[str, Any],
                   overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The merged values alone (see :func:`resolve_settings`)."""
    return resolve_settings(recipe, config, flags, overrides).values


@dataclass
class SettingInfo:
    key: str
    default: Any
    file: str  # recipes/base.yaml or recipes/NAME.yaml
    comment: str  # the citing comment above the key (or above its group of keys)
    option: bool  # the recipe's own option (not in base)


def _comments(path: Path) -> dict[str, str]:
    """Key -> the block of comment lines directly above it (or above its group of keys)."""
    found: dict[str, str] = {}
    block: list[str] = []
    after_key = False
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            block = [] if after_key else block
            block.append(line.lstrip("#").strip())
            after_key = False
        elif match := re.match(r"^([A-Za-z_][A-Za-z0-9_]*):", line):
            found[match.group(1)] = " ".join(block).strip()
            after_key = True
        elif not line.strip():
            block, after_key = [], False
    return found


def describe_recipe(name: str) -> list[SettingInfo]:
    """Every setting of recipe ``name``: default, the file that sets it and its citing comment."""
    base_path, overlay_path = PRESETS / f"{BASE}.yaml", preset_path(name)
    base, overlay = preset_layers(name)
    base_notes, overlay_notes = _comments(base_path), _comments(overlay_path)
    rows = []
    for key, value in {**base, **overlay}.items():
        in_overlay = key in overlay
        rows.append(SettingInfo(key, value, f"recipes/{name if in_overlay else BASE}.yaml",
                                (overlay_notes if in_overlay else base_notes).get(key, ""), key not in base))
    rows.sort(key=lambda row: not row.option)  # the recipe's own options first
    return rows
