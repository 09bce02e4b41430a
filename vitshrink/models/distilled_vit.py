"""``vitshrink_vit_distilled``: a ``vitshrink_vit`` with DeiT's distillation token and head.

timm's ``VisionTransformerDistilled`` rebuilds only the original DeiT layout (class token, token pooling, the
position embedding over both tokens); a DeiT III, DINOv2-with-registers, CLIP, qk-norm or average-pooled ViT
loses its LayerScale, registers, ``norm_pre``, q/k norms or pooling there. This class keeps every
``vitshrink_vit`` kwarg (so every block variant that model has) and adds:

* ``dist_token``, inserted right after the model's own prefix tokens (class token, registers). It gets no
  position embedding: a learned token plus a learned constant is just another learned token, and leaving the
  table alone keeps the teacher-shaped ``pos_embed`` (``no_embed_class`` or not, registers or not);
* ``head_dist``, reading the distillation token (through ``fc_norm`` and any MLP pre-logits, as the class path).

The class path pools as the model did (class token, average over patch tokens, attention pool); the output
is the average of the two heads except in distilled training mode, where it is ``(class, distillation)``, as
timm's DeiT. ``set_distilled_training`` has timm's name, so the DeiT recipe drives both classes the same way.

``vitshrink_distilled`` (kwargs: ``base``, a timm ViT name, and that model's kwargs) gives the same token and head
to a timm ViT whose blocks ``vitshrink_vit`` cannot rebuild (parallel blocks; EVA-02 and RoPE ViTs, timm's ``Eva``):
the model is built by timm, then its class becomes a subclass mixing in ``DistillationToken``.
"""
from __future__ import annotations

from typing import Any

import timm
import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitshrink.models.blockwise_vit import BlockwiseVisionTransformer, _cfg

__all__ = ["DistillationToken", "EvaDistillationToken", "DistilledBlockwiseViT", "add_token_and_head", "vitshrink_vit_distilled",
           "vitshrink_distilled"]


class DistillationToken:
    """The distillation token's methods, mixed into a timm ``VisionTransformer`` (after ``add_token_and_head``)."""

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        self.distilled_training = enable

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        width = self.head.in_features if isinstance(self.head, nn.Linear) else self.embed_dim
        self.head_dist = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        # timm's _pos_embed with the model's own prefix count, then the distillation token after the prefix.
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.dynamic_img_size:
            batch, height, width, channels = x.shape
            pos_embed = None if self.pos_embed is None else resample_abs_pos_embed(
                self.pos_embed, new_size=(height, width), old_size=self.patch_embed.grid_size,
                num_prefix_tokens=0 if self.no_embed_class else self.own_prefix_tokens)
            x = x.view(batch, -1, channels)
        else:
            pos_embed = self.pos_embed
            x = x.view(x.shape[0], -1, x.shape[-1])
        if pos_embed is None:
            x = torch.cat(prefix + [x], dim=1)
        elif self.no_embed_class:
            x = torch.cat(prefix + [x + pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos_embed
        n = self.own_prefix_tokens
        x = torch.cat([x[:, :n], self.dist_token.expand(x.shape[0], -1, -1), x[:, n:]], dim=1)
        return self.pos_drop(x)

    def _head_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(x))
        pre_logits = getattr(self, "pre_logits", None)  # the MLP head of hand-written ViTs, when present
        return x if pre_logits is None else pre_logits(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        dist = self._head_features(x[:, self.own_prefix_tokens])
        cls = self._head_features(self.pool(x))
        if pre_logits:
            return (cls + dist) / 2
        cls, dist = self.head(cls), self.head_dist(dist)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return cls, dist
        return (cls + dist) / 2


class EvaDistillationToken(DistillationToken):
    """The same token for timm's ``Eva`` (EVA-02, RoPE ViTs): Eva places its tokens and rotary embedding, then the
    distillation token goes after the prefix; every attention skips it for RoPE as it skips the class token."""

    def _pos_embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, rot_pos_embed = super(DistillationToken, self)._pos_embed(x)  # Eva's own
        n = self.own_prefix_tokens
        x = torch.cat([x[:, :n], self.dist_token.expand(x.shape[0], -1, -1), x[:, n:]], dim=1)
        return x, rot_pos_embed


def add_token_and_head(model: nn.Module) -> None:
    """Give a built ViT the distillation token (fresh, ``std`` 0.02) and head; the mixin's methods read them."""
    if getattr(model, "head_softmax", False):
        raise ValueError("a softmax head has no logits to distil")
    if getattr(model, "attn_pool", None) is not None and model.global_pool != "map":
        raise ValueError(f"the {model.global_pool!r} pooling head reads every token, the distillation token too")
    if isinstance(model, Eva) and model.dynamic_img_size:
        raise ValueError("a distillation token in an Eva with dynamic_img_size is not supported")
    model.own_prefix_tokens = model.num_prefix_tokens
    model.num_prefix_tokens += 1  # pooling and intermediates skip the distillation token with the others
    for module in model.blocks.modules():  # Eva's attentions: RoPE applies after the prefix tokens
        if hasattr(module, "num_prefix_tokens"):
            module.num_prefix_tokens = model.num_prefix_tokens
    model.dist_token = nn.Parameter(torch.zeros(1, 1, model.embed_dim))
    trunc_normal_(model.dist_token, std=0.02)
    width = model.head.in_features if isinstance(model.head, nn.Linear) else model.embed_dim
    model.head_dist = nn.Linear(width, model.num_classes) if model.num_classes > 0 else nn.Identity()
    model.distilled_training = False


class DistilledBlockwiseViT(DistillationToken, BlockwiseVisionTransformer):
    """``BlockwiseVisionTransformer`` plus a distillation token (after the prefix tokens) and head."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        add_token_and_head(self)


_DISTILLED_CLASSES: dict[type, type] = {}


def _distilled_class(cls: type) -> type:
    # One subclass per timm class (VisionTransformer with parallel blocks, Eva), made once.
    if cls not in _DISTILLED_CLASSES:
        mixin = EvaDistillationToken if issubclass(cls, Eva) else DistillationToken
        _DISTILLED_CLASSES[cls] = type(f"Distilled{cls.__name__}", (mixin, cls), {})
    return _DISTILLED_CLASSES[cls]


# Read by timm's register_model to attach the pretrained_cfg (no weights are published under this name).
default_cfgs = generate_default_cfgs({"vitshrink_vit_distilled": _cfg(), "vitshrink_distilled": _cfg()})


@register_model
def vitshrink_vit_distilled(pretrained: bool = False, **kwargs: Any) -> DistilledBlockwiseViT:
    """``vitshrink_vit`` (any of its kwargs) with a DeiT distillation token and head."""
    return build_model_with_cfg(DistilledBlockwiseViT, "vitshrink_vit_distilled", pretrained,
                                feature_cfg=dict(out_indices=3, feature_cls="getter"), **kwargs)


@register_model
def vitshrink_distilled(pretrained: bool = False, base: str = "vit_small_patch16_224", **kwargs: Any) -> nn.Module:
    """Any timm ``VisionTransformer`` or ``Eva`` built by its name ``base`` with ``kwargs`` (parallel blocks, RmsNorm,
    RoPE, ...) plus the distillation token and head: for the layouts ``vitshrink_vit`` cannot rebuild."""
    if pretrained:
        raise ValueError("vitshrink_distilled has no pretrained weights; load the base model's into it")
    model = timm.create_model(base, **kwargs)
    if not isinstance(model, VisionTransformer | Eva):
        raise ValueError(f"vitshrink_distilled needs a timm VisionTransformer or Eva, {base} is {type(model).__name__}")
    model.__class__ = _distilled_class(type(model))
    add_token_and_head(model)
    return model
