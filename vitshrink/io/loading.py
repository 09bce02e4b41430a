"""Load a teacher from any SPEC, and save models with their architecture record.

A SPEC is a timm model name, a ``.safetensors`` file, a ``.pt/.pth/.th`` state dict, or a Hugging Face
ViT/DeiT directory. Every model vitshrink builds carries ``model.vitshrink_arch`` (the timm name and
the kwargs that rebuild it); ``save_model`` writes that record into the safetensors metadata under
the key ``"vitshrink"`` so ``load_model(path)`` needs nothing else. No pickled modules anywhere.

Foreign checkpoints (a ``.safetensors`` or ``.pt`` state dict without that record) need ``arch=`` (a timm
name); everything else that the tensor shapes reveal (width, depth, patch size, classes, image size,
channels, prefix tokens) is inferred. What had to be assumed instead (e.g. the number of attention
heads, which no tensor shape reveals) is listed, one sentence each, in ``model.vitshrink_notes``
(a list of strings, empty when nothing was assumed) so the CLI can show it.
"""
from __future__ import annotations

import difflib
import functools
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
from safetensors.torch import save_file
from torch import nn

import vitshrink
from vitshrink._atomic import atomic_path
from vitshrink.errors import UserError

METADATA_KEY = "vitshrink"
FORMAT_VERSION = 1


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` that remembers how the model was built (for ``save_model``).

    One kwarg is vitshrink's own: ``norm_eps`` (float) builds every LayerNorm with that epsilon, so
    that checkpoints trained with another epsilon (Hugging Face ViT uses 1e-12, timm 1e-6) give the
    same logits; it is recorded like any other kwarg.
    """
    import vitshrink.models  # noqa: F401  (registers vitshrink's own timm models)

    timm_kwargs = dict(kwargs)
    norm_eps = timm_kwargs.pop("norm_eps", None)
    if norm_eps is not None:
        from timm.layers import LayerNorm

        timm_kwargs["norm_layer"] = functools.partial(LayerNorm, eps=float(norm_eps))
    model = timm.create_model(name, pretrained=pretrained, **timm_kwargs)
    model.vitshrink_arch = {"name": name, "kwargs": _jsonable(kwargs)}
    model.vitshrink_notes = []
    # timm keeps the pretrained config's input size even when img_size changes: make it true.
    patch_embed = getattr(model, "patch_embed", None)
    grid_img_size = getattr(patch_embed, "img_size", None)
    if grid_img_size is not None:
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
    model.vitshrink_notes.append(
        f"{in_chans}-channel input: mean/std set to the channel average of {model.vitshrink_arch['name']}'s "
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


def data_config(model: nn.Module) -> dict[str, Any]:
    """Input size, mean/std, interpolation and crop_pct of a model (timm's resolver)."""
    from timm.data import resolve_data_config

    return resolve_data_config({}, model=model)


def set_data_config(
    model: nn.Module,
    *,
    input_size: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
    crop_pct: float | None = None,
) -> None:
    """Override the preprocessing a model expects (stored in ``model.pretrained_cfg``)."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if input_size is not None:
        cfg["input_size"] = tuple(int(v) for v in input_size)
    if mean is not None:
        cfg["mean"] = tuple(float(v) for v in mean)
    if std is not None:
        cfg["std"] = tuple(float(v) for v in std)
    if interpolation is not None:
        cfg["interpolation"] = interpolation
    if crop_pct is not None:
        cfg["crop_pct"] = float(crop_pct)
    model.pretrained_cfg = cfg


def architecture_record(
    model: nn.Module,
    *,
    class_names: Sequence[str] | None = None,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON record stored in safetensors metadata: everything ``load_model`` needs."""
    arch = getattr(model, "vitshrink_arch", None)
    if arch is None:
        raise ValueError("model was not built by vitshrink.io.create_model/load_model; its architecture is unknown")
    cfg = data_config(model)
    old_meta = getattr(model, "vitshrink_meta", {}) or {}
    return {
        "format_version": FORMAT_VERSION,
        "model": arch["name"],
        "kwargs": arch["kwargs"],
        "input_size": list(cfg["input_size"]),
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "crop_pct": cfg.get("crop_pct", 1.0),
        "class_names": list(class_names) if class_names is not None else old_meta.get("class_names"),
        "provenance": {**old_meta.get("provenance", {}), **(provenance or {}), "vitshrink_version": vitshrink.__version__},
    }


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


def model_from_record(record: dict[str, Any]) -> nn.Module:
    """Build an (untrained) model from an architecture record."""
    model = create_model(record["model"], **record.get("kwargs", {}))
    set_data_config(
        model,
        input_size=record.get("input_size"),
        mean=record.get("mean"),
        std=record.get("std"),
        interpolation=record.get("interpolation"),
        crop_pct=record.get("crop_pct"),
    )
    model.vitshrink_meta = {
        "class_names": record.get("class_names"),
        "provenance": record.get("provenance", {}),
    }
    model.vitshrink_notes = []  # the record states mean/std: nothing was assumed
    return model



# ---------------------------------------------------------------------------------------------
# Loading a SPEC
# ---------------------------------------------------------------------------------------------

TORCH_SUFFIXES = (".pt", ".pth", ".th", ".bin")
# Wrappers that training scripts put around the state dict (timm, DeiT, torchvision references...).
STATE_DICT_WRAPPERS = ("model", "state_dict", "model_ema", "state_dict_ema")
# Prefixes left by DataParallel/DDP ("module.") and torch.compile ("_orig_mod.").
STATE_DICT_PREFIXES = ("module.", "_orig_mod.")


def load_model(
    spec: str | os.PathLike,
    *,
    arch: str | None = None,
    num_heads: int | None = None,
    img_size: int | None = None,
    in_chans: int | None = None,
    num_classes: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    pretrained: bool = False,
) -> nn.Module:
    """Load a model from a SPEC, in eval mode on CPU.

    SPEC is one of:
      * a timm model name (random weights unless ``pretrained``; the other kwargs are passed to timm);
      * a ``.safetensors`` file: one saved by vitshrink needs nothing else, a foreign one needs ``arch``;
      * a ``.pt/.pth/.th/.bin`` state dict (read with ``weights_only=True`` only), which needs ``arch``;
      * a Hugging Face transformers ViT/DeiT directory (``config.json`` + weights), converted to timm.

    ``img_size`` different from the checkpoint's resamples the position embeddings; ``mean``/``std``
    override the preprocessing recorded with the model. The result carries ``vitshrink_arch`` (so it
    can be saved again with ``save_model``) and ``vitshrink_notes`` (what was assumed, one line each).
    """
    options = {"arch": arch, "num_heads": num_heads, "img_size": img_size, "in_chans": in_chans,
               "num_classes": num_classes}
    spec_str = str(spec)
    path = Path(spec_str).expanduser()
    notes: list[str] = []
    if path.is_dir():
        model = _load_hf_directory(path, options, notes)
    elif path.suffix.lower() == ".safetensors" or path.suffix.lower() in TORCH_SUFFIXES:
        if not path.is_file():
            raise UserError(f"{spec_str}: file not found")
        if path.suffix.lower() == ".safetensors":
            state, metadata = _read_safetensors(path)
        else:
            state, metadata = _read_torch_state_dict(path, notes), {}
        if METADATA_KEY in metadata:
            model = _model_from_vitshrink_file(path, state, metadata[METADATA_KEY], options, notes)
        else:
            model = _model_from_foreign_state(path, state, options, notes)
    elif path.is_file():
        raise UserError(f"{spec_str}: unsupported file type {path.suffix!r} (expected .safetensors, "
                        f".pt/.pth/.th/.bin, a Hugging Face model directory, or a timm model name)")
    elif os.sep in spec_str or (os.altsep and os.altsep in spec_str):
        raise UserError(f"{spec_str}: no such file or directory")
    else:
        return _finish(_model_from_timm_name(spec_str, options, pretrained, notes), notes, mean, std)
    if pretrained:
        notes.append(f"pretrained ignored: the weights come from {spec_str}")
    return _finish(model, notes, mean, std)


def _finish(model: nn.Module, notes: list[str], mean: Sequence[float] | None,
            std: Sequence[float] | None) -> nn.Module:
    model.vitshrink_notes = list(getattr(model, "vitshrink_notes", [])) + notes
    if mean is not None or std is not None:
        channels = int(data_config(model)["input_size"][0])
        for flag, values in (("mean", mean), ("std", std)):
            if values is not None and len(values) not in (1, channels):
                raise UserError(f"--{flag}: {len(values)} values given but the model takes {channels} channels")
        set_data_config(model, mean=mean, std=std)
        # A note about assumed mean/std no longer applies once the user set them.
        model.vitshrink_notes = [n for n in model.vitshrink_notes if "mean/std" not in n]
    model.cpu().eval()
    return model


# --- timm names ----------------------------------------------------------------------------

def _require_timm_name(name: str, what: str) -> None:
    import vitshrink.models  # noqa: F401  (registers vitshrink's own timm models)

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models() for the names"
    raise UserError(f"{name}: unknown {what}{hint}")


def _model_from_timm_name(name: str, options: dict[str, Any], pretrained: bool, notes: list[str]) -> nn.Module:
    _require_timm_name(name, "timm model name (and no such file)")
    kwargs = {k: options[k] for k in ("img_size", "in_chans", "num_classes", "num_heads") if options[k] is not None}
    if options["arch"] is not None and options["arch"] != name:
        notes.append(f"arch={options['arch']} ignored: SPEC {name} is itself a timm model name")
    img_size = kwargs.get("img_size")
    if img_size is not None and not hasattr(_probe(name), "patch_embed"):
        # CNNs take any input size: for them the size is preprocessing, not architecture.
        kwargs.pop("img_size")
    if pretrained:
        model = _create_pretrained(name, kwargs)
    else:
        model = _create_checked(name, kwargs, source=name)
    if img_size is not None and "img_size" not in kwargs:
        set_data_config(model, input_size=(data_config(model)["input_size"][0], img_size, img_size), crop_pct=1.0)
    return model


def _create_checked(name: str, kwargs: dict[str, Any], source: str) -> nn.Module:
    try:
        return create_model(name, **kwargs)
    except TypeError as exc:
        raise UserError(f"{source}: timm model {name} does not accept these options {sorted(kwargs)} ({exc})") from None
    except (AssertionError, ValueError, RuntimeError) as exc:
        raise UserError(f"{source}: cannot build {name} with {kwargs} ({type(exc).__name__}: {exc})") from None


def _create_pretrained(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """timm pretrained weights from the local cache only (never a slow network hang).

    Set HF_HUB_OFFLINE=0 explicitly in the environment to let timm download.
    """
    import huggingface_hub.constants as hub_constants

    allow_download = os.environ.get("HF_HUB_OFFLINE") == "0"
    saved = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = not allow_download
    try:
        return create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # timm/hub raise many types (LocalEntryNotFoundError, OSError, URLError...)
        where = "could not be downloaded" if allow_download else "are not in the local cache (vitshrink does not download)"
        raise UserError(
            f"{name}: pretrained weights {where} ({type(exc).__name__}); download the checkpoint yourself and "
            f"pass the local file as SPEC with --arch {name} (a .safetensors or .pt state dict)"
        ) from None
    finally:
        hub_constants.HF_HUB_OFFLINE = saved


@functools.lru_cache(maxsize=32)
def _probe(name: str) -> nn.Module:
    """The arch with default arguments, on the meta device (no memory, no init cost): for its defaults."""
    import vitshrink.models  # noqa: F401

    try:
        with torch.device("meta"):
            return timm.create_model(name)
    except Exception:  # a model whose init needs real tensors: build it for real, once
        return timm.create_model(name)


def _is_vision_transformer(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


# --- reading files -------------------------------------------------------------------------

def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # SafetensorError, OSError: truncated or not safetensors at all
        raise UserError(f"{path}: not a readable safetensors file ({_one_line(exc)})") from None
    if not state:
        raise UserError(f"{path}: the safetensors file holds no tensors")
    return state, metadata


def _read_torch_state_dict(path: Path, notes: list[str]) -> dict[str, torch.Tensor]:
    import pickle

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():
            raise UserError(
                f"{path}: refused for safety: the file stores pickled Python objects (not only tensors), and "
                f"unpickling them could run arbitrary code; where you trust it, re-save it as a plain state dict: "
                f"torch.save(model.state_dict(), 'weights.pt') or safetensors.torch.save_file(model.state_dict(), "
                f"'weights.safetensors')"
            ) from None
        detail = str(exc).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        raise UserError(f"{path}: not a PyTorch checkpoint (unreadable pickle: {' '.join(detail.split())[:100]})") from None
    except Exception as exc:  # RuntimeError from a truncated zip, EOFError, OSError...
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({_one_line(exc)[:120]})") from None
    return _unwrap_state_dict(obj, path, notes)


def _unwrap_state_dict(obj: Any, path: Path, notes: list[str]) -> dict[str, torch.Tensor]:
    """Find the tensors inside ``{'model': ...}``-style wrappers and drop DDP/compile prefixes."""
    for _ in range(3):  # wrappers nest at most a couple of levels in practice
        if not isinstance(obj, dict) or all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        present = [k for k in STATE_DICT_WRAPPERS if isinstance(obj.get(k), dict)]
        if not present:
            break
        if len(present) > 1:
            notes.append(f"{path.name}: used the '{present[0]}' weights (the file also has {present[1:]})")
        obj = obj[present[0]]
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path}: no state dict found (expected a dict of tensors, got {type(obj).__name__})")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise UserError(f"{path}: no tensors found (top-level keys: {', '.join(map(str, list(obj)[:8]))})")
    for prefix in STATE_DICT_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    state = {k.replace("._orig_mod.", "."): v for k, v in state.items()}
    return state


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- vitshrink files -----------------------------------------------------------------------

def _model_from_vitshrink_file(path: Path, state: dict[str, torch.Tensor], record_json: str,
                               options: dict[str, Any], notes: list[str]) -> nn.Module:
    try:
        record = json.loads(record_json)
        name, kwargs = record["model"], dict(record.get("kwargs", {}))
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: damaged vitshrink architecture record ({_one_line(exc)})") from None
    if options["arch"] is not None and options["arch"] != name:
        notes.append(f"arch={options['arch']} ignored: {path.name} records its architecture ({name})")
    for key in ("num_heads", "in_chans", "num_classes"):
        if options[key] is not None and key in kwargs and kwargs[key] != options[key]:
            raise UserError(f"{path}: the file's model has {key}={kwargs[key]} but {key}={options[key]} was asked")
    img_size = options["img_size"]
    if img_size is not None and list(record.get("input_size", [None, None, None]))[1:] != [img_size, img_size]:
        record = dict(record)
        if "pos_embed" in state:
            kwargs["img_size"] = img_size
            record["kwargs"] = kwargs
        record["input_size"] = [record["input_size"][0], img_size, img_size]
    _require_timm_name(name, f"model in {path.name}'s record (is a vitshrink model module missing?)")
    try:
        model = model_from_record(record)
    except (TypeError, AssertionError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: cannot rebuild {name} from its record ({_one_line(exc)})") from None
    if "pos_embed" in state and state["pos_embed"].shape != model.state_dict()["pos_embed"].shape:
        patch = model.patch_embed.patch_size
        state = _resample_pos_embed(state, int(img_size), int(_first(patch)),
                                    bool(getattr(model, "no_embed_class", False)), path)
    for key in ("num_classes", "in_chans"):
        if options[key] is not None and getattr(model, key, options[key]) != options[key]:
            raise UserError(f"{path}: the file's model has {key}={getattr(model, key)} but {key}={options[key]} "
                            f"was asked")
    _load_state_checked(model, state, path, name)
    return model


# --- foreign state dicts -------------------------------------------------------------------

def _model_from_foreign_state(path: Path, state: dict[str, torch.Tensor], options: dict[str, Any],
                              notes: list[str]) -> nn.Module:
    arch = options["arch"]
    if arch is None:
        raise UserError(f"{path}: a foreign checkpoint (not saved by vitshrink) needs --arch NAME, the timm "
                        f"model it was trained as (e.g. vit_small_patch16_224)")
    _require_timm_name(arch, "arch")
    probe = _probe(arch)
    if _is_vision_transformer(probe) and "patch_embed.proj.weight" in state:
        kwargs = _vit_kwargs_from_state(state, probe, arch, options, path, notes)
    else:
        kwargs = _generic_kwargs_from_state(state, probe, options)
    checkpoint_img = kwargs.get("img_size")
    if options["img_size"] is not None and "pos_embed" in state and checkpoint_img != options["img_size"]:
        state = _resample_pos_embed(state, options["img_size"], kwargs["patch_size"],
                                    kwargs.get("no_embed_class", bool(getattr(probe, "no_embed_class", False))), path)
        kwargs["img_size"] = options["img_size"]
    model = _create_checked(arch, kwargs, source=str(path))
    if options["img_size"] is not None and "img_size" not in kwargs:
        set_data_config(model, input_size=(data_config(model)["input_size"][0], options["img_size"],
                                           options["img_size"]), crop_pct=1.0)
    _load_state_checked(model, state, path, arch)
    return model


def _vit_kwargs_from_state(state: dict[str, torch.Tensor], probe: nn.Module, arch: str, options: dict[str, Any],
                           path: Path, notes: list[str]) -> dict[str, Any]:
    """timm VisionTransformer kwargs read off the tensor shapes (timm's key layout)."""
    proj = state["patch_embed.proj.weight"]
    if proj.dim() != 4:
        raise UserError(f"{path}: patch_embed.proj.weight has shape {tuple(proj.shape)}, expected 4 dimensions")
    embed_dim, chans, patch_h, patch_w = (int(v) for v in proj.shape)
    if patch_h != patch_w:
        raise UserError(f"{path}: non-square patches ({patch_h}x{patch_w}) are not supported")
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise UserError(f"{path}: no transformer blocks (blocks.N.*) found for arch {arch}")
    has_cls = "cls_token" in state
    reg_tokens = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    num_prefix = int(has_cls) + reg_tokens + int("dist_token" in state)
    kwargs: dict[str, Any] = {"embed_dim": embed_dim, "depth": depth, "patch_size": patch_h, "in_chans": chans}

    if "pos_embed" in state:
        length = int(state["pos_embed"].shape[1])
        grid = math.isqrt(max(length - num_prefix, 0))
        no_embed_class = False
        if grid * grid != length - num_prefix:
            grid, no_embed_class = math.isqrt(length), True
            if grid * grid != length:
                raise UserError(f"{path}: pos_embed has {length} tokens, not a square grid plus {num_prefix} "
                                f"prefix tokens")
        kwargs["img_size"] = grid * patch_h
        if no_embed_class != bool(getattr(probe, "no_embed_class", False)):
            kwargs["no_embed_class"] = no_embed_class
    else:
        kwargs["img_size"] = int(getattr(probe.patch_embed, "img_size", (224, 224))[0])
        kwargs["pos_embed"] = "none"
        notes.append(f"{path.name} has no position embedding: image size {kwargs['img_size']} assumed from {arch}")
    if has_cls != bool(getattr(probe, "has_class_token", True)):
        kwargs["class_token"] = has_cls
    if reg_tokens:
        kwargs["reg_tokens"] = reg_tokens

    fc1 = state.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        kwargs["mlp_ratio"] = int(fc1.shape[0]) / embed_dim
    kwargs["qkv_bias"] = "blocks.0.attn.qkv.bias" in state
    if "blocks.0.attn.q_norm.weight" in state:
        kwargs["qk_norm"] = True
    if "blocks.0.ls1.gamma" in state:
        kwargs["init_values"] = 1e-5  # any value turns layer scale on; the weights set gamma
    if "norm_pre.weight" in state:
        kwargs["pre_norm"] = True
    has_fc_norm, has_norm = "fc_norm.weight" in state, "norm.weight" in state
    if any(k.startswith("attn_pool.") for k in state):
        kwargs["global_pool"] = "map"
    elif has_fc_norm or not has_cls:
        kwargs["global_pool"] = "avg" if probe.global_pool in ("token", "map", "") else probe.global_pool
    elif probe.global_pool != "token":
        kwargs["global_pool"] = "token"
    kwargs["fc_norm"] = has_fc_norm
    if not has_fc_norm and not has_norm:
        kwargs["final_norm"] = False
    if "head.weight" in state:
        kwargs["num_classes"] = int(state["head.weight"].shape[0])
    elif not any(k.startswith("head.") for k in state):
        kwargs["num_classes"] = 0
        notes.append(f"{path.name} has no classifier head: the model outputs {embed_dim}-dim features")

    for key in ("in_chans", "num_classes"):
        if options[key] is not None and key in kwargs and options[key] != kwargs[key]:
            raise UserError(f"{path}: the checkpoint has {key}={kwargs[key]} but {key}={options[key]} was asked")
    kwargs["num_heads"] = _choose_num_heads(embed_dim, probe, arch, options["num_heads"], path, notes)
    return kwargs


def _choose_num_heads(embed_dim: int, probe: nn.Module, arch: str, asked: int | None, path: Path,
                      notes: list[str]) -> int:
    """No tensor shape reveals the head count: take the user's, else the arch's, else 64-wide heads."""
    if asked is not None:
        if embed_dim % asked:
            raise UserError(f"{path}: num_heads={asked} does not divide the embedding width {embed_dim}")
        return int(asked)
    default_heads = int(probe.blocks[0].attn.num_heads)
    if int(probe.embed_dim) == embed_dim:
        notes.append(f"num_heads={default_heads} assumed (timm default for {arch}; the checkpoint cannot tell): "
                     f"pass --num-heads if it was trained with another count")
        return default_heads
    heads = embed_dim // 64 if embed_dim % 64 == 0 else (default_heads if embed_dim % default_heads == 0 else 1)
    notes.append(f"num_heads={heads} assumed (width {embed_dim} differs from {arch}'s {probe.embed_dim}; "
                 f"{embed_dim // heads}-wide heads): pass --num-heads if it was trained with another count")
    return heads


def _generic_kwargs_from_state(state: dict[str, torch.Tensor], probe: nn.Module, options: dict[str, Any]) -> dict[str, Any]:
    """For non-ViT archs: only the class count and input channels, read from the classifier and stem."""
    kwargs: dict[str, Any] = {k: options[k] for k in ("in_chans", "num_classes") if options[k] is not None}
    expected = probe.state_dict()
    classifier = (getattr(probe, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(classifier, (list, tuple)):
        classifier = classifier[0]
    head_key = f"{classifier}.weight" if classifier else None
    if "num_classes" not in kwargs and head_key and head_key in state and head_key in expected:
        if state[head_key].shape[0] != expected[head_key].shape[0]:
            kwargs["num_classes"] = int(state[head_key].shape[0])
    stem_key = next((k for k, v in expected.items() if v.dim() == 4), None)
    if "in_chans" not in kwargs and stem_key in state and state[stem_key].dim() == 4:
        if state[stem_key].shape[1] != expected[stem_key].shape[1]:
            kwargs["in_chans"] = int(state[stem_key].shape[1])
    return kwargs


def _resample_pos_embed(state: dict[str, torch.Tensor], new_img_size: int, patch_size: int,
                        no_embed_class: bool, source: Path) -> dict[str, torch.Tensor]:
    """Interpolate the position embedding to a new patch grid (prefix-token rows are kept as they are)."""
    from timm.layers import resample_abs_pos_embed

    if new_img_size % patch_size:
        raise UserError(f"{source}: --img-size {new_img_size} is not a multiple of the model's patch size {patch_size}")
    num_prefix = 0 if no_embed_class else (
        int("cls_token" in state) + int("dist_token" in state)
        + (int(state["reg_token"].shape[1]) if "reg_token" in state else 0))
    pos_embed = state["pos_embed"]
    old_grid = math.isqrt(int(pos_embed.shape[1]) - num_prefix)
    state = dict(state)
    state["pos_embed"] = resample_abs_pos_embed(
        pos_embed.float(), [new_img_size // patch_size] * 2, old_size=[old_grid] * 2,
        num_prefix_tokens=num_prefix).to(pos_embed.dtype)
    return state


def _load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], source: Path | str, arch: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the first offending tensor."""
    expected = model.state_dict()
    for key, tensor in state.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            raise UserError(f"{source}: {key} has shape {tuple(tensor.shape)} but arch {arch} expects "
                            f"{tuple(expected[key].shape)}")
    # Checkpoints from PyTorch < 0.4.1 have no BatchNorm step counter; it does not affect the outputs.
    state = {**{k: torch.zeros_like(v) for k, v in expected.items()
                if k.endswith("num_batches_tracked") and k not in state}, **state}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{source}: arch {arch} needs tensor {missing[0]}{more}, which the file lacks")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise UserError(f"{source}: tensor {unexpected[0]}{more} is not part of arch {arch}")
    model.load_state_dict(state, strict=True)


# --- Hugging Face transformers ViT / DeiT directories ----------------------------------------

# HF activation names -> timm act_layer names (both sides compute the same function).
HF_ACTIVATIONS = {"gelu": None, "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_fast": "gelu_tanh", "quick_gelu": "quick_gelu", "relu": "relu", "silu": "silu",
                  "swish": "silu"}
# Preprocessing when the directory has no preprocessor_config.json (the HF image processors' defaults).
HF_DEFAULT_NORM = {"vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                   "deit": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
HF_INTERPOLATION = {0: "nearest", 2: "bilinear", 3: "bicubic"}
# (interpolation, crop_pct) of those defaults: ViT resizes straight to size, DeiT resizes 256 and crops 224.
HF_DEFAULT_RESIZE = {"vit": ("bilinear", 1.0), "deit": ("bicubic", 224 / 256)}


def _load_hf_directory(path: Path, options: dict[str, Any], notes: list[str]) -> nn.Module:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(f"{path}: a directory SPEC must be a Hugging Face checkpoint (config.json + "
                        f"model.safetensors or pytorch_model.bin); config.json is missing")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{config_path}: not readable JSON ({_one_line(exc)})") from None
    model_type = config.get("model_type")
    if model_type not in ("vit", "deit"):
        raise UserError(f"{config_path}: model_type {model_type!r} is not supported (vit and deit are)")
    hf_state = _read_hf_weights(path, notes)
    state, kwargs, name = _hf_to_timm(hf_state, config, model_type, path, notes)
    if options["arch"] is not None:
        notes.append(f"arch={options['arch']} ignored: {path.name}/config.json describes the architecture")
    for key in ("num_heads", "in_chans", "num_classes"):
        if options[key] is not None and options[key] != kwargs[key]:
            raise UserError(f"{config_path}: the checkpoint has {key}={kwargs[key]} but {key}={options[key]} was asked")
    if options["img_size"] is not None and options["img_size"] != kwargs["img_size"]:
        state = _resample_pos_embed(state, options["img_size"], kwargs["patch_size"], False, path)
        kwargs["img_size"] = options["img_size"]
    model = _create_checked(name, kwargs, source=str(path))
    _load_state_checked(model, state, path, f"{name} (converted from {model_type})")

    mean, std = HF_DEFAULT_NORM[model_type]
    interpolation, crop_pct = HF_DEFAULT_RESIZE[model_type]
    preprocessor = path / "preprocessor_config.json"
    if preprocessor.is_file():
        try:
            pre = json.loads(preprocessor.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{preprocessor}: not readable JSON ({_one_line(exc)})") from None
        mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
        interpolation = HF_INTERPOLATION.get(pre.get("resample"), interpolation)
        crop, size = pre.get("crop_size"), pre.get("size")
        if pre.get("do_center_crop") and isinstance(crop, dict) and isinstance(size, dict) and size.get("height"):
            crop_pct = crop.get("height", size["height"]) / size["height"]
        elif "do_center_crop" in pre and not pre["do_center_crop"]:
            crop_pct = 1.0
    else:
        notes.append(f"{path.name} has no preprocessor_config.json: mean/std {tuple(mean)}/{tuple(std)} assumed "
                     f"(the {model_type} image processor's defaults)")
    in_chans = kwargs["in_chans"]
    if len(mean) != in_chans:
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    set_data_config(model, mean=mean, std=std, interpolation=interpolation, crop_pct=crop_pct)
    model.vitshrink_notes = [n for n in model.vitshrink_notes if "mean/std" not in n]
    id2label = config.get("id2label") or {}
    labels = [id2label.get(str(i), id2label.get(i)) for i in range(kwargs["num_classes"])]
    if labels and all(isinstance(x, str) for x in labels) and labels != [f"LABEL_{i}" for i in range(len(labels))]:
        model.vitshrink_meta = {"class_names": labels, "provenance": {"converted_from": f"transformers {model_type}"}}
    return model


def _read_hf_weights(path: Path, notes: list[str]) -> dict[str, torch.Tensor]:
    single = [path / "model.safetensors", path / "pytorch_model.bin"]
    for file in single:
        if file.is_file():
            return _read_safetensors(file)[0] if file.suffix == ".safetensors" else _read_torch_state_dict(file, notes)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError) as exc:
                raise UserError(f"{index}: damaged shard index ({_one_line(exc)})") from None
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                file = path / shard
                if not file.is_file():
                    raise UserError(f"{file}: shard listed in {index_name} is missing")
                state.update(_read_safetensors(file)[0] if file.suffix == ".safetensors"
                             else _read_torch_state_dict(file, notes))
            return state
    raise UserError(f"{path}: no weights found (expected model.safetensors or pytorch_model.bin next to config.json)")


# One transformer layer: HF name (classic and transformers-5 module names) -> timm name.
_HF_LAYER_MAP = {
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2", "mlp.fc2": "mlp.fc2",
    "layernorm_before": "norm1", "layernorm_after": "norm2",
}
_HF_QKV = {"attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
           "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v"}
_HF_TOP_MAP = {
    "embeddings.cls_token": "cls_token", "embeddings.distillation_token": "dist_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
}


def _hf_to_timm(hf_state: dict[str, torch.Tensor], config: dict[str, Any], model_type: str, path: Path,
                notes: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Rename an HF ViT/DeiT state dict to timm's VisionTransformer layout (q, k, v fused into qkv)."""
    base = f"{model_type}."
    state: dict[str, torch.Tensor] = {}
    qkv_parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    heads: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, tensor in hf_state.items():
        inner = key[len(base):] if key.startswith(base) else key
        if inner in _HF_TOP_MAP:
            state[_HF_TOP_MAP[inner]] = tensor
            continue
        head = re.fullmatch(r"(classifier|cls_classifier|distillation_classifier)\.(weight|bias)", inner)
        if head:
            heads[inner] = tensor
            continue
        if inner.startswith(("pooler.", "embeddings.mask_token")):
            ignored.append(inner)  # not used for classification logits
            continue
        layer = re.fullmatch(r"(?:encoder\.)?layers?\.(\d+)\.(.+)\.(weight|bias)", inner)
        if layer:
            index, module, kind = int(layer.group(1)), layer.group(2), layer.group(3)
            if module in _HF_QKV:
                qkv_parts.setdefault((index, kind), {})[_HF_QKV[module]] = tensor
                continue
            if module in _HF_LAYER_MAP:
                state[f"blocks.{index}.{_HF_LAYER_MAP[module]}.{kind}"] = tensor
                continue
        raise UserError(f"{path}: tensor {key} has no timm VisionTransformer equivalent (unsupported {model_type} variant)")
    for (index, kind), parts in qkv_parts.items():
        if set(parts) != {"q", "k", "v"}:
            raise UserError(f"{path}: layer {index} lacks {sorted({'q', 'k', 'v'} - set(parts))} {kind}")
        state[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if ignored:
        notes.append(f"{path.name}: ignored {len(ignored)} tensors not used for classification "
                     f"({', '.join(sorted({k.split('.')[0] for k in ignored}))})")

    try:
        hidden, depth, num_heads = int(config["hidden_size"]), int(config["num_hidden_layers"]), int(config["num_attention_heads"])
        kwargs: dict[str, Any] = {
            "img_size": int(_first(config.get("image_size", 224))),
            "patch_size": int(_first(config.get("patch_size", 16))),
            "in_chans": int(config.get("num_channels", 3)),
            "embed_dim": hidden, "depth": depth, "num_heads": num_heads,
            "mlp_ratio": int(config.get("intermediate_size", 4 * hidden)) / hidden,
            "qkv_bias": bool(config.get("qkv_bias", True)),
            "norm_eps": float(config.get("layer_norm_eps", 1e-12)),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path / 'config.json'}: incomplete {model_type} config ({_one_line(exc)})") from None
    act = config.get("hidden_act", "gelu")
    if act not in HF_ACTIVATIONS:
        raise UserError(f"{path / 'config.json'}: hidden_act {act!r} has no timm equivalent")
    if HF_ACTIVATIONS[act] is not None:
        kwargs["act_layer"] = HF_ACTIVATIONS[act]
    distilled = "dist_token" in state
    name = "deit_base_distilled_patch16_224" if distilled else "vit_base_patch16_224"

    if "cls_classifier.weight" in heads:  # DeiTForImageClassificationWithTeacher: the two heads are averaged
        state["head.weight"], state["head.bias"] = heads["cls_classifier.weight"], heads["cls_classifier.bias"]
        state["head_dist.weight"] = heads["distillation_classifier.weight"]
        state["head_dist.bias"] = heads["distillation_classifier.bias"]
    elif "classifier.weight" in heads:
        weight, bias = heads["classifier.weight"], heads["classifier.bias"]
        if distilled:
            # DeiTForImageClassification reads only the class token, while timm's distilled ViT averages
            # head(cls) and head_dist(dist): a doubled head and a zero head_dist give exactly head(cls).
            state["head.weight"], state["head.bias"] = 2 * weight, 2 * bias
            state["head_dist.weight"], state["head_dist.bias"] = torch.zeros_like(weight), torch.zeros_like(bias)
            notes.append(f"{path.name}: DeiT classifier on the class token only; converted to timm's distilled ViT "
                         f"with head doubled and head_dist zero (same logits in eval mode)")
        else:
            state["head.weight"], state["head.bias"] = weight, bias
    kwargs["num_classes"] = int(state["head.weight"].shape[0]) if "head.weight" in state else 0
    if kwargs["num_classes"] == 0:
        notes.append(f"{path.name} has no classifier head: the model outputs {hidden}-dim features")
    return state, kwargs, name


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) else value
