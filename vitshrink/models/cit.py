"""CiT, the Co-advise student (Ren et al., CVPR 2022): a ViT fed by a convolution stem and an involution stem.

Facts from the official code (OliverRensu/co-advise, ``models.py``):

* **Stems.** A convolution stem (7x7/2 conv 3->64, two 3x3 convs, each BN+ReLU) and RedNet's involution
  stem (3x3/2 conv to 32, 3x3 involution, BN, ReLU, 3x3 conv to 64), each followed by a strided
  projection (8x8/8 conv) to the embedding width: 224 px, patch 16 -> 14x14 tokens from each.
* **Tokens.** Patch tokens = conv tokens + involution tokens; conv token = mean of the conv tokens, inv
  token = mean of the involution tokens; sequence ``[cls, conv, inv, patches]`` with a learned position
  embedding for all ``3 + N``.
* **Heads.** ``head`` (cls), ``head_conv``, ``head_inv``; in training the three logits are returned, in
  eval their average (so the ONNX file has one output).

Any width/depth/heads is accepted. The stem stride is 2 for patch sizes >= 8 (the projection takes the
rest: 16 = 2 x 8) and 1 below (32 px with patch 4: a CIFAR-style 3x3 stride-1 first conv, 4x4/4
projection) - the small-image variant is ours. Parameter names inside the stems match the official
``conv_embed``/``inv_embed`` modules (``checkpoint_filter_fn`` renames them to ``patch_embed.conv/inv``).

The model is timm's ``VisionTransformer`` with three prefix tokens (like timm's distilled DeiT has two):
``forward_features``, ``forward_intermediates``, blocks and norms are timm's. ``patch_embed(x)`` returns
``[conv token, inv token, patch tokens]``; ``_pos_embed`` puts the class token in front.

Our extension: :func:`cit_from_vit_teacher` builds a CiT of a user's ViT teacher's width at a derived
depth and starts its transformer blocks from the teacher's (as :func:`vitshrink.students.derive_student`
does for a plain ViT student); :func:`init_cit_from_vit` does the copying for any CiT.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitshrink.models.checkpoints import rename_prefixes
from vitshrink.models.involution import involution_stem

__all__ = ["DualStemEmbed", "CrossInductiveViT", "checkpoint_filter_fn", "init_cit_from_vit", "cit_from_vit_teacher",
           "cit_tiny_patch16_224", "cit_small_patch16_224", "cit_base_patch16_224", "cit_tiny_patch4_32", "vitshrink_cit"]


def default_stem_stride(patch_size: int) -> int:
    """2 for patch sizes of 8 and more (the paper's 16 = 2 x 8), 1 for small patches (32 px images, patch 4)."""
    return 2 if patch_size >= 8 else 1


def _conv_stem(in_chans: int, stem_chs: int, stride: int, kernel_size: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index in range(3):
        k, s = (kernel_size, stride) if index == 0 else (3, 1)
        layers += [nn.Conv2d(in_chans if index == 0 else stem_chs, stem_chs, k, s, (k - 1) // 2, bias=False),
                   nn.BatchNorm2d(stem_chs), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class ConvEmbed(nn.Module):
    """Convolution stem + strided projection; tokens (B, N, D). Names as the official ``embed_conv``."""

    def __init__(self, in_chans: int, stem_chs: int, stride: int, kernel_size: int, embed_dim: int, proj: int):
        super().__init__()
        self.conv = _conv_stem(in_chans, stem_chs, stride, kernel_size)
        self.proj = nn.Conv2d(stem_chs, embed_dim, proj, proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(x)).flatten(2).transpose(1, 2)


class InvEmbed(nn.Module):
    """RedNet's involution stem + strided projection; tokens (B, N, D). Names as the official ``embed_inv``."""

    def __init__(self, in_chans: int, stem_chs: int, stride: int, embed_dim: int, proj: int):
        super().__init__()
        self.stem = involution_stem(in_chans, stem_chs, stride)
        self.proj = nn.Conv2d(stem_chs, embed_dim, proj, proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stem(x)).flatten(2).transpose(1, 2)


class DualStemEmbed(nn.Module):
    """Both stems: returns ``[conv token, inv token, conv + inv patch tokens]``, (B, 2 + N, D).

    Built by timm's ``VisionTransformer`` in place of ``PatchEmbed`` (same constructor keywords).
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, *, stem_chs: int = 64, stem_stride: int | None = None,
                 conv_stem_kernel: int | None = None, **_: Any):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        if isinstance(patch_size, (tuple, list)):
            if len(set(patch_size)) != 1:
                raise ValueError(f"CiT needs a square patch size, got {patch_size}")
            patch_size = patch_size[0]
        stem_stride = stem_stride or default_stem_stride(patch_size)
        if patch_size % stem_stride:
            raise ValueError(f"CiT: patch_size {patch_size} is not a multiple of stem_stride {stem_stride}")
        if any(side % patch_size for side in self.img_size):
            raise ValueError(f"CiT: img_size {self.img_size} is not a multiple of patch_size {patch_size}")
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.dynamic_img_pad = False
        proj = patch_size // stem_stride
        kernel = conv_stem_kernel or (7 if stem_stride > 1 else 3)
        self.conv = ConvEmbed(in_chans, stem_chs, stem_stride, kernel, embed_dim, proj)
        self.inv = InvEmbed(in_chans, stem_chs, stem_stride, embed_dim, proj)

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        return self.patch_size[0] if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv_tokens, inv_tokens = self.conv(x), self.inv(x)
        return torch.cat((conv_tokens.mean(1, keepdim=True), inv_tokens.mean(1, keepdim=True),
                          conv_tokens + inv_tokens), dim=1)


class CrossInductiveViT(VisionTransformer):
    """CiT: timm ViT with the dual-stem embedding, tokens ``[cls, conv, inv, patches]`` and three heads.

    ``forward`` returns ``(cls_logits, conv_logits, inv_logits)`` in training and their average in eval.
    ``set_distilled_training(False)`` makes training return the average too (plain supervised training).
    """

    bf16_autocast_safe = True  # the involution stem accumulates in float32 (see vitshrink.models.involution)

    def __init__(self, *, stem_chs: int = 64, stem_stride: int | None = None, conv_stem_kernel: int | None = None,
                 **kwargs: Any):
        for key, allowed in (("class_token", True), ("global_pool", "token"), ("no_embed_class", False),
                             ("reg_tokens", 0), ("dynamic_img_size", False), ("patch_drop_rate", 0.0)):
            if kwargs.get(key, allowed) != allowed:
                raise ValueError(f"CiT needs {key}={allowed!r}, got {kwargs[key]!r}")
        weight_init = kwargs.pop("weight_init", "")
        embed = partial(DualStemEmbed, stem_chs=stem_chs, stem_stride=stem_stride, conv_stem_kernel=conv_stem_kernel)
        super().__init__(embed_layer=embed, weight_init="skip", **kwargs)
        self.num_prefix_tokens = 3
        self.pos_embed = nn.Parameter(torch.empty(1, self.patch_embed.num_patches + 3, self.embed_dim))
        self.head_conv = nn.Linear(self.embed_dim, self.num_classes) if self.num_classes > 0 else nn.Identity()
        self.head_inv = nn.Linear(self.embed_dim, self.num_classes) if self.num_classes > 0 else nn.Identity()
        self.distilled_training = True
        self.weight_init_mode = "reset" if weight_init == "skip" else weight_init
        if weight_init != "skip":
            self.init_weights(needs_reset=False)

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        super().init_weights(mode=mode or self.weight_init_mode, needs_reset=needs_reset)
        # Official init: kaiming-normal stem convolutions (BN defaults), trunc-normal(0.02) heads.
        for m in self.patch_embed.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def get_classifier(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return self.head, self.head_conv, self.head_inv

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "", "token"):
            raise ValueError("CiT's heads read the class, conv and inv tokens (global_pool 'token')")
        self.num_classes = num_classes
        for name in ("head", "head_conv", "head_inv"):
            layer = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
            setattr(self, name, layer.to(self.pos_embed.device).train(self.training))

    @torch.jit.ignore
    def init_from_vit_teacher(self, teacher: nn.Module) -> dict[str, int]:
        """Start from a timm ViT teacher's weights (:func:`init_cit_from_vit`); used by ``vitshrink.students``."""
        return init_cit_from_vit(self, teacher)

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        self.distilled_training = enable

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        # x = [conv token, inv token, patches] from DualStemEmbed; the class token goes first.
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        tokens = [self.head_drop(self.fc_norm(x[:, i])) for i in range(3)]
        if pre_logits:
            return sum(tokens) / 3
        logits = (self.head(tokens[0]), self.head_conv(tokens[1]), self.head_inv(tokens[2]))
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return logits
        return sum(logits) / 3


# Official module prefixes (co-advise models.py) -> ours.
_OFFICIAL_PREFIXES = (("conv_embed.", "patch_embed.conv."), ("inv_embed.", "patch_embed.inv."))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Rename an official Co-advise CiT checkpoint (``conv_embed.*``, ``inv_embed.*``) to this layout."""
    state_dict = state_dict.get("model", state_dict)
    return rename_prefixes(state_dict, _OFFICIAL_PREFIXES)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": ("patch_embed.conv.conv.0", "patch_embed.inv.stem.0.conv"),
        "classifier": ("head", "head_conv", "head_inv"), **kwargs,
    }


_CIFAR = dict(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0)
# timm's register_model reads this module-level name to attach each variant's pretrained_cfg.
default_cfgs = generate_default_cfgs({
    "cit_tiny_patch16_224": _cfg(), "cit_small_patch16_224": _cfg(), "cit_base_patch16_224": _cfg(),
    "cit_tiny_patch4_32": _cfg(**_CIFAR), "vitshrink_cit": _cfg(**_CIFAR),
})


def _create(variant: str, pretrained: bool, model_args: dict[str, Any], **kwargs: Any) -> CrossInductiveViT:
    # No CiT weights are published under these names: pretrained=True is refused by timm's builder.
    return build_model_with_cfg(CrossInductiveViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=3, feature_cls="getter"), **{**model_args, **kwargs})


@register_model
def cit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> CrossInductiveViT:
    """CiT-Tiny (DeiT-Tiny dimensions: 192 wide, 12 blocks, 3 heads), 224 px, patch 16."""
    return _create("cit_tiny_patch16_224", pretrained, dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
                   **kwargs)


@register_model
def cit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> CrossInductiveViT:
    """CiT-Small (DeiT-Small dimensions: 384, 12, 6), the student of the official ``main.py``."""
    return _create("cit_small_patch16_224", pretrained, dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
                   **kwargs)


@register_model
def cit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> CrossInductiveViT:
    """CiT-Base (DeiT-Base dimensions: 768, 12, 12)."""
    return _create("cit_base_patch16_224", pretrained, dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
                   **kwargs)


@register_model
def cit_tiny_patch4_32(pretrained: bool = False, **kwargs: Any) -> CrossInductiveViT:
    """CiT-Tiny for 32 px images (ours): patch 4 (stride-1 stems, 4x4 projection), 64 tokens, 10 classes."""
    return _create("cit_tiny_patch4_32", pretrained,
                   dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3), **kwargs)


@register_model
def vitshrink_cit(pretrained: bool = False, **kwargs: Any) -> CrossInductiveViT:
    """A CiT of any shape given by kwargs (defaults: the 32 px tiny one); what derived students are built as."""
    return _create("vitshrink_cit", pretrained, dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3),
                   **kwargs)


# --- starting a CiT from a user's ViT teacher (our extension) ------------------------------------------------

def init_cit_from_vit(cit: CrossInductiveViT, teacher: nn.Module) -> dict[str, int]:
    """Copy a timm ViT teacher's transformer into ``cit``; return counts of copied / left tensors.

    Block ``j`` takes the teacher block chosen by :func:`vitshrink.students.kept_blocks`; the final norm,
    class token and heads (all three, when the class counts match) are copied; the position embedding of
    the class token is copied, the patch grid's is resampled to the CiT's grid, and the conv/inv tokens
    start at the mean of the teacher's patch positions (their tokens are means of patch tokens). The stems
    have no counterpart and stay as created. Widths must match (``UserError`` otherwise).
    """
    from timm.layers import resample_abs_pos_embed

    from vitshrink.errors import UserError
    from vitshrink.students import kept_blocks

    t_state = teacher.state_dict()
    t_blocks, t_prefix = len(teacher.blocks), int(getattr(teacher, "num_prefix_tokens", 1))
    if getattr(teacher, "embed_dim", None) != cit.embed_dim:
        raise UserError(f"cannot start the CiT from the teacher: widths differ ({cit.embed_dim} vs "
                        f"{getattr(teacher, 'embed_dim', None)}); set init_from_teacher: false to train it from scratch")
    if len(cit.blocks) > t_blocks:
        raise UserError(f"cannot start the CiT from the teacher: {len(cit.blocks)} blocks > the teacher's {t_blocks}")
    new_state: dict[str, torch.Tensor] = {}
    for j, i in enumerate(kept_blocks(t_blocks, len(cit.blocks))):
        for key, value in cit.blocks[j].state_dict().items():
            source = t_state.get(f"blocks.{i}.{key}")
            if source is None or source.shape != value.shape:
                raise UserError(f"cannot start the CiT from the teacher: blocks.{i}.{key} differs in shape "
                                f"({None if source is None else tuple(source.shape)} vs {tuple(value.shape)})")
            new_state[f"blocks.{j}.{key}"] = source
    cit_state = cit.state_dict()
    for key in [k for k in cit_state if k.startswith(("norm.", "cls_token"))]:
        if key in t_state and t_state[key].shape == cit_state[key].shape:
            new_state[key] = t_state[key]
    if "head.weight" in t_state and t_state["head.weight"].shape == cit_state["head.weight"].shape:
        for head in ("head", "head_conv", "head_inv"):
            new_state[f"{head}.weight"], new_state[f"{head}.bias"] = t_state["head.weight"], t_state["head.bias"]
    if "pos_embed" in t_state and not getattr(teacher, "no_embed_class", False):
        pos = t_state["pos_embed"]
        t_grid = getattr(teacher.patch_embed, "grid_size", None)
        patches = resample_abs_pos_embed(pos[:, t_prefix:].float(), new_size=list(cit.patch_embed.grid_size),
                                         old_size=list(t_grid) if t_grid else None, num_prefix_tokens=0)
        stem_rows = pos[:, t_prefix:].mean(1, keepdim=True).expand(-1, 2, -1)
        new_state["pos_embed"] = torch.cat((pos[:, :1], stem_rows, patches.to(pos.dtype)), dim=1)
    cit.load_state_dict({k: v.detach().clone() for k, v in new_state.items()}, strict=False)
    return {"copied": len(new_state), "left_as_created": len(cit_state) - len(new_state)}


def cit_from_vit_teacher(teacher: nn.Module, *, depth_ratio: float = 0.5, init: bool = True,
                         **cit_kwargs: Any) -> CrossInductiveViT:
    """A CiT as wide as a timm ViT teacher with ``depth_ratio`` of its blocks, started from its weights.

    Image size, patch size, heads, MLP ratio, qkv bias and classes follow the teacher (``cit_kwargs``
    override or add, e.g. ``stem_chs``); preprocessing (mean/std) is the teacher's. Built as
    ``vitshrink_cit`` through ``vitshrink.io.create_model``, so ``save_model`` records it.
    """
    from vitshrink.errors import UserError
    from vitshrink.io import create_model, data_config, set_data_config
    from vitshrink.students import copy_data_config, vit_kwargs

    if not isinstance(getattr(teacher, "blocks", None), nn.Sequential) or not hasattr(teacher, "patch_embed"):
        raise UserError(f"cannot derive a CiT from a {type(teacher).__name__} teacher (not a ViT with blocks)")
    try:
        shape = vit_kwargs(teacher)
    except AttributeError as exc:
        raise UserError(f"cannot derive a CiT from this teacher (not a uniform timm ViT: {exc})") from None
    kwargs = {
        "img_size": int(shape["img_size"][0]), "patch_size": int(shape["patch_size"][0]),
        "in_chans": shape["in_chans"], "num_classes": shape["num_classes"], "embed_dim": shape["embed_dim"],
        "depth": max(1, int(round(shape["depth"] * depth_ratio))), "num_heads": shape["num_heads"],
        "mlp_ratio": shape["mlp_ratio"], "qkv_bias": shape["qkv_bias"], **cit_kwargs,
    }
    try:
        cit = create_model("vitshrink_cit", **kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"cannot derive a CiT from the teacher: {exc}") from None
    set_data_config(cit, input_size=data_config(teacher)["input_size"])
    copy_data_config(cit, teacher)
    if init:
        init_cit_from_vit(cit, teacher)
    return cit
