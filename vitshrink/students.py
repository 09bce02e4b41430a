"""Students: parse ``--student SPEC``, derive a half-FLOPs student from a ViT teacher, initialise from the teacher.

A SPEC is a file (anything ``vitshrink.io.load_model`` reads; its weights are kept) or a timm name with
keyword arguments, ``NAME:key=value,key=value`` (values parsed as int, float, bool, None or str), e.g.
``vit_tiny_patch16_224:img_size=32,patch_size=4,depth=6``. A student built from a name (or derived) is
initialised from the teacher's weights wherever the shapes allow (nothing, for a CNN teacher): block ``j`` of the student takes the
teacher block picked by :func:`kept_blocks`, position embeddings are resampled to the student's grid
(timm's ``resample_abs_pos_embed``). A student wider or deeper than the teacher cannot be initialised
that way and is refused with a ``UserError`` (unless initialisation is switched off).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from vitshrink.errors import UserError
from vitshrink.io import create_model, data_config, load_model, record_of, set_data_config

if TYPE_CHECKING:
    from timm.models.deit import VisionTransformerDistilled

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.*)$")
_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".th", ".bin")


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_student_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"NAME:k=v,k=v"`` -> ``(NAME, {k: v})`` with int/float/bool/None values parsed."""
    name, _, rest = spec.partition(":")
    if not name:
        raise UserError(f"--student {spec!r}: expected NAME or NAME:key=value,...")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--student {spec!r}: {item!r} is not key=value")
        kwargs[key.strip()] = _parse_value(value.strip())
    return name, kwargs


def kept_blocks(teacher_depth: int, student_depth: int) -> list[int]:
    """Evenly spaced teacher blocks for a shallower student, always keeping the first and the last."""
    if student_depth > teacher_depth:
        raise ValueError("student deeper than teacher")
    if student_depth == 1:
        return [teacher_depth - 1]
    return [round(i * (teacher_depth - 1) / (student_depth - 1)) for i in range(student_depth)]


def _depth(model: nn.Module) -> int | None:
    blocks = getattr(model, "blocks", None)
    return len(blocks) if isinstance(blocks, nn.Sequential | nn.ModuleList) else None


def copy_data_config(target: nn.Module, source: nn.Module) -> None:
    """Give ``target`` the preprocessing of ``source`` (its weights were trained with it); keep its own size."""
    cfg = data_config(source)
    set_data_config(target, mean=cfg["mean"], std=cfg["std"], interpolation=cfg.get("interpolation"),
                    crop_pct=cfg.get("crop_pct"))
    source_record, target_record = record_of(source), record_of(target)
    if source_record is not None and target_record is not None:
        target_record.class_names = source_record.class_names


def init_from_teacher(student: nn.Module, teacher: nn.Module, *, strict: bool = True) -> dict[str, int]:
    """Copy the teacher's weights into ``student`` wherever the shapes allow; return counts.

    With ``strict`` a student that is deeper than the teacher or has any tensor larger than the teacher's
    counterpart raises ``UserError``. Narrower tensors, and every tensor of a student from another family
    (a ViT student of a CNN teacher: nothing shared, ``copied == 0``), are left as created.
    """
    from timm.layers import resample_abs_pos_embed

    own_init = getattr(student, "init_from_vit_teacher", None)
    if callable(own_init):
        # Students with their own token layout (CiT: three prefix tokens, two stems) map a ViT teacher themselves.
        untouched = {"copied": 0, "left_as_created": len(student.state_dict()), "wider": 0}
        if _depth(teacher) is None:
            return untouched
        try:
            return {"wider": 0, **own_init(teacher)}
        except UserError:
            if strict:
                raise
            return untouched
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    t_depth, s_depth = _depth(teacher), _depth(student)
    block_map: dict[int, int] = {}
    if s_depth is not None and t_depth is not None:
        if s_depth > t_depth and strict:
            raise UserError(f"--student has {s_depth} blocks, the teacher {t_depth}: a deeper student cannot be "
                            "initialised from the teacher (set init_from_teacher: false)")
        block_map = dict(enumerate(kept_blocks(t_depth, min(s_depth, t_depth))))
    copied, wider, skipped = 0, [], 0
    new_state = {}
    for key, value in s_state.items():
        match = _BLOCK_KEY.match(key)
        source_key = key
        if match is not None and int(match.group(1)) in block_map:
            source_key = f"blocks.{block_map[int(match.group(1))]}.{match.group(2)}"
        source = t_state.get(source_key)
        if source is None or source.dim() != value.dim():
            skipped += 1
            continue
        if key == "pos_embed" and source.shape != value.shape and source.shape[-1] == value.shape[-1]:
            # Same width, different grid (the student runs at another resolution): resample.
            prefix = getattr(student, "num_prefix_tokens", 1)
            grid = student.patch_embed.grid_size
            source = resample_abs_pos_embed(source, new_size=list(grid), num_prefix_tokens=prefix)
        if source.shape == value.shape:
            new_state[key] = source.detach().clone()
            copied += 1
        elif any(s > t for s, t in zip(value.shape, source.shape)):
            wider.append(f"{key} {tuple(value.shape)} > {tuple(source.shape)}")
        else:
            skipped += 1
    if strict and wider:
        raise UserError(f"--student is wider than the teacher ({wider[0]}): it cannot be initialised from the "
                        "teacher (set init_from_teacher: false to train it from scratch)")
    student.load_state_dict(new_state, strict=False)
    return {"copied": copied, "left_as_created": len(s_state) - copied, "wider": len(wider)}


def derive_student(teacher: nn.Module, *, depth_ratio: float = 0.5, init: bool = True) -> nn.Module:
    """A student with ``depth_ratio`` of the teacher's blocks (about that share of its FLOPs), same width.

    Works for any timm model built with a ``depth`` kwarg and ``blocks.N`` layout (ViT, DeiT, the pruned
    per-block ViT): kwargs given per block (lists as long as the depth) are subset to the kept blocks.
    """
    record = record_of(teacher)
    t_depth = _depth(teacher)
    if record is None or t_depth is None:
        raise UserError(f"cannot derive a student from a {type(teacher).__name__} teacher (not a ViT with "
                        "blocks); pass --student NAME:key=value,...")
    s_depth = max(1, int(round(t_depth * depth_ratio)))
    kept = kept_blocks(t_depth, s_depth)
    kwargs = dict(record.kwargs)
    per_block = record.name.startswith("vitshrink_vit")  # per-block lists instead of a depth
    for key, value in kwargs.items():
        if isinstance(value, list) and len(value) == t_depth and (not per_block or key.startswith("block_")
                                                                   or key == "kept_blocks"):
            kwargs[key] = [value[i] for i in kept]
    if not per_block:
        kwargs["depth"] = s_depth
    try:
        student = create_model(record.name, **kwargs)
    except TypeError as exc:
        raise UserError(f"cannot derive a student from teacher {record.name}: {exc}") from None
    set_data_config(student, input_size=data_config(teacher)["input_size"])
    copy_data_config(student, teacher)
    if init:
        init_from_teacher(student, teacher)
    return student


def deit_tiny_student(teacher: nn.Module) -> tuple[nn.Module, str]:
    """A DeiT-Tiny-shaped ViT (width 192, 3 heads, depth 12, MLP ratio 4) for a teacher with no ViT layout.

    It takes the teacher's input size, channels and classes; the patch is the largest of 16, 8, 4, 2 that
    still gives a grid of at least 8x8 (16 at 224 px, 4 at 32 px). Returns the student and a note to print.
    """
    channels, height, width = data_config(teacher)["input_size"]
    side = min(height, width)
    patch = next((p for p in (16, 8, 4, 2) if side // p >= 8), 1)
    num_classes = getattr(teacher, "num_classes", None)
    if not num_classes:
        raise UserError(f"cannot derive a student from a {type(teacher).__name__} teacher: its number of classes "
                        "is unknown; pass --student NAME:key=value,...")
    student = create_model("vit_tiny_patch16_224", img_size=(height, width), patch_size=patch, in_chans=channels,
                           num_classes=num_classes, embed_dim=192, num_heads=3, depth=12, mlp_ratio=4.0)
    set_data_config(student, input_size=(channels, height, width))
    copy_data_config(student, teacher)
    note = (f"student: the {type(teacher).__name__} teacher has no ViT blocks to copy, so a DeiT-Tiny-shaped ViT "
            f"was derived (width 192, 3 heads, depth 12, MLP ratio 4, patch {patch} at {height}x{width}, "
            f"{num_classes} classes), trained from its own init; pass --student NAME:key=value,... to choose")
    return student, note


def resolve_student(spec: str | nn.Module | None, teacher: nn.Module, *, init: bool = True) -> nn.Module:
    """The student for a run: derived (None), a module as given, a file (weights kept), or a timm name."""
    if spec is None:
        return derive_student(teacher, init=init)
    if isinstance(spec, nn.Module):
        return spec
    spec = str(spec)
    if Path(spec).suffix in _FILE_SUFFIXES or Path(spec).is_dir():
        if not Path(spec).exists():
            raise UserError(f"--student {spec}: file not found")
        return load_model(spec)
    name, kwargs = parse_student_spec(spec)
    kwargs.setdefault("num_classes", getattr(teacher, "num_classes", None) or kwargs.get("num_classes"))
    try:
        student = create_model(name, **kwargs)
    except RuntimeError as exc:  # timm: unknown model name
        raise UserError(f"--student {spec}: {exc}") from None
    except TypeError as exc:  # an argument the model does not take
        raise UserError(f"--student {spec}: {exc}") from None
    copy_data_config(student, teacher)
    if init:
        init_from_teacher(student, teacher)
    return student


def vit_kwargs(model: nn.Module) -> dict[str, Any]:
    """The kwargs that rebuild a uniform timm ViT's shape (read from the module, not from its name)."""
    block = model.blocks[0]
    return {
        "img_size": tuple(model.patch_embed.img_size),
        "patch_size": tuple(model.patch_embed.patch_size),
        "in_chans": model.patch_embed.proj.in_channels,
        "num_classes": model.num_classes,
        "embed_dim": model.embed_dim,
        "depth": len(model.blocks),
        "num_heads": block.attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim,
        "qkv_bias": block.attn.qkv.bias is not None,
    }


# timm's registered distilled ViT; the shape kwargs given override the name's defaults.
DISTILLED_ARCH = "deit_tiny_distilled_patch16_224"


def add_distillation_token(student: nn.Module, recipe: str = "deit") -> "VisionTransformerDistilled":
    """The distilled twin of a uniform timm ViT, keeping every weight it has.

    The new distillation token, its position embedding and the distillation head start as copies of the
    class token, its position embedding and the class head: the two tokens stay equal through every block,
    so both heads start out agreeing. (The duplicated token is attended to twice, so the logits are close
    to the original model's, not identical.) Shared by the recipes that train a distillation token
    (``deit``, ``dearkd``); ``recipe`` names the one asking in the error.
    """
    import torch
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(student, VisionTransformerDistilled):
        return student
    if not isinstance(student, VisionTransformer) or getattr(student, "cls_token", None) is None \
            or student.num_reg_tokens or student.global_pool != "token":
        raise UserError(f"--recipe {recipe} needs a timm ViT student with a class token and token pooling, got "
                        f"{type(student).__name__}")
    record = record_of(student)
    if record is not None and record.name == "vitshrink_vit":  # keeps its block and head variants
        distilled = create_model("vitshrink_vit_distilled", **record.kwargs)
    else:
        distilled = create_model(DISTILLED_ARCH, **vit_kwargs(student))
    set_data_config(distilled, input_size=data_config(student)["input_size"])
    copy_data_config(distilled, student)
    state = student.state_dict()
    pos = state["pos_embed"]
    state["pos_embed"] = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)
    state["dist_token"] = state["cls_token"].clone()
    state["head_dist.weight"] = state["head.weight"].clone()
    state["head_dist.bias"] = state["head.bias"].clone()
    distilled.load_state_dict(state)
    return distilled
