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


# A settings file is small: these bounds refuse alias bombs ("billion laughs") and nesting that would make
# reading or checking it take minutes or overflow the stack.
MAX_YAML_ALIASES = 64
MAX_YAML_DEPTH = 32
MAX_YAML_BYTES = 1 << 20


class YAMLTooComplex(yaml.YAMLError):
    pass


class BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses more than MAX_YAML_ALIASES aliases and nesting deeper than MAX_YAML_DEPTH."""

    def __init__(self, stream: Any):
        super().__init__(stream)
        self.aliases_seen = 0
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases_seen += 1
            if self.aliases_seen > MAX_YAML_ALIASES:
                raise YAMLTooComplex(f"more than {MAX_YAML_ALIASES} aliases (*name)")
        self.depth += 1
        if self.depth > MAX_YAML_DEPTH:
            raise YAMLTooComplex(f"nested deeper than {MAX_YAML_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def parse_yaml(text: str, what: str) -> Any:
    """YAML ``text`` (a settings file, a flag's value) through the bounded loader; a one-line error naming ``what``."""
    if len(text) > MAX_YAML_BYTES:
        raise UserError(f"{what}: larger than {MAX_YAML_BYTES} bytes; not a settings file")
    try:
        return yaml.load(text, Loader=BoundedLoader)  # noqa: S506  (BoundedLoader is a SafeLoader)
    except yaml.YAMLError as exc:
        raise UserError(f"{what}: not valid YAML ({' '.join(str(exc).split())[:300]})") from None
    except RecursionError:
        raise UserError(f"{what}: not valid YAML (nested too deeply)") from None


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``--set KEY=VALUE`` items -> {key: value read as YAML}."""
    overrides: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = parse_yaml(value, f"--set {key.strip()}")
    return overrides


def _read_yaml(path: Path) -> dict[str, Any]:
    return parse_yaml(path.read_text(), str(path)) or {}


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
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--config {path}: cannot read ({type(exc).__name__})") from None
    loaded = parse_yaml(text, f"--config {path}") or {}
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
