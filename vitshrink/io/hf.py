"""Hugging Face transformers ViT / DeiT directories (``config.json`` + weights), converted to timm's layout.

transformers is never imported: the state dict is renamed (q, k, v fused into qkv) and the config's
fields, each checked for type and range first, become timm ``VisionTransformer`` kwargs.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitshrink.errors import UserError
from vitshrink.io.fields import check_bool, check_float, check_image_size, check_int, check_vector
from vitshrink.io.layouts import apply_key_map
from vitshrink.io.readers import one_line, read_safetensors, read_torch_state_dict
from vitshrink.io.record import MIN_CROP_PCT, record_of, set_data_config
from vitshrink.io.weights import build_and_load, check_sizes_against_state, first, resample_pos_embed
from vitshrink.validate import contained

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


def load_hf_directory(path: Path, options: dict[str, Any], notes: list[str]) -> nn.Module:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(f"{path}: a directory SPEC must be a Hugging Face checkpoint (config.json + "
                        f"model.safetensors or pytorch_model.bin); config.json is missing")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise UserError(f"{config_path}: not readable JSON ({one_line(exc)})") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type not in ("vit", "deit"):
        raise UserError(f"{config_path}: model_type {model_type!r} is not supported (vit and deit are)")
    hf_state = apply_key_map(_read_hf_weights(path, notes), options["key_map"], str(path))
    state, kwargs, name = _hf_to_timm(hf_state, config, model_type, path, notes)
    if options["arch"] is not None:
        notes.append(f"arch={options['arch']} ignored: {path.name}/config.json describes the architecture")
    for key in ("num_heads", "in_chans", "num_classes"):
        if options[key] is not None and options[key] != kwargs[key]:
            raise UserError(f"{config_path}: the checkpoint has {key}={kwargs[key]} but {key}={options[key]} was asked")
    if options["norm_eps"] is not None:
        kwargs["norm_eps"] = options["norm_eps"]
    if options["img_size"] is not None and options["img_size"] != kwargs["img_size"]:
        state = resample_pos_embed(state, options["img_size"], kwargs["patch_size"], False, path)
        kwargs["img_size"] = options["img_size"]
    model = build_and_load(name, kwargs, state, path, f"{name} (converted from {model_type})")

    mean, std, interpolation, crop_pct = _preprocessing(path, model_type, kwargs["in_chans"], notes)
    set_data_config(model, mean=mean, std=std, interpolation=interpolation, crop_pct=crop_pct)
    record = record_of(model)
    record.notes = [n for n in record.notes if "mean/std" not in n]
    record.provenance = {"converted_from": f"transformers {model_type}"}
    id2label = config.get("id2label") or {}
    if isinstance(id2label, dict):
        labels = [id2label.get(str(i), id2label.get(i)) for i in range(kwargs["num_classes"])]
        if labels and all(isinstance(x, str) for x in labels) and labels != [f"LABEL_{i}" for i in range(len(labels))]:
            record.class_names = labels
    return model


def _preprocessing(path: Path, model_type: str, in_chans: int,
                   notes: list[str]) -> tuple[list[float], list[float], str, float]:
    """mean, std, interpolation and crop_pct from preprocessor_config.json (the processor's defaults without it)."""
    mean, std = HF_DEFAULT_NORM[model_type]
    interpolation, crop_pct = HF_DEFAULT_RESIZE[model_type]
    preprocessor = path / "preprocessor_config.json"
    if preprocessor.is_file():
        try:
            pre = json.loads(preprocessor.read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise UserError(f"{preprocessor}: not readable JSON ({one_line(exc)})") from None
        if not isinstance(pre, dict):
            raise UserError(f"{preprocessor}: expected a JSON object, got {type(pre).__name__}")
        mean = check_vector(str(preprocessor), "image_mean", pre.get("image_mean", mean), "float", -1e6, 1e6)
        std = check_vector(str(preprocessor), "image_std", pre.get("image_std", std), "float", 1e-12, 1e6)
        resample = pre.get("resample")
        interpolation = HF_INTERPOLATION.get(resample, interpolation) if isinstance(resample, int) else interpolation
        crop, size = pre.get("crop_size"), pre.get("size")
        if pre.get("do_center_crop") and isinstance(crop, dict) and isinstance(size, dict) and size.get("height"):
            height = check_int(str(preprocessor), "size.height", size["height"], 1, 4096)
            low = max(1, math.ceil(MIN_CROP_PCT * height))  # resizing to height / crop_pct must stay bounded
            crop_pct = check_int(str(preprocessor), "crop_size.height", crop.get("height", height), low, height) / height
        elif "do_center_crop" in pre and not pre["do_center_crop"]:
            crop_pct = 1.0
    else:
        notes.append(f"{path.name} has no preprocessor_config.json: mean/std {tuple(mean)}/{tuple(std)} assumed "
                     f"(the {model_type} image processor's defaults)")
    if len(mean) != in_chans:
        mean = [sum(mean) / len(mean)] * in_chans
    if len(std) != in_chans:
        std = [sum(std) / len(std)] * in_chans
    return list(mean), list(std), interpolation, crop_pct


def _read_hf_weights(path: Path, notes: list[str]) -> dict[str, torch.Tensor]:
    single = [path / "model.safetensors", path / "pytorch_model.bin"]
    for file in single:
        if file.is_file():
            return read_safetensors(file)[0] if file.suffix == ".safetensors" else read_torch_state_dict(file, notes)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
                raise UserError(f"{index}: damaged shard index ({type(exc).__name__}: {one_line(exc)})") from None
            if not all(isinstance(shard, str) for shard in shards):
                raise UserError(f"{index}: damaged shard index (a shard name is not a string)")
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                file = contained(path, shard, str(index))  # a shard name is a path read back from a file
                if not file.is_file():
                    raise UserError(f"{file}: shard listed in {index_name} is missing")
                state.update(read_safetensors(file)[0] if file.suffix == ".safetensors"
                             else read_torch_state_dict(file, notes))
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
        raise UserError(f"{path}: tensor {key} has no timm VisionTransformer equivalent "
                        f"(unsupported {model_type} variant)")
    for (index, kind), parts in qkv_parts.items():
        if set(parts) != {"q", "k", "v"}:
            raise UserError(f"{path}: layer {index} lacks {sorted({'q', 'k', 'v'} - set(parts))} {kind}")
        state[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if ignored:
        notes.append(f"{path.name}: ignored {len(ignored)} tensors not used for classification "
                     f"({', '.join(sorted({k.split('.')[0] for k in ignored}))})")

    kwargs = _config_kwargs(config, path / "config.json")
    hidden = kwargs["embed_dim"]
    check_sizes_against_state(f"{path / 'config.json'}", kwargs, state)
    act = config.get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in HF_ACTIVATIONS:
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


def _config_kwargs(config: dict[str, Any], where: Path) -> dict[str, Any]:
    """timm kwargs from an HF ViT config, each field checked for type and range first."""
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        if key not in config:
            raise UserError(f"{where}: incomplete config (no field {key})")
    label = str(where)
    hidden = check_int(label, "hidden_size", config["hidden_size"], 1, 16384)
    depth = check_int(label, "num_hidden_layers", config["num_hidden_layers"], 1, 512)
    num_heads = check_int(label, "num_attention_heads", config["num_attention_heads"], 1, 1024)
    if hidden % num_heads:
        raise UserError(f"{where}: num_attention_heads={num_heads} does not divide hidden_size={hidden}")
    img_size = first(check_image_size(label, "image_size", config.get("image_size", 224), 1, 4096))
    patch_size = first(check_image_size(label, "patch_size", config.get("patch_size", 16), 1, 1024))
    if patch_size > img_size:
        raise UserError(f"{where}: patch_size={patch_size} is larger than image_size={img_size}")
    intermediate = check_int(label, "intermediate_size", config.get("intermediate_size", 4 * hidden), 1, 262144)
    return {
        "img_size": img_size, "patch_size": patch_size,
        "in_chans": check_int(label, "num_channels", config.get("num_channels", 3), 1, 64),
        "embed_dim": hidden, "depth": depth, "num_heads": num_heads, "mlp_ratio": intermediate / hidden,
        "qkv_bias": check_bool(label, "qkv_bias", config.get("qkv_bias", True)),
        "norm_eps": check_float(label, "layer_norm_eps", config.get("layer_norm_eps", 1e-12), 1e-30, 1.0),
    }
