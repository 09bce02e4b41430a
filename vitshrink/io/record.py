"""The architecture record: what a model is, how to rebuild it, and what it expects as input.

Every model vitshrink builds carries one ``ModelRecord`` (``record_of(model)``): the timm name and the
kwargs that rebuild it, the preprocessing (input size, mean/std, interpolation, crop_pct), the class
names, where it came from, the loader's assumptions (``notes``, printed by the CLI) and the SPEC the user
typed. ``save_model`` writes the record into the safetensors metadata under the key ``"vitshrink"`` so
``load_model(path)`` needs nothing else. A record read from disk is validated field by field
(``validate_record``) before any model is built from it.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
from safetensors.torch import save_file
from torch import nn

import vitshrink
from vitshrink._atomic import atomic_path
from vitshrink.io.fields import (check_bool, check_float, check_int, check_str, check_vector, check_image_size)
from vitshrink.errors import UserError

METADATA_KEY = "vitshrink"
FORMAT_VERSION = 1
DATA_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos", "random")
_RECORD_ATTR = "_vitshrink_record"


@dataclass
class ModelRecord:
    """Everything vitshrink knows about a model beyond its weights."""

    name: str  # timm model name
    kwargs: dict[str, Any] = field(default_factory=dict)  # rebuild kwargs (JSON values)
    data: dict[str, Any] = field(default_factory=dict)  # input_size, mean, std, interpolation, crop_pct
    class_names: list[str] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the loader assumed, one sentence each
    spec: str | None = None  # the SPEC the user typed

    def to_json(self) -> dict[str, Any]:
        """The on-disk form (safetensors metadata, ``last.pt``): format 1, unchanged since the first release."""
        return {
            "format_version": FORMAT_VERSION,
            "model": self.name,
            "kwargs": self.kwargs,
            **{key: (list(self.data[key]) if isinstance(self.data.get(key), (list, tuple)) else self.data.get(key))
               for key in DATA_KEYS},
            "class_names": self.class_names,
            "provenance": self.provenance,
        }

    @classmethod
    def from_json(cls, raw: Any, source: str | os.PathLike = "record") -> "ModelRecord":
        """A validated record from its on-disk form (a dict or its JSON text); one-line UserError otherwise."""
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except ValueError as exc:
                raise UserError(f"{source}: damaged vitshrink architecture record (not JSON: {exc})") from None
        raw = validate_record(raw, source)
        return cls(name=raw["model"], kwargs=dict(raw.get("kwargs") or {}),
                   data={k: raw[k] for k in DATA_KEYS if raw.get(k) is not None},
                   class_names=raw.get("class_names"), provenance=dict(raw.get("provenance") or {}))


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    for _ in range(4):
        inner = getattr(model, "_orig_mod", None) or (
            model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else None)
        if inner is None:
            return model
        model = inner
    return model


def record_of(model: nn.Module) -> ModelRecord | None:
    """The model's record (through DDP / compile wrappers), or None for a model vitshrink did not build."""
    return getattr(_unwrap(model), _RECORD_ATTR, None)


def attach_record(model: nn.Module, record: ModelRecord) -> ModelRecord:
    """Give ``model`` its record (replacing any); the preprocessing is mirrored into timm's ``pretrained_cfg``."""
    target = _unwrap(model)
    object.__setattr__(target, _RECORD_ATTR, record)
    if record.data:
        target.pretrained_cfg = {**dict(getattr(target, "pretrained_cfg", None) or {}), **_tuples(record.data)}
    return record


def _tuples(data: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


# --- building ---------------------------------------------------------------------------------

def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` that records how the model was built (for ``save_model``).

    Two kwargs are vitshrink's own, recorded like any other: ``norm_eps`` (float) builds every LayerNorm
    with that epsilon, so that checkpoints trained with another epsilon (Hugging Face ViT uses 1e-12,
    vit-pytorch 1e-5, timm 1e-6) give the same logits; ``patch_embed`` names a patch embedding of
    ``vitshrink.models.patch_embed`` (``"pixel_norm"``: vit-pytorch's).
    """
    import vitshrink.models  # noqa: F401  (registers vitshrink's own timm models)

    timm_kwargs = dict(kwargs)
    norm_eps = timm_kwargs.pop("norm_eps", None)
    if norm_eps is not None:
        from timm.layers import LayerNorm

        timm_kwargs["norm_layer"] = functools.partial(LayerNorm, eps=float(norm_eps))
    patch_embed = timm_kwargs.pop("patch_embed", None)
    if patch_embed is not None:
        from vitshrink.models.patch_embed import PATCH_EMBEDS

        if patch_embed not in PATCH_EMBEDS:
            raise ValueError(f"patch_embed must be one of {sorted(PATCH_EMBEDS)}, got {patch_embed!r}")
        timm_kwargs["embed_layer"] = functools.partial(PATCH_EMBEDS[patch_embed], eps=float(norm_eps or 1e-5))
    model = timm.create_model(name, pretrained=pretrained, **timm_kwargs)
    record = attach_record(model, ModelRecord(name=name, kwargs=_jsonable(kwargs)))
    record.data = _resolved_data(model)
    # timm keeps the pretrained config's input size even when img_size changes: make it true.
    patch_embed = getattr(model, "patch_embed", None)
    grid_img_size = getattr(patch_embed, "img_size", None)
    if grid_img_size is not None and not isinstance(grid_img_size, torch.Tensor):
        in_chans = kwargs.get("in_chans", data_config(model)["input_size"][0])
        set_data_config(model, input_size=(in_chans, *grid_img_size))
    elif "in_chans" in kwargs:
        set_data_config(model, input_size=(kwargs["in_chans"], *data_config(model)["input_size"][1:]))
    if "in_chans" in kwargs:
        _match_norm_to_channels(model, int(kwargs["in_chans"]))
    if "img_size" in kwargs:
        # A model built for its data's native resolution is evaluated without a resize-and-crop.
        set_data_config(model, crop_pct=1.0)
    return model


def _match_norm_to_channels(model: nn.Module, in_chans: int) -> None:
    """Give mean/std one value per input channel (a grey model gets the average of the RGB values)."""
    cfg = data_config(model)
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if len(mean) == in_chans and len(std) == in_chans:
        return
    set_data_config(model, mean=(sum(mean) / len(mean),) * in_chans, std=(sum(std) / len(std),) * in_chans)
    record = record_of(model)
    record.notes.append(
        f"{in_chans}-channel input: mean/std set to the channel average of {record.name}'s "
        f"({sum(mean) / len(mean):.4f}/{sum(std) / len(std):.4f}); pass mean/std to set the real values"
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Size):
        return list(value)
    raise TypeError(f"cannot record model kwarg of type {type(value).__name__}: {value!r}")


def _resolved_data(model: nn.Module) -> dict[str, Any]:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=_unwrap(model))
    return {key: cfg[key] for key in DATA_KEYS if key in cfg}


def data_config(model: nn.Module) -> dict[str, Any]:
    """Input size, mean/std, interpolation and crop_pct of a model (the record's, over timm's resolver)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=_unwrap(model))
    record = record_of(model)
    if record is not None:
        cfg.update(_tuples(record.data))
    return cfg


def set_data_config(
    model: nn.Module,
    *,
    input_size: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
    crop_pct: float | None = None,
) -> None:
    """Override the preprocessing a model expects (in its record, mirrored into ``pretrained_cfg``)."""
    update: dict[str, Any] = {}
    if input_size is not None:
        update["input_size"] = tuple(int(v) for v in input_size)
    if mean is not None:
        update["mean"] = tuple(float(v) for v in mean)
    if std is not None:
        update["std"] = tuple(float(v) for v in std)
    if interpolation is not None:
        update["interpolation"] = interpolation
    if crop_pct is not None:
        update["crop_pct"] = float(crop_pct)
    target = _unwrap(model)
    target.pretrained_cfg = {**dict(getattr(target, "pretrained_cfg", None) or {}), **update}
    record = record_of(model)
    if record is not None:
        record.data.update(update)


def architecture_record(
    model: nn.Module,
    *,
    class_names: Sequence[str] | None = None,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON record stored in safetensors metadata: everything ``load_model`` needs."""
    record = record_of(model)
    if record is None:
        raise ValueError("model was not built by vitshrink.io.create_model/load_model; its architecture is unknown")
    cfg = data_config(model)
    written = dataclasses.replace(
        record,
        data={key: cfg.get(key) for key in DATA_KEYS} | {"interpolation": cfg.get("interpolation", "bicubic"),
                                                         "crop_pct": cfg.get("crop_pct", 1.0)},
        class_names=list(class_names) if class_names is not None else record.class_names,
        provenance={**record.provenance, **(provenance or {}), "vitshrink_version": vitshrink.__version__},
    )
    return written.to_json()


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights and architecture record to a safetensors file, atomically."""
    path = Path(path)
    record = architecture_record(model, class_names=class_names, provenance=provenance)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # safetensors refuses tensors that share storage; clone any alias.
    seen: set[int] = set()
    for key, tensor in state.items():
        ptr = tensor.data_ptr()
        if ptr in seen and tensor.numel() > 0:
            state[key] = tensor.clone()
        seen.add(ptr)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(record)})
    return path


def model_from_record(record: dict[str, Any] | ModelRecord, source: str | os.PathLike = "record") -> nn.Module:
    """Build an (untrained) model from an architecture record (validated first when given as a dict)."""
    if not isinstance(record, ModelRecord):
        record = ModelRecord.from_json(record, source)
    model = create_model(record.name, **record.kwargs)
    set_data_config(model, **record.data)
    built = record_of(model)
    built.class_names = list(record.class_names) if record.class_names is not None else None
    built.provenance = dict(record.provenance)
    built.notes = []  # the record states mean/std: nothing was assumed
    return model


# --- validation of records read from disk ----------------------------------------------------------

# Rebuild kwargs whose type and range are known; others are passed to timm as they are (JSON values only).
# (kind, low, high): sizes large enough for any real ViT, small enough that a typo cannot allocate 100s of GB.
KWARG_RULES: dict[str, tuple[str, float, float]] = {
    "img_size": ("size", 1, 8192), "patch_size": ("size", 1, 1024), "in_chans": ("int", 1, 64),
    "num_classes": ("int", 0, 1_000_000), "embed_dim": ("int", 1, 16384), "depth": ("int", 1, 512),
    "num_heads": ("int", 1, 1024), "mlp_ratio": ("float", 1e-3, 64), "qkv_bias": ("bool", 0, 0),
    "class_token": ("bool", 0, 0), "fc_norm": ("bool", 0, 0), "final_norm": ("bool", 0, 0),
    "no_embed_class": ("bool", 0, 0), "pre_norm": ("bool", 0, 0), "qk_norm": ("bool", 0, 0),
    "reg_tokens": ("int", 0, 1024), "norm_eps": ("float", 1e-30, 1.0), "init_values": ("float", 0, 1e3),
    "drop_rate": ("float", 0, 1), "drop_path_rate": ("float", 0, 1), "global_pool": ("str", 0, 0),
    "patch_embed": ("str", 0, 0),
    # vitshrink_vit's per-block dims (one entry per block)
    "block_num_heads": ("ints", 0, 1024), "block_head_dims": ("ints", 0, 4096),
    "block_mlp_hidden": ("ints", 0, 262144), "kept_blocks": ("ints", 0, 511),
    # vitshrink_vit's block and head variants (hand-written ViTs)
    "norm_placement": ("str", 0, 0), "shared_norm": ("bool", 0, 0), "head_hidden": ("int", 0, 262144),
    "head_act": ("str", 0, 0), "head_softmax": ("bool", 0, 0), "fixed_pos_embed": ("bool", 0, 0),
}


def validate_record(raw: Any, source: str | os.PathLike) -> dict[str, Any]:
    """Check every field of an on-disk record for type and range; return it, or raise a one-line UserError."""
    where = f"{source}: architecture record"
    if not isinstance(raw, dict):
        raise UserError(f"{where} is a {type(raw).__name__}, not a JSON object")
    version = raw.get("format_version", FORMAT_VERSION)
    check_int(where, "format_version", version, 1, FORMAT_VERSION)
    if "model" not in raw:
        raise UserError(f"{where} has no field 'model' (the timm model name)")
    check_str(where, "model", raw["model"])
    kwargs = raw.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise UserError(f"{where}: field kwargs must be an object, got {type(kwargs).__name__}")
    for key, value in kwargs.items():
        check_kwarg(where, key, value)
    if isinstance(kwargs.get("num_heads"), int) and isinstance(kwargs.get("embed_dim"), int):
        if kwargs["embed_dim"] % kwargs["num_heads"]:
            raise UserError(f"{where}: kwargs.num_heads={kwargs['num_heads']} does not divide "
                            f"kwargs.embed_dim={kwargs['embed_dim']}")
    channels = None
    if raw.get("input_size") is not None:
        size = check_vector(where, "input_size", raw["input_size"], "int", 1, 8192, lengths=(3,))
        channels = int(size[0])
        check_int(where, "input_size[0] (channels)", channels, 1, 64)
    for key in ("mean", "std"):
        if raw.get(key) is not None:
            low = 1e-12 if key == "std" else -1e6
            values = check_vector(where, key, raw[key], "float", low, 1e6)
            if channels is not None and len(values) not in (1, channels):
                raise UserError(f"{where}: field {key} has {len(values)} values for {channels} input channels")
    if raw.get("interpolation") is not None:
        check_str(where, "interpolation", raw["interpolation"], choices=INTERPOLATIONS)
    if raw.get("crop_pct") is not None:
        check_float(where, "crop_pct", raw["crop_pct"], 1e-3, 1.0)
    names = raw.get("class_names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UserError(f"{where}: field class_names must be a list of strings")
        num_classes = kwargs.get("num_classes")
        if isinstance(num_classes, int) and num_classes and len(names) != num_classes:
            raise UserError(f"{where}: {len(names)} class_names for num_classes={num_classes}")
    if raw.get("provenance") is not None and not isinstance(raw["provenance"], dict):
        raise UserError(f"{where}: field provenance must be an object, got {type(raw['provenance']).__name__}")
    return raw


def check_kwarg(where: str, key: Any, value: Any) -> None:
    """One rebuild kwarg: a string key, a JSON value, and the known ones in range."""
    if not isinstance(key, str) or not key.isidentifier():
        raise UserError(f"{where}: kwargs key {key!r} is not a valid argument name")
    name = f"kwargs.{key}"
    kind, low, high = KWARG_RULES.get(key, ("any", 0, 0))
    if value is None and kind not in ("int", "size"):
        return  # optional kwargs (init_values, kept_blocks, ...) default to None
    if kind == "int":
        check_int(where, name, value, int(low), int(high))
    elif kind == "float":
        check_float(where, name, value, low, high)
    elif kind == "bool":
        check_bool(where, name, value)
    elif kind == "str":
        check_str(where, name, value)
    elif kind == "ints":
        check_vector(where, name, value, "int", int(low), int(high), lengths=range(1, 513))
    elif kind == "size":
        check_image_size(where, name, value, int(low), int(high))
    elif not _is_json(value):
        raise UserError(f"{where}: {name} has a value of type {type(value).__name__}")


def _is_json(value: Any) -> bool:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return True
    if isinstance(value, list):
        return all(_is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False
