"""Foreign state dicts (no vitshrink record): the timm kwargs read off the tensor shapes.

A foreign ``.safetensors`` or ``.pt`` state dict needs ``arch`` (a timm name); everything the shapes
reveal (width, depth, patch size, classes, image size, channels, prefix tokens) is inferred. What had
to be assumed instead (e.g. the number of attention heads, which no shape reveals) goes into ``notes``.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitshrink.errors import UserError
from vitshrink.io.record import data_config, set_data_config
from vitshrink.io.weights import (build_and_load, is_vision_transformer, probe, require_timm_name,
                                  resample_pos_embed)


def model_from_foreign_state(path: Path, state: dict[str, torch.Tensor], options: dict[str, Any],
                             notes: list[str]) -> nn.Module:
    arch = options["arch"]
    if arch is None:
        raise UserError(f"{path}: a foreign checkpoint (not saved by vitshrink) needs --arch NAME, the timm "
                        f"model it was trained as (e.g. vit_small_patch16_224)")
    require_timm_name(arch, "arch")
    arch_probe = probe(arch)
    if is_vision_transformer(arch_probe) and "patch_embed.proj.weight" in state:
        kwargs = vit_kwargs_from_state(state, arch_probe, arch, options, path, notes)
    else:
        kwargs = generic_kwargs_from_state(state, arch_probe, options)
    checkpoint_img = kwargs.get("img_size")
    if options["img_size"] is not None and "pos_embed" in state and checkpoint_img != options["img_size"]:
        no_embed_class = kwargs.get("no_embed_class", bool(getattr(arch_probe, "no_embed_class", False)))
        state = resample_pos_embed(state, options["img_size"], kwargs["patch_size"], no_embed_class, path)
        kwargs["img_size"] = options["img_size"]
    model = build_and_load(arch, kwargs, state, path, arch)
    if options["img_size"] is not None and "img_size" not in kwargs:
        set_data_config(model, input_size=(data_config(model)["input_size"][0], options["img_size"],
                                           options["img_size"]), crop_pct=1.0)
    return model


def vit_kwargs_from_state(state: dict[str, torch.Tensor], arch_probe: nn.Module, arch: str,
                          options: dict[str, Any], path: Path, notes: list[str]) -> dict[str, Any]:
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
    reg_tokens = int(state["reg_token"].shape[1]) if "reg_token" in state and state["reg_token"].dim() == 3 else 0
    num_prefix = int(has_cls) + reg_tokens + int("dist_token" in state)
    kwargs: dict[str, Any] = {"embed_dim": embed_dim, "depth": depth, "patch_size": patch_h, "in_chans": chans}

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
    kwargs["num_heads"] = choose_num_heads(embed_dim, arch_probe, arch, options["num_heads"], path, notes)
    return kwargs


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
                     notes: list[str]) -> int:
    """No tensor shape reveals the head count: take the user's, else the arch's, else 64-wide heads."""
    if asked is not None:
        if asked < 1 or embed_dim % asked:
            raise UserError(f"{path}: num_heads={asked} does not divide the embedding width {embed_dim}")
        return int(asked)
    default_heads = int(arch_probe.blocks[0].attn.num_heads)
    if int(arch_probe.embed_dim) == embed_dim:
        notes.append(f"num_heads={default_heads} assumed (timm default for {arch}; the checkpoint cannot tell): "
                     f"pass --num-heads if it was trained with another count")
        return default_heads
    heads = embed_dim // 64 if embed_dim % 64 == 0 else (default_heads if embed_dim % default_heads == 0 else 1)
    notes.append(f"num_heads={heads} assumed (width {embed_dim} differs from {arch}'s {arch_probe.embed_dim}; "
                 f"{embed_dim // heads}-wide heads): pass --num-heads if it was trained with another count")
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
