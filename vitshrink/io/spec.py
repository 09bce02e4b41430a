"""Load a model from any SPEC: a timm name, a vitshrink or foreign ``.safetensors``, a ``.pt`` state dict
(weights-only), or a Hugging Face ViT/DeiT directory. Every model returned carries its ``ModelRecord``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from vitshrink.errors import UserError
from vitshrink.io.foreign import check_assume, model_from_foreign_state
from vitshrink.io.hf import load_hf_directory
from vitshrink.io.layouts import apply_key_map
from vitshrink.io.readers import TORCH_SUFFIXES, read_safetensors, read_torch_state_dict
from vitshrink.io.record import (METADATA_KEY, ModelRecord, create_model, data_config, model_from_record,
                                 record_of, set_data_config)
from vitshrink.io.weights import (check_sizes_against_state, check_state, create_checked, first,
                                  load_state_checked, probe, require_timm_name, resample_pos_embed)


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
    key_map: Sequence[str] | None = None,
    norm_eps: float | None = None,
    assume: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Load a model from a SPEC, in eval mode on CPU.

    SPEC is one of:
      * a timm model name (random weights unless ``pretrained``; the other kwargs are passed to timm);
      * a ``.safetensors`` file: one saved by vitshrink needs nothing else, a foreign one needs ``arch``;
      * a ``.pt/.pth/.th/.bin`` state dict (read with ``weights_only=True`` only), which needs ``arch``;
      * a Hugging Face transformers ViT/DeiT directory (``config.json`` + weights), converted to timm.

    ``img_size`` different from the checkpoint's resamples the position embeddings; ``mean``/``std``
    override the preprocessing recorded with the model. ``key_map`` (``REGEX=REPLACEMENT`` rules) renames the
    file's tensors before anything else; ``norm_eps`` sets the LayerNorm epsilon. Foreign ViT layouts
    (torchvision, vit-pytorch, hand-written q/k/v or Sequential MLPs, timm's ``checkpoint_filter_fn``
    formats) are converted to timm's layout (``vitshrink.io.layouts``), with a note naming the layout.
    ``record_of(model)`` holds how to rebuild it (so ``save_model`` can write it again) and ``notes``:
    what was assumed, one line each. ``assume`` states what a foreign layout's tensors cannot tell, in place
    of the layout's defaults (each one otherwise named in a note): ``norm_placement`` ("pre"/"post"),
    ``act_layer`` and ``head_act`` (timm activation names), ``head_softmax`` (the head ends in softmax) and
    ``fc_norm`` (True: the final norm comes after the average pooling).
    """
    if norm_eps is not None and not (isinstance(norm_eps, (int, float)) and 0 < norm_eps < 1):
        raise UserError(f"--norm-eps must be a number in (0, 1), got {norm_eps!r}")
    options = {"arch": arch, "num_heads": num_heads, "img_size": img_size, "in_chans": in_chans,
               "num_classes": num_classes, "key_map": list(key_map or []), "norm_eps": norm_eps,
               "assume": check_assume(assume)}
    spec_str = str(spec)
    path = Path(spec_str).expanduser()
    notes: list[str] = []
    if path.is_dir():
        model = load_hf_directory(path, options, notes)
    elif path.suffix.lower() == ".safetensors" or path.suffix.lower() in TORCH_SUFFIXES:
        if not path.is_file():
            raise UserError(f"{spec_str}: file not found")
        if path.suffix.lower() == ".safetensors":
            state, metadata = read_safetensors(path)
        else:
            state, metadata = read_torch_state_dict(path, notes), {}
        state = apply_key_map(state, options["key_map"], spec_str)
        if METADATA_KEY in metadata:
            if options["assume"]:
                notes.append(f"assume={options['assume']} ignored: {path.name} records its architecture")
            model = _model_from_vitshrink_file(path, state, metadata[METADATA_KEY], options, notes)
        else:
            model = model_from_foreign_state(path, state, options, notes)
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
    record = record_of(model)
    record.notes = list(record.notes) + notes
    if mean is not None or std is not None:
        channels = int(data_config(model)["input_size"][0])
        for flag, values in (("mean", mean), ("std", std)):
            if values is not None and len(values) not in (1, channels):
                raise UserError(f"--{flag}: {len(values)} values given but the model takes {channels} channels")
        set_data_config(model, mean=mean, std=std)
        # A note about assumed mean/std no longer applies once the user set them.
        record.notes = [n for n in record.notes if "mean/std" not in n]
    model.cpu().eval()
    return model


# --- timm names ----------------------------------------------------------------------------

def _model_from_timm_name(name: str, options: dict[str, Any], pretrained: bool, notes: list[str]) -> nn.Module:
    require_timm_name(name, "timm model name (and no such file)")
    kwargs = {k: options[k] for k in ("img_size", "in_chans", "num_classes", "num_heads", "norm_eps")
              if options[k] is not None}
    if options["key_map"]:
        notes.append(f"--key-map ignored: SPEC {name} is a timm model name, not a file")
    if options["arch"] is not None and options["arch"] != name:
        notes.append(f"arch={options['arch']} ignored: SPEC {name} is itself a timm model name")
    img_size = kwargs.get("img_size")
    if img_size is not None and not hasattr(probe(name), "patch_embed"):
        # CNNs take any input size: for them the size is preprocessing, not architecture.
        kwargs.pop("img_size")
    if pretrained:
        model = _create_pretrained(name, kwargs)
    else:
        model = create_checked(name, kwargs, source=name)
    if img_size is not None and "img_size" not in kwargs:
        set_data_config(model, input_size=(data_config(model)["input_size"][0], img_size, img_size), crop_pct=1.0)
    return model


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
        where = ("could not be downloaded" if allow_download
                 else "are not in the local cache (vitshrink does not download)")
        raise UserError(
            f"{name}: pretrained weights {where} ({type(exc).__name__}); download the checkpoint yourself and "
            f"pass the local file as SPEC with --arch {name} (a .safetensors or .pt state dict)"
        ) from None
    finally:
        hub_constants.HF_HUB_OFFLINE = saved


# --- vitshrink files -----------------------------------------------------------------------

def _model_from_vitshrink_file(path: Path, state: dict[str, torch.Tensor], record_json: str,
                               options: dict[str, Any], notes: list[str]) -> nn.Module:
    """A file saved by ``save_model``: its record is validated, checked against the tensors, then built."""
    record = ModelRecord.from_json(record_json, path)
    name, kwargs = record.name, dict(record.kwargs)
    if options["arch"] is not None and options["arch"] != name:
        notes.append(f"arch={options['arch']} ignored: {path.name} records its architecture ({name})")
    for key in ("num_heads", "in_chans", "num_classes"):
        if options[key] is not None and key in kwargs and kwargs[key] != options[key]:
            raise UserError(f"{path}: the file's model has {key}={kwargs[key]} but {key}={options[key]} was asked")
    check_sizes_against_state(f"{path}: architecture record", kwargs, state)
    if options["norm_eps"] is not None:
        kwargs["norm_eps"] = options["norm_eps"]
        record.kwargs = kwargs
    img_size = options["img_size"]
    input_size = list(record.data.get("input_size") or [None, None, None])
    if img_size is not None and input_size[1:] != [img_size, img_size]:
        if "pos_embed" in state:
            kwargs["img_size"] = img_size
            record.kwargs = kwargs
        record.data["input_size"] = [input_size[0] or 3, img_size, img_size]
    require_timm_name(name, f"model in {path.name}'s record (is a vitshrink model module missing?)")
    # The record's sizes against the tensors on a meta build first: nothing is allocated for a wrong record.
    shell = _meta_build(record, path)
    if shell is not None:
        expected = shell.state_dict()
        if (img_size is not None and "pos_embed" in state and "pos_embed" in expected
                and state["pos_embed"].shape != expected["pos_embed"].shape):
            state = resample_pos_embed(state, int(img_size), int(first(shell.patch_embed.patch_size)),
                                       bool(getattr(shell, "no_embed_class", False)), path)
        check_state(expected, state, path, name)
    try:
        model = model_from_record(record, path)
    except (TypeError, AssertionError, ValueError, RuntimeError, IndexError, KeyError) as exc:
        raise UserError(f"{path}: cannot rebuild {name} from its record ({type(exc).__name__}: {exc})") from None
    for key in ("num_classes", "in_chans"):
        if options[key] is not None and getattr(model, key, options[key]) != options[key]:
            raise UserError(f"{path}: the file's model has {key}={getattr(model, key)} but {key}={options[key]} "
                            f"was asked")
    load_state_checked(model, state, path, name)
    return model


def _meta_build(record: ModelRecord, path: Path) -> nn.Module | None:
    try:
        with torch.device("meta"):
            return create_model(record.name, **record.kwargs)
    except (TypeError, AssertionError, ValueError, IndexError, KeyError) as exc:
        raise UserError(f"{path}: cannot rebuild {record.name} from its record ({type(exc).__name__}: {exc})") from None
    except Exception:  # a constructor that needs real tensors: the real build reports any fault
        return None
