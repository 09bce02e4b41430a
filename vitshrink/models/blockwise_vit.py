"""A Vision Transformer whose blocks each have their own width: the shape pruning produces.

``vitshrink_vit`` is timm's ``VisionTransformer`` (same embedding, pooling, head, parameter names)
with a per-block list of attention heads, head dimension and MLP hidden width. A head count of 0
removes the attention branch of that block (its residual MLP stays); an MLP width of 0 removes the
MLP branch; removed blocks are simply absent. All dimensions are plain JSON lists in the model's
kwargs, so the architecture record in a safetensors file rebuilds the model with nothing else:

    create_model("vitshrink_vit", embed_dim=192, block_num_heads=[3, 2, 0], block_head_dims=[64, 48, 64],
                 block_mlp_hidden=[768, 512, 300], kept_blocks=[0, 1, 3], img_size=32, patch_size=4)

Attention is timm's ``Attention`` (fused ``F.scaled_dot_product_attention``) with ``attn_head_dim``
decoupling the head width from ``embed_dim / num_heads``; the MLP is timm's ``Mlp``.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Any, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm, LayerScale, Mlp, calculate_drop_path_rates, get_act_layer
from timm.layers.attention import Attention
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = ["SlimBlock", "BlockwiseVisionTransformer", "vitshrink_vit", "as_logits"]


class SlimBlock(nn.Module):
    """Transformer block with its own head count, head width and MLP width.

    Submodule names match timm's ``Block`` (``norm1, attn, ls1, norm2, mlp, ls2``) so state dicts
    slice over by name. ``num_heads == 0`` leaves out ``attn/ls1``; ``mlp_hidden == 0`` leaves out
    ``mlp/ls2``. ``norm_placement="pre"`` (timm's) normalises each branch's input, and a removed branch
    takes its norm with it; ``"post"`` (the original transformer's, ``nn.TransformerEncoderLayer``'s
    default) normalises after each residual add, ``x = norm1(x + attn(x)); x = norm2(x + mlp(x))``, and
    keeps both norms when a branch goes. ``shared_norm`` uses one module, ``norm1``, in both places (a
    hand-written ViT with one LayerNorm per layer); there is no ``norm2`` then, so no tied tensors.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        mlp_hidden: int,
        *,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_bias: bool = True,
        init_values: float | None = None,
        drop_path: float = 0.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] = LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        norm_placement: str = "pre",
        shared_norm: bool = False,
    ):
        super().__init__()
        self.has_attn = num_heads > 0
        self.has_mlp = mlp_hidden > 0
        self.post_norm = norm_placement == "post"
        self.shared_norm = bool(shared_norm)
        if self.has_attn or self.post_norm or (self.shared_norm and self.has_mlp):
            self.norm1 = norm_layer(dim)
        if not self.shared_norm and (self.has_mlp or self.post_norm):
            self.norm2 = norm_layer(dim)
        if self.has_attn:
            self.attn = Attention(dim, num_heads=num_heads, attn_head_dim=head_dim, qkv_bias=qkv_bias,
                                  qk_norm=qk_norm, proj_bias=proj_bias, attn_drop=attn_drop, proj_drop=proj_drop,
                                  norm_layer=norm_layer)
            self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
            self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        else:
            self.attn = None
        if self.has_mlp:
            self.mlp = Mlp(in_features=dim, hidden_features=mlp_hidden, act_layer=act_layer, bias=proj_bias,
                           drop=proj_drop)
            self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
            self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        else:
            self.mlp = None

    def mlp_norm(self) -> nn.Module:
        """The norm of the MLP branch: ``norm2``, or ``norm1`` when the block shares one norm."""
        return self.norm1 if self.shared_norm else self.norm2

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if self.post_norm:
            if self.has_attn:
                x = x + self.drop_path1(self.ls1(self.attn(x, attn_mask=attn_mask, is_causal=is_causal)))
            x = self.norm1(x)
            if self.has_mlp:
                x = x + self.drop_path2(self.ls2(self.mlp(x)))
            return self.mlp_norm()(x)
        if self.has_attn:
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        if self.has_mlp:
            x = x + self.drop_path2(self.ls2(self.mlp(self.mlp_norm()(x))))
        return x


class BlockwiseVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` with per-block dims (``block_num_heads``, ``block_head_dims``, ``block_mlp_hidden``).

    ``kept_blocks`` records which blocks of the unpruned teacher these are (provenance; default
    ``0..depth-1``). ``norm_eps`` (LayerNorm epsilon, default timm's 1e-6) and ``act_layer`` (a timm
    activation name) are plain values so that they survive the JSON architecture record. Any other ``VisionTransformer`` kwarg passes through.

    Variants that hand-written ViTs use, all plain JSON values too: ``norm_placement`` ("pre" | "post") and
    ``shared_norm`` (see ``SlimBlock``); ``head_hidden``/``head_act``: a Linear-act-Linear head
    (``pre_logits.fc``, ``pre_logits.act``, then ``head``); ``head_softmax``: the head ends in softmax, so in
    eval mode the model outputs probabilities (in training mode it outputs the logits the losses need);
    ``fixed_pos_embed``: the position table is a constant (e.g. sinusoidal), never trained.
    Pooling without a class token, a final norm before (``norm``) or after (``fc_norm``) the pooling,
    register tokens, LayerScale and qk-norm are timm's own kwargs (``class_token``, ``global_pool``,
    ``fc_norm``, ``final_norm``, ``reg_tokens``, ``init_values``, ``qk_norm``).
    """

    def __init__(
        self,
        block_num_heads: Sequence[int],
        block_head_dims: Sequence[int],
        block_mlp_hidden: Sequence[int],
        kept_blocks: Sequence[int] | None = None,
        *,
        embed_dim: int = 192,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_bias: bool = True,
        init_values: float | None = None,
        norm_eps: float | None = None,
        norm_layer: Any = None,
        act_layer: str = "gelu",
        global_pool: str = "token",
        drop_path_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        weight_init: str = "",
        norm_placement: str = "pre",
        shared_norm: bool = False,
        head_hidden: int = 0,
        head_act: str = "tanh",
        head_softmax: bool = False,
        fixed_pos_embed: bool = False,
        pool_num_heads: int = 1,
        pool_mlp_ratio: float = 4.0,
        **kwargs: Any,
    ):
        depth = len(block_num_heads)
        _check_variants(norm_placement, head_hidden)
        _check_block_lists(block_num_heads, block_head_dims, block_mlp_hidden, kept_blocks)
        if global_pool == "prr":
            raise ValueError("vitshrink_vit does not support the 'prr' attention pooling head")
        for key in ("depth", "num_heads", "mlp_ratio", "block_fn", "mlp_layer", "attn_layer"):
            if key in kwargs:
                raise ValueError(f"vitshrink_vit takes per-block dims, not {key!r}")
        if norm_layer is None:  # vitshrink.io.create_model turns ``norm_eps`` into ``norm_layer`` itself
            norm_layer = partial(LayerNorm, eps=1e-6 if norm_eps is None else float(norm_eps))
        # Build timm's embedding/pool/head with no blocks, then add the per-block ones.
        super().__init__(embed_dim=embed_dim, depth=0, qkv_bias=qkv_bias, qk_norm=qk_norm, proj_bias=proj_bias,
                         init_values=init_values, global_pool=global_pool, norm_layer=norm_layer,
                         act_layer=act_layer, weight_init="skip",
                         # With no blocks here, timm uses num_heads / mlp_ratio only for a 'map' head (kept whole).
                         num_heads=int(pool_num_heads), mlp_ratio=float(pool_mlp_ratio), **kwargs)
        self.block_num_heads = [int(v) for v in block_num_heads]
        self.block_head_dims = [int(v) for v in block_head_dims]
        self.block_mlp_hidden = [int(v) for v in block_mlp_hidden]
        self.kept_blocks = list(range(depth)) if kept_blocks is None else [int(v) for v in kept_blocks]
        dpr = calculate_drop_path_rates(drop_path_rate, depth) if depth else []
        act = get_act_layer(act_layer)
        self.blocks = nn.Sequential(*[
            SlimBlock(embed_dim, heads, head_dim, hidden, qkv_bias=qkv_bias, qk_norm=qk_norm, proj_bias=proj_bias,
                      init_values=init_values, drop_path=dpr[i], attn_drop=attn_drop_rate,
                      proj_drop=proj_drop_rate, norm_layer=norm_layer, act_layer=act,
                      norm_placement=norm_placement, shared_norm=shared_norm)
            for i, (heads, head_dim, hidden) in enumerate(
                zip(self.block_num_heads, self.block_head_dims, self.block_mlp_hidden))])
        reduction = self.patch_embed.feat_ratio() if hasattr(self.patch_embed, "feat_ratio") else kwargs.get("patch_size", 16)
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.norm_placement, self.shared_norm = norm_placement, bool(shared_norm)
        self.head_softmax = bool(head_softmax)
        self.pre_logits: nn.Module | None = None
        if head_hidden:
            self.pre_logits = nn.Sequential(OrderedDict(
                fc=nn.Linear(embed_dim, int(head_hidden)), act=get_act_layer(head_act)()))
            self.head_hidden_size = int(head_hidden)
            self.head = nn.Linear(int(head_hidden), self.num_classes) if self.num_classes > 0 else nn.Identity()
        self.fixed_pos_embed = bool(fixed_pos_embed)
        if fixed_pos_embed and self.pos_embed is not None:
            self.pos_embed.requires_grad_(False)
        self.weight_init_mode = "reset" if weight_init == "skip" else weight_init
        if weight_init != "skip":
            self.init_weights(needs_reset=False)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        if self.pre_logits is not None:  # timm's would size the new head by embed_dim
            self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(self.pool(x)))
        if self.pre_logits is not None:
            x = self.pre_logits(x)
        if pre_logits:
            return x
        x = self.head(x)
        return x.softmax(dim=-1) if self.head_softmax and not self.training else x

    def fix_init_weight(self) -> None:
        with torch.no_grad():
            for layer_id, layer in enumerate(self.blocks):
                scale = (2.0 * (layer_id + 1)) ** 0.5
                if layer.attn is not None:
                    layer.attn.proj.weight.div_(scale)
                if layer.mlp is not None:
                    layer.mlp.fc2.weight.div_(scale)


def as_logits(model: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """``model``'s output as logits: the log of a softmax head's probabilities (logits up to a per-image constant,
    which softmax, cross-entropy and KD at any temperature ignore), any other output as it is."""
    inner = getattr(model, "module", model)  # DDP / wrappers
    if getattr(inner, "head_softmax", False) and not inner.training:
        return output.float().clamp_min(torch.finfo(torch.float32).tiny).log()
    return output


def _check_block_lists(heads: Sequence[int], head_dims: Sequence[int], mlp_hidden: Sequence[int],
                       kept_blocks: Sequence[int] | None) -> None:
    depth = len(heads)
    if not (len(head_dims) == len(mlp_hidden) == depth):
        raise ValueError(f"block_num_heads, block_head_dims and block_mlp_hidden must have one entry per block, "
                         f"got {depth}, {len(head_dims)}, {len(mlp_hidden)}")
    if kept_blocks is not None and len(kept_blocks) != depth:
        raise ValueError(f"kept_blocks has {len(kept_blocks)} entries for {depth} blocks")
    if any(int(v) < 0 for v in (*heads, *head_dims, *mlp_hidden)):
        raise ValueError("per-block dims must be >= 0")


def _check_variants(norm_placement: str, head_hidden: int) -> None:
    if norm_placement not in ("pre", "post"):
        raise ValueError(f"norm_placement must be 'pre' or 'post', got {norm_placement!r}")
    if int(head_hidden) < 0:
        raise ValueError(f"head_hidden must be >= 0, got {head_hidden}")


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", **kwargs,
    }


# Read by timm's register_model to attach the pretrained_cfg (no weights are published under this name).
default_cfgs = generate_default_cfgs({"vitshrink_vit": _cfg()})


@register_model
def vitshrink_vit(pretrained: bool = False, **kwargs: Any) -> BlockwiseVisionTransformer:
    """ViT with per-block heads / head dims / MLP widths (the output of vitshrink's pruning)."""
    return build_model_with_cfg(BlockwiseVisionTransformer, "vitshrink_vit", pretrained,
                                feature_cfg=dict(out_indices=3, feature_cls="getter"), **kwargs)
