"""Foreign state dicts (no vitshrink record): the timm kwargs read off the tensor shapes.

A foreign ``.safetensors`` or ``.pt`` state dict needs ``arch`` (a timm name); everything the shapes
reveal (width, depth, patch size, classes, image size, channels, prefix tokens) is inferred. What had
to be assumed instead (e.g. the number of attention heads, which no shape reveals) goes into ``notes``.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from torch import nn

from vitshrink.errors import UserError
from vitshrink.io.layouts import Layout, convert_layout
from vitshrink.io.record import data_config, set_data_config
from vitshrink.io.weights import (build_and_load, create_checked, first, is_vision_transformer, probe,
                                  require_timm_name, resize_rel_pos_tables,
                                  resample_pos_embed)


# A generic ViT to build a recognised foreign layout into when no --arch is given: every size is inferred.
DEFAULT_VIT_ARCH = "vit_base_patch16_224"


def model_from_foreign_state(path: Path, state: dict[str, torch.Tensor], options: dict[str, Any],
                             notes: list[str]) -> nn.Module:
    arch = options["arch"]
    arch_was_inferred = False
    layout = None
    if arch is None or _is_vit_arch(arch):
        layout = convert_layout(state, options.get("in_chans"))
        if layout.name and "cls_token" not in layout.state and "norm.weight" in layout.state:
            layout.assume("fc_norm", False, "the final norm before the average pooling")
        given = {"norm_eps": options["norm_eps"]} if options["norm_eps"] is not None else {}
        _apply_assume(layout, {**(options.get("assume") or {}), **given})
        if arch is None and layout.name is not None:
            arch, arch_was_inferred = DEFAULT_VIT_ARCH, True
            notes.append(f"--arch {arch} assumed (a {layout.name}; every size is read from the tensors)")
    if arch is None:
        raise UserError(f"{path}: a foreign checkpoint (not saved by vitshrink) needs --arch NAME, the timm "
                        f"model it was trained as (e.g. vit_small_patch16_224)")
    require_timm_name(arch, "arch")
    arch_probe = probe(arch)
    if layout is not None:
        if "patch_embed.proj.weight" not in layout.state:
            _timm_filter(layout, arch, notes)
        state = layout.state
        if layout.note():
            notes.append(layout.note())
        if layout.assumption_note():
            notes.append(layout.assumption_note())
    if is_vision_transformer(arch_probe) and "patch_embed.proj.weight" in state:
        kwargs = vit_kwargs_from_state(state, arch_probe, arch, options, path, notes,
                                       layout.kwargs if layout is not None else {})
    else:
        kwargs = generic_kwargs_from_state(state, arch_probe, options)
    if options["norm_eps"] is not None:
        kwargs["norm_eps"] = options["norm_eps"]
    checkpoint_img = kwargs.get("img_size")
    if options["img_size"] is not None and not is_vision_transformer(arch_probe) and hasattr(arch_probe, "patch_embed"):
        # EVA-02 / RoPE / BEiT: rebuilt at the new size (pos_embed resampled below, relative-position tables here)
        kwargs["patch_size"] = kwargs.get("patch_size") or int(first(arch_probe.patch_embed.patch_size))
        kwargs["img_size"] = options["img_size"]
        state = resize_rel_pos_tables(state, create_checked(arch, kwargs, path, meta=True), path)
    if options["img_size"] is not None and "pos_embed" in state and checkpoint_img != options["img_size"]:
        no_embed_class = kwargs.get("no_embed_class", bool(getattr(arch_probe, "no_embed_class", False)))
        state = resample_pos_embed(state, options["img_size"], kwargs["patch_size"], no_embed_class, path)
        kwargs["img_size"] = options["img_size"]
    # timm's own ViT where it expresses the model (pre-norm, no head variant): vitshrink_vit only where needed.
    defaults = {"norm_placement": "pre", "shared_norm": False, "head_hidden": 0, "head_softmax": False,
                "fixed_pos_embed": False}
    kwargs = {k: v for k, v in kwargs.items() if k not in defaults or v != defaults[k]}
    if "head_hidden" not in kwargs:
        kwargs.pop("head_act", None)
    if "attn_width" in kwargs or any(k in kwargs for k in VITSHRINK_VARIANTS):
        arch = "vitshrink_vit"
        kwargs = blockwise_kwargs(kwargs, state)
    model = build_and_load(arch, kwargs, state, path, arch)
    if layout is not None and layout.data:
        set_data_config(model, **layout.data)
    # A state dict never records its input normalisation: whatever is used is an assumption, said so.
    cfg = data_config(model)
    where = f"{layout.name}'s usual" if layout is not None and layout.data else f"{arch}'s defaults"
    notes.append(f"mean/std {tuple(round(v, 4) for v in cfg['mean'])}/{tuple(round(v, 4) for v in cfg['std'])} "
                 f"assumed ({where}; the checkpoint records none): pass --mean/--std, or --resolve with --data to "
                 f"decide it by behaviour")
    if options["img_size"] is not None and "img_size" not in kwargs:
        set_data_config(model, input_size=(data_config(model)["input_size"][0], options["img_size"],
                                           options["img_size"]), crop_pct=1.0)
    return model


# vitshrink_vit's own kwargs: a layout that needs one is built as vitshrink_vit (timm's ViT has no such option).
VITSHRINK_VARIANTS = ("norm_placement", "shared_norm", "head_hidden", "head_act", "head_softmax", "fixed_pos_embed")
# What the caller may state for a foreign layout (``load_model(assume=...)``): what no tensor shape tells.
ASSUMABLE = {"norm_placement": ("pre", "post"), "act_layer": None, "head_act": None, "head_softmax": (True, False),
             "fc_norm": (True, False)}


def check_assume(assume: Mapping[str, Any] | None) -> dict[str, Any]:
    """``assume`` keys and values checked (one-line ``UserError``), as a plain dict."""
    from timm.layers import get_act_layer

    checked = dict(assume or {})
    for key, value in checked.items():
        if key not in ASSUMABLE:
            raise UserError(f"assume: unknown setting {key!r} (known: {', '.join(ASSUMABLE)})")
        choices = ASSUMABLE[key]
        if choices is None:
            try:
                get_act_layer(value)
            except Exception:
                value = None
            if not isinstance(value, str):
                raise UserError(f"assume: {key} must be a timm activation name (gelu, relu, silu, ...), "
                                f"got {checked[key]!r}")
        elif value not in choices or type(value) is not type(choices[0]):
            raise UserError(f"assume: {key} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return checked


def _apply_assume(layout: Layout, assume: dict[str, Any]) -> None:
    """The caller's values replace the layout's assumptions (and are no longer reported as assumed)."""
    for key, value in assume.items():
        layout.assumed = [a for a in layout.assumed if a[0] != key]
        if key == "fc_norm":  # where the final norm sits is where its tensors go
            layout.kwargs.pop("fc_norm", None)
            old, new = ("norm.", "fc_norm.") if value else ("fc_norm.", "norm.")
            if not any(k.startswith(new) for k in layout.state):
                layout.state = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in layout.state.items()}
            continue
        layout.kwargs[key] = value


def _is_vit_arch(arch: str) -> bool:
    try:
        require_timm_name(arch, "arch")
    except UserError:
        return False
    return is_vision_transformer(probe(arch))


def _timm_filter(layout: Layout, arch: str, notes: list[str]) -> None:
    """timm's own ``checkpoint_filter_fn`` (OpenAI CLIP, OpenCLIP, DINOv2, ... formats), when it yields a ViT."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    # The shell has the file's patch size and no position embedding: the filter would otherwise resample
    # both to the arch's defaults.
    patch = next((int(v.shape[-1]) for v in layout.state.values() if v.dim() == 4), None)
    shell_kwargs = {"pos_embed": "none", **({"patch_size": patch} if patch else {})}
    try:
        with torch.device("meta"):
            shell = timm.create_model(arch, **shell_kwargs)
        converted = checkpoint_filter_fn(dict(layout.state), shell)
    except Exception:  # a layout the filter does not know: the mismatch report explains what is left
        return
    if "patch_embed.proj.weight" in converted and converted["patch_embed.proj.weight"].device.type != "meta":
        layout.state = dict(converted)
        layout.name = layout.name or f"a format timm's checkpoint_filter_fn converts for {arch}"


def vit_kwargs_from_state(state: dict[str, torch.Tensor], arch_probe: nn.Module, arch: str,
                          options: dict[str, Any], path: Path, notes: list[str],
                          layout_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """timm VisionTransformer kwargs read off the tensor shapes (timm's key layout)."""
    embed_dim, chans, patch_h = _patch_geometry(state, options, path, layout_kwargs or {})
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise UserError(f"{path}: no transformer blocks (blocks.N.*) found for arch {arch}")
    has_cls = "cls_token" in state
    reg_tokens = int(state["reg_token"].shape[1]) if "reg_token" in state and state["reg_token"].dim() == 3 else 0
    num_prefix = int(has_cls) + reg_tokens + int("dist_token" in state)
    kwargs: dict[str, Any] = {"embed_dim": embed_dim, "depth": depth, "patch_size": patch_h, "in_chans": chans,
                              **(layout_kwargs or {})}

    if "pos_embed" in state:
        pos_embed = state["pos_embed"]
        if pos_embed.dim() != 3 or int(pos_embed.shape[-1]) != embed_dim:
            raise UserError(f"{path}: pos_embed has shape {tuple(pos_embed.shape)}, expected (1, tokens, "
                            f"{embed_dim})")
        length = int(pos_embed.shape[1])
        grid = math.isqrt(max(length - num_prefix, 0))
        no_embed_class = False
        if grid * grid != length - num_prefix:
            grid, no_embed_class = math.isqrt(length), True
            if grid * grid != length:
                raise UserError(f"{path}: pos_embed has {length} tokens, not a square grid plus {num_prefix} "
                                f"prefix tokens")
        kwargs["img_size"] = grid * patch_h
        if no_embed_class != bool(getattr(arch_probe, "no_embed_class", False)):
            kwargs["no_embed_class"] = no_embed_class
    else:
        kwargs["img_size"] = int(getattr(arch_probe.patch_embed, "img_size", (224, 224))[0])
        kwargs["pos_embed"] = "none"
        notes.append(f"{path.name} has no position embedding: image size {kwargs['img_size']} assumed from {arch}")
    if has_cls != bool(getattr(arch_probe, "has_class_token", True)):
        kwargs["class_token"] = has_cls
    if reg_tokens:
        kwargs["reg_tokens"] = reg_tokens
    kwargs.update(_block_kwargs(state, embed_dim))
    kwargs.update(_pool_and_head_kwargs(state, arch_probe, has_cls, embed_dim, path, notes))

    for key in ("in_chans", "num_classes"):
        if options[key] is not None and key in kwargs and options[key] != kwargs[key]:
            raise UserError(f"{path}: the checkpoint has {key}={kwargs[key]} but {key}={options[key]} was asked")
    qkv = state.get("blocks.0.attn.qkv.weight")
    attn_width = int(qkv.shape[0]) // 3 if qkv is not None and qkv.dim() == 2 else embed_dim
    asked_heads = options["num_heads"] if options["num_heads"] is not None else (layout_kwargs or {}).get("num_heads")
    kwargs["num_heads"] = choose_num_heads(attn_width, arch_probe, arch, asked_heads, path, notes,
                                           head_dim=64 if layout_kwargs and "patch_embed" in layout_kwargs else None)
    if attn_width != embed_dim:
        kwargs["attn_width"] = attn_width  # read by blockwise_kwargs
    return kwargs


def blockwise_kwargs(kwargs: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``vitshrink_vit`` kwargs for a ViT whose attention width (heads x head dim) differs from its width."""
    kwargs = dict(kwargs)
    depth, heads = kwargs.pop("depth"), kwargs.pop("num_heads")
    attn_width = kwargs.pop("attn_width", kwargs["embed_dim"])
    kwargs.pop("mlp_ratio", None)
    hidden = [int(state[f"blocks.{i}.mlp.fc1.weight"].shape[0]) if f"blocks.{i}.mlp.fc1.weight" in state else 0
              for i in range(depth)]
    return {**kwargs, "block_num_heads": [heads] * depth, "block_head_dims": [attn_width // heads] * depth,
            "block_mlp_hidden": hidden}


def _patch_geometry(state: dict[str, torch.Tensor], options: dict[str, Any], path: Path,
                    layout_kwargs: dict[str, Any]) -> tuple[int, int, int]:
    """(width, input channels, patch size) from the patch projection: a convolution, or vit-pytorch's Linear."""
    proj = state["patch_embed.proj.weight"]
    if layout_kwargs.get("patch_embed") == "pixel_norm" and proj.dim() == 2:
        embed_dim, patch_dim = (int(v) for v in proj.shape)
        chans_options = [options["in_chans"]] if options["in_chans"] else [3, 1, 4, 2]
        for chans in chans_options:
            patch = math.isqrt(patch_dim // chans)
            if patch * patch * chans == patch_dim:
                return embed_dim, chans, patch
        raise UserError(f"{path}: patch projection input {patch_dim} is not channels x patch x patch for "
                        f"{chans_options} channels; pass --in-chans")
    if proj.dim() != 4:
        raise UserError(f"{path}: patch_embed.proj.weight has shape {tuple(proj.shape)}, expected 4 dimensions")
    embed_dim, chans, patch_h, patch_w = (int(v) for v in proj.shape)
    if patch_h != patch_w:
        raise UserError(f"{path}: non-square patches ({patch_h}x{patch_w}) are not supported")
    return embed_dim, chans, patch_h


def _block_kwargs(state: dict[str, torch.Tensor], embed_dim: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
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
    return kwargs


def _pool_and_head_kwargs(state: dict[str, torch.Tensor], arch_probe: nn.Module, has_cls: bool, embed_dim: int,
                          path: Path, notes: list[str]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    has_fc_norm, has_norm = "fc_norm.weight" in state, "norm.weight" in state
    if any(k.startswith("attn_pool.") for k in state):
        kwargs["global_pool"] = "map"
    elif has_fc_norm or not has_cls:
        kwargs["global_pool"] = "avg" if arch_probe.global_pool in ("token", "map", "") else arch_probe.global_pool
    elif arch_probe.global_pool != "token":
        kwargs["global_pool"] = "token"
    kwargs["fc_norm"] = has_fc_norm
    if not has_fc_norm and not has_norm:
        kwargs["final_norm"] = False
    if "head.weight" in state:
        kwargs["num_classes"] = int(state["head.weight"].shape[0])
    elif not any(k.startswith("head.") for k in state):
        kwargs["num_classes"] = 0
        notes.append(f"{path.name} has no classifier head: the model outputs {embed_dim}-dim features")
    return kwargs


def choose_num_heads(embed_dim: int, arch_probe: nn.Module, arch: str, asked: int | None, path: Path,
                     notes: list[str], head_dim: int | None = None) -> int:
    """No tensor shape reveals the head count: take the user's, else the layout's head width, else the arch's,
    else 64-wide heads. This is only the stated prior: ``vitshrink.io.resolve`` decides by behaviour."""
    if asked is not None:
        if asked < 1 or embed_dim % asked:
            raise UserError(f"{path}: num_heads={asked} does not divide the attention width {embed_dim}")
        return int(asked)
    if head_dim is not None and embed_dim % head_dim == 0:
        notes.append(f"num_heads={embed_dim // head_dim} assumed ({head_dim}-wide heads, the layout's default; the "
                     f"checkpoint cannot tell): pass --num-heads, or --resolve with --data to decide it by behaviour")
        return embed_dim // head_dim
    default_heads = int(arch_probe.blocks[0].attn.num_heads)
    if int(arch_probe.embed_dim) == embed_dim:
        notes.append(f"num_heads={default_heads} assumed (timm default for {arch}; the checkpoint cannot tell): "
                     f"pass --num-heads, or --resolve with --data to decide it by behaviour")
        return default_heads
    heads = embed_dim // 64 if embed_dim % 64 == 0 else (default_heads if embed_dim % default_heads == 0 else 1)
    notes.append(f"num_heads={heads} assumed (width {embed_dim} differs from {arch}'s {arch_probe.embed_dim}; "
                 f"{embed_dim // heads}-wide heads): pass --num-heads, or --resolve with --data to decide it by "
                 f"behaviour")
    return heads


def generic_kwargs_from_state(state: dict[str, torch.Tensor], arch_probe: nn.Module,
                              options: dict[str, Any]) -> dict[str, Any]:
    """For non-ViT archs: only the class count and input channels, read from the classifier and stem."""
    kwargs: dict[str, Any] = {k: options[k] for k in ("in_chans", "num_classes") if options[k] is not None}
    expected = arch_probe.state_dict()
    classifier = (getattr(arch_probe, "pretrained_cfg", None) or {}).get("classifier")
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
