"""Physical slicing of a ViT: fewer heads, narrower heads, fewer MLP units, fewer blocks.

Coupled tensors (what must be cut together so the function is preserved):

* an attention head ``h`` (or one of its dims ``d``) owns rows ``p*A + h*hd + d`` of ``attn.qkv``
  (weight and bias, for ``p`` = q, k, v; ``A = heads * hd``) and the same columns of ``attn.proj``;
  narrowing a head changes the softmax scale ``hd ** -0.5``, so the q rows are rescaled to keep
  ``q.k / sqrt(hd)`` exactly as it was;
* an MLP unit ``j`` owns row ``j`` of ``mlp.fc1`` (and its bias) and column ``j`` of ``mlp.fc2``;
* a whole branch (all heads, or all MLP units) goes with its norm, layer scale and output bias;
  a whole block goes with both branches.

The result is always a ``vitshrink_vit`` (``BlockwiseVisionTransformer``) built through
``vitshrink.io.create_model``, so ``save_model``/``load_model`` round-trip it. ``mask_vit`` builds
the *same function* without slicing (zeroed units in a copy of the source) — the reference that tests
and searches compare against. Which units to keep is not decided here: plans are data
(``vitshrink.prune.plan``), ranked by group norms (``vitshrink.prune.importance``) or searched
(``vitshrink.prune.uvc_search``).
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from timm.layers import LayerScale, Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from vitshrink.errors import UserError
from vitshrink.io import create_model, data_config, record_of, set_data_config
from vitshrink.models.blockwise_vit import BlockwiseVisionTransformer, SlimBlock
# Plans and group norms have their own homes; re-exported here because callers slice what they rank.
from vitshrink.prune.importance import head_dim_norms, head_norms, mlp_unit_norms, uniform_plan
from vitshrink.prune.plan import (BlockDims, BlockKeep, Plan, attn_index, block_dims, check_plan, full_plan,
                                  plan_from_json, plan_to_json)

__all__ = [
    "BlockKeep", "Plan", "BlockDims", "block_dims", "check_sliceable", "full_plan", "uniform_plan", "head_norms",
    "head_dim_norms", "mlp_unit_norms", "slice_vit", "drop_blocks", "mask_vit", "plan_to_json", "plan_from_json",
]


# --------------------------------------------------------------------------------------------------
# What a source model is


# Activation class names (torch's and timm's own) -> the timm ``get_act_layer`` name that rebuilds them.
_ACT_NAMES = {"GELU": "gelu", "GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu", "ReLU": "relu", "SiLU": "silu",
              "Swish": "swish", "Tanh": "tanh", "Sigmoid": "sigmoid"}


def _act_name(act: nn.Module, where: str) -> str:
    if isinstance(act, nn.GELU) and act.approximate == "tanh":
        return "gelu_tanh"
    name = _ACT_NAMES.get(type(act).__name__)
    if name is not None:
        return name
    raise UserError(f"cannot prune: {where} uses activation {type(act).__name__}, which vitshrink_vit cannot rebuild")


def check_sliceable(model: nn.Module) -> None:
    """Raise ``UserError`` (one line) unless ``model`` is a ViT that ``slice_vit`` can cut exactly."""
    if not isinstance(model, VisionTransformer):
        raise UserError(f"cannot prune {type(model).__name__}: structured pruning needs a timm VisionTransformer")
    if getattr(model, "dist_token", None) is not None:
        raise UserError("cannot prune a distilled (two-token) ViT; prune the teacher before adding the distillation token")
    if getattr(model, "attn_pool", None) is not None:
        raise UserError("cannot prune a ViT with an attention-pooling head (global_pool 'map'/'prr')")
    for i, blk in enumerate(model.blocks):
        where = f"blocks.{i}"
        if type(blk) not in (Block, SlimBlock):
            raise UserError(f"cannot prune: {where} is {type(blk).__name__}; only timm's pre-norm Block is supported")
        attn, mlp = blk.attn, blk.mlp
        if attn is not None:
            if type(attn) is not Attention:
                raise UserError(f"cannot prune: {where}.attn is {type(attn).__name__}, not timm's Attention")
            if not isinstance(attn.norm, nn.Identity) or getattr(attn, "gate", None) is not None:
                raise UserError(f"cannot prune: {where}.attn has a scale norm or gate, which slicing cannot preserve")
        if mlp is not None:
            if type(mlp) is not Mlp or not isinstance(mlp.fc1, nn.Linear):
                raise UserError(f"cannot prune: {where}.mlp is {type(mlp).__name__}, not timm's Mlp")
            if not isinstance(mlp.norm, nn.Identity):
                raise UserError(f"cannot prune: {where}.mlp has a hidden-layer norm, which slicing cannot preserve")
            _act_name(mlp.act, f"{where}.mlp")
        for name in ("norm1", "norm2"):
            norm = getattr(blk, name, None)
            if norm is not None and type(norm) is not nn.LayerNorm and not isinstance(norm, nn.LayerNorm):
                raise UserError(f"cannot prune: {where}.{name} is {type(norm).__name__}; only LayerNorm is supported")


def _source_kept_blocks(model: nn.Module) -> list[int]:
    return list(getattr(model, "kept_blocks", None) or range(len(model.blocks)))


def _arch_kwargs(model: VisionTransformer) -> dict[str, Any]:
    """The ``vitshrink_vit`` kwargs (minus per-block dims) that rebuild ``model``'s non-block parts."""
    pe = model.patch_embed
    blocks = list(model.blocks)
    attn = next((b.attn for b in blocks if b.attn is not None), None)
    mlp_blk = next((b for b in blocks if b.mlp is not None), None)
    norm = next((m for m in (model.norm, model.fc_norm, *(getattr(b, "norm1", None) for b in blocks))
                 if isinstance(m, nn.LayerNorm)), None)
    ls = next((getattr(b, n) for b in blocks for n in ("ls1", "ls2") if isinstance(getattr(b, n, None), LayerScale)),
              None)
    has_final = not isinstance(model.norm, nn.Identity)
    has_fc_norm = not isinstance(model.fc_norm, nn.Identity)
    kwargs: dict[str, Any] = {
        "img_size": [int(v) for v in pe.img_size],
        "patch_size": [int(v) for v in pe.patch_size],
        "in_chans": int(pe.proj.in_channels),
        "embed_dim": int(model.embed_dim),
        "num_classes": int(model.num_classes),
        "global_pool": model.global_pool,
        "class_token": model.cls_token is not None,
        "reg_tokens": int(model.num_reg_tokens),
        "no_embed_class": bool(model.no_embed_class),
        "pos_embed": "learn" if model.pos_embed is not None else "none",
        "pre_norm": not isinstance(model.norm_pre, nn.Identity),
        "final_norm": has_final or has_fc_norm,
        "fc_norm": has_fc_norm,
        "pool_include_prefix": bool(model.pool_include_prefix),
        "dynamic_img_size": bool(model.dynamic_img_size),
        "qkv_bias": attn.qkv.bias is not None if attn is not None else True,
        "qk_norm": not isinstance(attn.q_norm, nn.Identity) if attn is not None else False,
        "proj_bias": (attn.proj.bias is not None) if attn is not None else (
            mlp_blk.mlp.fc1.bias is not None if mlp_blk is not None else True),
        "init_values": 1e-5 if ls is not None else None,  # only switches layer scale on; gammas are copied
        "norm_eps": float(norm.eps) if norm is not None else 1e-6,
        "act_layer": _act_name(mlp_blk.mlp.act, "mlp") if mlp_blk is not None else "gelu",
    }
    kwargs.update(_variant_kwargs(model))
    if getattr(pe, "dynamic_img_pad", False):
        kwargs["dynamic_img_pad"] = True
    return kwargs


def _variant_kwargs(model: VisionTransformer) -> dict[str, Any]:
    """``vitshrink_vit``'s own block and head variants (only those that differ from the defaults)."""
    kwargs: dict[str, Any] = {}
    if getattr(model, "norm_placement", "pre") != "pre":
        kwargs["norm_placement"] = model.norm_placement
    if getattr(model, "shared_norm", False):
        kwargs["shared_norm"] = True
    pre_logits = getattr(model, "pre_logits", None)
    if isinstance(pre_logits, nn.Sequential):
        kwargs["head_hidden"] = int(pre_logits.fc.out_features)
        kwargs["head_act"] = _act_name(pre_logits.act, "pre_logits")
    if getattr(model, "head_softmax", False):
        kwargs["head_softmax"] = True
    if model.pos_embed is not None and not model.pos_embed.requires_grad:
        kwargs["fixed_pos_embed"] = True
    return kwargs


# --------------------------------------------------------------------------------------------------
# Slicing


@torch.no_grad()
def _copy_into(dst: nn.Module, src: nn.Module) -> None:
    dst.load_state_dict(src.state_dict())


@torch.no_grad()
def _slice_block(src: nn.Module, dst: SlimBlock, keep: BlockKeep) -> None:
    for name in ("norm1", "norm2"):  # which norms a block has depends on its placement and sharing
        if hasattr(dst, name):
            _copy_into(getattr(dst, name), getattr(src, name))
    if dst.attn is not None:
        _copy_into(dst.ls1, src.ls1)
        attn = src.attn
        hd, width = attn.head_dim, attn.num_heads * attn.head_dim
        idx = attn_index(keep, hd)
        rows = torch.cat([idx, idx + width, idx + 2 * width])
        new_hd = dst.attn.head_dim
        weight = attn.qkv.weight[rows].clone()
        bias = attn.qkv.bias[rows].clone() if attn.qkv.bias is not None else None
        # Keep q.k * hd**-0.5 unchanged under the new scale new_hd**-0.5 (qk_norm forbids narrowing heads).
        q_gain = (new_hd / hd) ** 0.5
        weight[: len(idx)] *= q_gain
        if bias is not None:
            bias[: len(idx)] *= q_gain
        dst.attn.qkv.weight.copy_(weight)
        if bias is not None:
            dst.attn.qkv.bias.copy_(bias)
        _copy_into(dst.attn.q_norm, attn.q_norm)
        _copy_into(dst.attn.k_norm, attn.k_norm)
        dst.attn.proj.weight.copy_(attn.proj.weight[:, idx])
        if attn.proj.bias is not None:
            dst.attn.proj.bias.copy_(attn.proj.bias)
    if dst.mlp is not None:
        _copy_into(dst.ls2, src.ls2)
        idx = torch.tensor(keep.mlp, dtype=torch.long)
        dst.mlp.fc1.weight.copy_(src.mlp.fc1.weight[idx])
        if src.mlp.fc1.bias is not None:
            dst.mlp.fc1.bias.copy_(src.mlp.fc1.bias[idx])
        dst.mlp.fc2.weight.copy_(src.mlp.fc2.weight[:, idx])
        if src.mlp.fc2.bias is not None:
            dst.mlp.fc2.bias.copy_(src.mlp.fc2.bias)


@torch.no_grad()
def slice_vit(model: nn.Module, plan: Plan) -> BlockwiseVisionTransformer:
    """A new, physically smaller ``vitshrink_vit`` computing ``mask_vit(model, plan)``'s function.

    ``model`` is a timm ``VisionTransformer`` (standard pre-norm blocks) or a ``vitshrink_vit``; it is
    not modified. The result carries the source's data config and class names, and ``kept_blocks``
    (indices into the *original* teacher when the source was itself pruned).
    """
    check_sliceable(model)
    keeps = check_plan(model, plan)
    dims = block_dims(model)
    kwargs = _arch_kwargs(model)
    src_kept = _source_kept_blocks(model)
    kept = [i for i, k in enumerate(keeps) if k is not None]
    for i in kept:
        keep = keeps[i]
        if kwargs["qk_norm"] and keep.head_dims is not None:
            raise UserError(f"cannot narrow heads of block {i}: its q/k norm spans the whole head")
    kwargs["block_num_heads"] = [len(keeps[i].heads) for i in kept]
    kwargs["block_head_dims"] = [
        (len(keeps[i].head_dims[0]) if keeps[i].head_dims else dims[i].head_dim) if keeps[i].heads else 0
        for i in kept]
    kwargs["block_mlp_hidden"] = [len(keeps[i].mlp) for i in kept]
    kwargs["kept_blocks"] = [src_kept[i] for i in kept]
    student = create_model("vitshrink_vit", **kwargs)
    # Embedding, tokens, final norm and head: same names, same shapes.
    src_state = model.state_dict()
    dst_state = student.state_dict()
    shared = {k: src_state[k] for k in dst_state if not k.startswith("blocks.")}
    missing = [k for k, v in shared.items() if v.shape != dst_state[k].shape]
    if missing:
        raise ValueError(f"non-block tensors differ in shape: {missing}")
    student.load_state_dict({**dst_state, **shared})
    for new_i, i in enumerate(kept):
        _slice_block(model.blocks[i], student.blocks[new_i], keeps[i])
    cfg = data_config(model)
    set_data_config(student, input_size=cfg["input_size"], mean=cfg["mean"], std=cfg["std"],
                    interpolation=cfg.get("interpolation"), crop_pct=cfg.get("crop_pct"))
    source = record_of(model)
    if source is not None:
        record = record_of(student)
        record.class_names = copy.deepcopy(source.class_names)
        record.provenance = copy.deepcopy(source.provenance)
    student.train(model.training)
    return student


def drop_blocks(model: nn.Module, blocks: Sequence[int]) -> BlockwiseVisionTransformer:
    """A ``vitshrink_vit`` without the listed blocks (indices into ``model.blocks``); the rest intact."""
    depth = len(model.blocks)
    bad = [b for b in blocks if not 0 <= int(b) < depth]
    if bad:
        raise UserError(f"cannot drop blocks {bad}: the model has blocks 0..{depth - 1}")
    drop = {int(b) for b in blocks}
    plan = [None if i in drop else k for i, k in enumerate(full_plan(model))]
    return slice_vit(model, plan)


# --------------------------------------------------------------------------------------------------
# The masked reference


def _zero_coupled(producer: nn.Linear, consumer: nn.Linear, rows: torch.Tensor, cols: torch.Tensor) -> None:
    """Zero the producer's removed output rows and the consumer's matching input columns.

    When nothing is kept the consumer's bias goes too: the whole branch is removed.
    """
    producer.weight[~rows] = 0
    if producer.bias is not None:
        producer.bias[~rows] = 0
    consumer.weight[:, ~cols] = 0
    if not cols.any() and consumer.bias is not None:
        consumer.bias.zero_()


@torch.no_grad()
def mask_vit(model: nn.Module, plan: Plan) -> nn.Module:
    """A copy of ``model`` with every unit the plan removes zeroed (same shapes, same function as the slice).

    A branch that loses all its units also loses its output bias (the branch is gone), so a removed
    block becomes the identity.
    """
    check_sliceable(model)
    keeps = check_plan(model, plan)
    masked = copy.deepcopy(model)
    if getattr(model, "norm_placement", "pre") == "post":
        # Zeroing a post-norm block's units leaves its norms: a removed block is the identity instead.
        for i, keep in enumerate(keeps):
            if keep is None:
                masked.blocks[i] = nn.Identity()
    for blk, keep in zip(masked.blocks, keeps):
        if isinstance(blk, nn.Identity):
            continue
        attn, mlp = blk.attn, blk.mlp
        if attn is not None:
            keep_mask = torch.zeros(attn.num_heads * attn.head_dim, dtype=torch.bool)
            if keep is not None and keep.heads:
                keep_mask[attn_index(keep, attn.head_dim)] = True
            _zero_coupled(attn.qkv, attn.proj, keep_mask.repeat(3), keep_mask)  # q, k and v rows alike
        if mlp is not None:
            keep_mask = torch.zeros(mlp.fc1.out_features, dtype=torch.bool)
            if keep is not None and keep.mlp:
                keep_mask[torch.tensor(keep.mlp)] = True
            _zero_coupled(mlp.fc1, mlp.fc2, keep_mask, keep_mask)
    return masked
