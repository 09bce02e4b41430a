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
and searches compare against. Which units to keep is not decided here (that is a recipe's search);
``uniform_plan`` and the group norms are the simple, structural building blocks.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from timm.layers import LayerScale, Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from vitshrink.errors import UserError
from vitshrink.io import create_model, data_config, record_of, set_data_config
from vitshrink.models.blockwise_vit import BlockwiseVisionTransformer, SlimBlock

__all__ = [
    "BlockKeep", "Plan", "BlockDims", "block_dims", "check_sliceable", "full_plan", "uniform_plan", "head_norms",
    "head_dim_norms", "mlp_unit_norms", "slice_vit", "drop_blocks", "mask_vit", "plan_to_json", "plan_from_json",
]


@dataclass
class BlockKeep:
    """What one source block keeps: head indices, MLP unit indices and (optionally) dims within each kept head.

    ``head_dims[i]`` lists the kept dims of head ``heads[i]``; every kept head keeps the same number of
    dims (one ``head_dim`` per block). ``None`` keeps all dims. An empty ``heads`` removes the attention
    branch; an empty ``mlp`` removes the MLP branch.
    """

    heads: list[int]
    mlp: list[int]
    head_dims: list[list[int]] | None = None


# One entry per source block; ``None`` removes the block.
Plan = list  # list[BlockKeep | None]


@dataclass
class BlockDims:
    num_heads: int
    head_dim: int
    mlp_hidden: int


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


def block_dims(model: nn.Module) -> list[BlockDims]:
    """Heads, head width and MLP width of every block of a (timm or vitshrink) ViT."""
    dims = []
    for blk in model.blocks:
        attn, mlp = blk.attn, blk.mlp
        dims.append(BlockDims(
            num_heads=attn.num_heads if attn is not None else 0,
            head_dim=attn.head_dim if attn is not None else 0,
            mlp_hidden=mlp.fc1.out_features if mlp is not None else 0,
        ))
    return dims


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
    if getattr(pe, "dynamic_img_pad", False):
        kwargs["dynamic_img_pad"] = True
    return kwargs


# --------------------------------------------------------------------------------------------------
# Group norms (UVC and uniform pruning rank units by these)


def _qkv_rows(attn: Attention) -> tuple[torch.Tensor, torch.Tensor | None]:
    """qkv weight/bias as [3, heads, head_dim, in] / [3, heads, head_dim]."""
    h, hd = attn.num_heads, attn.head_dim
    w = attn.qkv.weight.reshape(3, h, hd, -1)
    b = attn.qkv.bias.reshape(3, h, hd) if attn.qkv.bias is not None else None
    return w, b


@torch.no_grad()
def head_dim_norms(block: nn.Module) -> torch.Tensor:
    """L2 norm of each (head, dim) group: its q, k, v rows (+ biases) and its ``proj`` column. Shape [heads, hd]."""
    attn = block.attn
    if attn is None:
        return torch.zeros(0, 0)
    w, b = _qkv_rows(attn)
    sq = w.pow(2).sum(dim=(0, 3))
    if b is not None:
        sq = sq + b.pow(2).sum(dim=0)
    sq = sq + attn.proj.weight.pow(2).sum(dim=0).reshape(attn.num_heads, attn.head_dim)
    return sq.sqrt()


@torch.no_grad()
def head_norms(block: nn.Module) -> torch.Tensor:
    """L2 norm of each head's group (all its q, k, v rows and ``proj`` columns). Shape [heads]."""
    per_dim = head_dim_norms(block)
    return per_dim.pow(2).sum(dim=1).sqrt() if per_dim.numel() else per_dim.new_zeros(0)


@torch.no_grad()
def mlp_unit_norms(block: nn.Module) -> torch.Tensor:
    """L2 norm of each MLP hidden unit's group: its ``fc1`` row (+ bias) and ``fc2`` column. Shape [hidden]."""
    mlp = block.mlp
    if mlp is None:
        return torch.zeros(0)
    sq = mlp.fc1.weight.pow(2).sum(dim=1) + mlp.fc2.weight.pow(2).sum(dim=0)
    if mlp.fc1.bias is not None:
        sq = sq + mlp.fc1.bias.pow(2)
    return sq.sqrt()


def _top(norms: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest norms, in ascending index order (ties broken by lower index)."""
    if k <= 0:
        return []
    order = sorted(range(len(norms)), key=lambda i: (-float(norms[i]), i))
    return sorted(order[:k])


def full_plan(model: nn.Module) -> Plan:
    """A plan that keeps everything (slicing with it only converts to ``vitshrink_vit``)."""
    return [BlockKeep(heads=list(range(d.num_heads)), mlp=list(range(d.mlp_hidden))) for d in block_dims(model)]


def uniform_plan(model: nn.Module, fraction: float) -> Plan:
    """Keep the same fraction of heads and of MLP units in every block, the largest groups by L2 norm.

    At least one head and one MLP unit stay in each branch that exists.
    """
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"keep fraction must be in (0, 1], got {fraction}")
    plan: Plan = []
    for blk, d in zip(model.blocks, block_dims(model)):
        n_heads = max(1, round(fraction * d.num_heads)) if d.num_heads else 0
        n_mlp = max(1, round(fraction * d.mlp_hidden)) if d.mlp_hidden else 0
        plan.append(BlockKeep(heads=_top(head_norms(blk), n_heads), mlp=_top(mlp_unit_norms(blk), n_mlp)))
    return plan


# --------------------------------------------------------------------------------------------------
# Plans


def _check_plan(model: nn.Module, plan: Plan) -> list[BlockKeep | None]:
    dims = block_dims(model)
    if len(plan) != len(dims):
        raise ValueError(f"plan has {len(plan)} entries for a model with {len(dims)} blocks")
    checked: list[BlockKeep | None] = []
    for i, (keep, d) in enumerate(zip(plan, dims)):
        if keep is None:
            checked.append(None)
            continue
        heads, mlp = sorted(int(h) for h in keep.heads), sorted(int(j) for j in keep.mlp)
        if len(set(heads)) != len(heads) or any(not 0 <= h < d.num_heads for h in heads):
            raise ValueError(f"block {i}: head indices {heads} invalid for {d.num_heads} heads")
        if len(set(mlp)) != len(mlp) or any(not 0 <= j < d.mlp_hidden for j in mlp):
            raise ValueError(f"block {i}: MLP indices invalid for {d.mlp_hidden} units")
        head_dims = None
        if keep.head_dims is not None and heads:
            by_head = dict(zip((int(h) for h in keep.heads), keep.head_dims))
            if len(keep.head_dims) != len(keep.heads):
                raise ValueError(f"block {i}: head_dims needs one list per kept head")
            head_dims = [sorted(int(x) for x in by_head[h]) for h in heads]
            widths = {len(dl) for dl in head_dims}
            if len(widths) != 1 or 0 in widths:
                raise ValueError(f"block {i}: every kept head must keep the same, non-zero number of dims")
            for dl in head_dims:
                if len(set(dl)) != len(dl) or any(not 0 <= x < d.head_dim for x in dl):
                    raise ValueError(f"block {i}: head dim indices invalid for head_dim {d.head_dim}")
            if head_dims == [list(range(d.head_dim))] * len(heads):
                head_dims = None
        checked.append(BlockKeep(heads=heads, mlp=mlp, head_dims=head_dims))
    return checked


def plan_to_json(plan: Plan) -> list[Any]:
    """A JSON-able form of a plan (``None`` for removed blocks)."""
    return [None if k is None else {"heads": list(k.heads), "mlp": list(k.mlp), "head_dims": k.head_dims}
            for k in plan]


def plan_from_json(data: Sequence[Any]) -> Plan:
    return [None if k is None else BlockKeep(heads=list(k["heads"]), mlp=list(k["mlp"]),
                                             head_dims=k.get("head_dims")) for k in data]


def _attn_index(keep: BlockKeep, head_dim: int) -> torch.Tensor:
    """Flat indices (into one of q/k/v, i.e. ``proj`` columns) of the kept (head, dim) pairs."""
    dims = keep.head_dims or [list(range(head_dim))] * len(keep.heads)
    return torch.tensor([h * head_dim + x for h, dl in zip(keep.heads, dims) for x in dl], dtype=torch.long)


# --------------------------------------------------------------------------------------------------
# Slicing


@torch.no_grad()
def _copy_into(dst: nn.Module, src: nn.Module) -> None:
    dst.load_state_dict(src.state_dict())


@torch.no_grad()
def _slice_block(src: nn.Module, dst: SlimBlock, keep: BlockKeep) -> None:
    if dst.attn is not None:
        _copy_into(dst.norm1, src.norm1)
        _copy_into(dst.ls1, src.ls1)
        attn = src.attn
        hd, width = attn.head_dim, attn.num_heads * attn.head_dim
        idx = _attn_index(keep, hd)
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
        _copy_into(dst.norm2, src.norm2)
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
    keeps = _check_plan(model, plan)
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
    keeps = _check_plan(model, plan)
    masked = copy.deepcopy(model)
    for blk, keep in zip(masked.blocks, keeps):
        attn, mlp = blk.attn, blk.mlp
        if attn is not None:
            keep_mask = torch.zeros(attn.num_heads * attn.head_dim, dtype=torch.bool)
            if keep is not None and keep.heads:
                keep_mask[_attn_index(keep, attn.head_dim)] = True
            _zero_coupled(attn.qkv, attn.proj, keep_mask.repeat(3), keep_mask)  # q, k and v rows alike
        if mlp is not None:
            keep_mask = torch.zeros(mlp.fc1.out_features, dtype=torch.bool)
            if keep is not None and keep.mlp:
                keep_mask[torch.tensor(keep.mlp)] = True
            _zero_coupled(mlp.fc1, mlp.fc2, keep_mask, keep_mask)
    return masked
