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
from vitshrink.io.record import check_kwargs
from vitshrink.io.weights import require_timm_name

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


def check_student_cost(student: nn.Module, teacher: nn.Module, what: str = "the derived student") -> tuple[float, float]:
    """Refuse (``UserError`` naming both GMACs) a student that costs more MACs than its teacher; return both GMACs.

    Each model is counted at its own input size (``vitshrink.measure.count_flops``), before any training.
    """
    from vitshrink.measure import count_flops

    student_gmacs, teacher_gmacs = count_flops(student).gmacs, count_flops(teacher).gmacs
    if student_gmacs > teacher_gmacs:
        raise UserError(f"{what} costs {student_gmacs:.4g} GMACs, more than the teacher's {teacher_gmacs:.4g} GMACs "
                        "(a student should be smaller); pass --student NAME:key=value,... to choose a smaller one")
    return student_gmacs, teacher_gmacs


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
    if s_depth > t_depth:
        raise UserError(f"student_depth_ratio {depth_ratio:g} gives {s_depth} blocks, more than the teacher's "
                        f"{t_depth}: a derived student must be smaller (use a ratio <= 1)")
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
    check_student_cost(student, teacher)
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
    student_gmacs, teacher_gmacs = check_student_cost(student, teacher, "the derived DeiT-Tiny-shaped student")
    note = (f"student: the {type(teacher).__name__} teacher has no ViT blocks to copy, so a DeiT-Tiny-shaped ViT "
            f"was derived (width 192, 3 heads, depth 12, MLP ratio 4, patch {patch} at {height}x{width}, "
            f"{num_classes} classes, {student_gmacs:.4g} GMACs vs the teacher's {teacher_gmacs:.4g}), trained from "
            "its own init; pass --student NAME:key=value,... to choose")
    return student, note


def check_student_spec(spec: str | None) -> None:
    """``--student`` before any work: a spec's kwargs against the allow-list, a vitshrink file's record."""
    if spec is None:
        return
    path = Path(spec)
    if path.suffix == ".safetensors" and path.is_file():
        from vitshrink.io.readers import read_metadata
        from vitshrink.io.record import METADATA_KEY, ModelRecord

        metadata = read_metadata(path)
        if METADATA_KEY in metadata:
            ModelRecord.from_json(metadata[METADATA_KEY], path)
        return
    if path.suffix in _FILE_SUFFIXES or path.is_dir():
        return  # checked when loaded
    name, kwargs = parse_student_spec(spec)
    check_kwargs(f"--student {spec}", kwargs)
    require_timm_name(name, "--student model (a timm model name; vitshrink does not download)")


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
    check_kwargs(f"--student {spec}", kwargs)  # shapes only: never pretrained weights, a URL or a file
    require_timm_name(name, "--student model (a timm model name; vitshrink does not download)")
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
# vitshrink_vit kwargs at which timm's DeiT layout (class token, token pooling, plain pre-norm blocks) is exact.
_PLAIN_DEIT = {"global_pool": "token", "class_token": True, "reg_tokens": 0, "no_embed_class": False,
               "pos_embed": "learn", "pre_norm": False, "final_norm": True, "fc_norm": False,
               "pool_include_prefix": False, "dynamic_img_size": False, "qkv_bias": True, "qk_norm": False,
               "proj_bias": True, "init_values": None, "norm_eps": 1e-6, "act_layer": "gelu",
               "norm_placement": "pre", "shared_norm": False, "head_hidden": 0, "head_act": "tanh",
               "head_softmax": False, "fixed_pos_embed": False}
_SHAPE_KEYS = {"img_size", "patch_size", "in_chans", "embed_dim", "num_classes", "block_num_heads",
               "block_head_dims", "block_mlp_hidden", "kept_blocks"}


def _is_plain_deit(kwargs: dict[str, Any]) -> bool:
    """Whether timm's ``VisionTransformerDistilled`` rebuilds this ``vitshrink_vit`` exactly (uniform widths too)."""
    if set(kwargs) - _SHAPE_KEYS - set(_PLAIN_DEIT) or any(kwargs.get(k, v) != v for k, v in _PLAIN_DEIT.items()):
        return False
    heads, dims, hidden = kwargs["block_num_heads"], kwargs["block_head_dims"], kwargs["block_mlp_hidden"]
    return (len(set(heads)) == len(set(dims)) == len(set(hidden)) == 1 and heads[0] * dims[0] == kwargs["embed_dim"]
            and heads[0] > 0 and hidden[0] > 0)


def add_distillation_token(student: nn.Module, recipe: str = "deit") -> nn.Module:
    """The distilled twin of a timm ViT (or ``vitshrink_vit``), keeping every weight and every layout choice it has.

    The original DeiT layout becomes timm's ``VisionTransformerDistilled``; any other (LayerScale, registers,
    ``norm_pre``, ``no_embed_class``, qk-norm, average or attention pooling, per-block widths) becomes
    ``vitshrink_vit_distilled``, which keeps all of them; blocks ``vitshrink_vit`` cannot rebuild (parallel blocks,
    EVA-02 / RoPE ViTs) become ``vitshrink_distilled`` around the student's own timm model. The new distillation token starts as the class token
    as the first block sees it (or as a fresh token when there is no class token) and the distillation head as
    a copy of the class head, so both heads start out agreeing (exactly, with a class token and token pooling).
    Shared by the recipes that train a distillation token (``deit``, ``dearkd``); ``recipe`` names the one asking.
    """
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    from vitshrink.models.distilled_vit import DistillationToken
    from vitshrink.prune.surgery import check_sliceable, full_plan, slice_vit

    if isinstance(student, VisionTransformerDistilled | DistillationToken):
        return student
    record = record_of(student)
    if isinstance(student, Eva) and record is not None:  # EVA-02 / RoPE: timm's own Eva takes the token
        return _with_token(student, "vitshrink_distilled", {"base": record.name, **record.kwargs},
                           student.state_dict())
    if not isinstance(student, VisionTransformer):
        raise UserError(f"--recipe {recipe} needs a timm ViT student (a distillation token joins its tokens), got "
                        f"{type(student).__name__}")
    try:
        check_sliceable(student)
    except UserError as exc:
        # Blocks vitshrink_vit cannot rebuild (parallel blocks, RmsNorm): timm builds them by name instead.
        if record is None or record.name.startswith("vitshrink"):
            raise UserError(f"--recipe {recipe}: the student cannot take a distillation token: "
                            f"{str(exc).removeprefix('cannot prune: ')}") from None
        return _with_token(student, "vitshrink_distilled", {"base": record.name, **record.kwargs},
                           student.state_dict())
    twin = slice_vit(student, full_plan(student))  # the same function as vitshrink_vit, every layout choice kept
    kwargs = dict(record_of(twin).kwargs)
    if _is_plain_deit(kwargs):
        return _timm_distilled(student)
    return _with_token(student, "vitshrink_vit_distilled", kwargs, twin.state_dict())


def _with_token(student: nn.Module, name: str, kwargs: dict[str, Any], state: dict[str, Any]) -> nn.Module:
    """``name`` built with ``kwargs`` and loaded with ``state`` plus the distillation token and head it adds."""
    try:
        distilled = create_model(name, **kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"the student cannot take a distillation token ({exc})") from None
    set_data_config(distilled, input_size=data_config(student)["input_size"])
    copy_data_config(distilled, student)
    state = dict(state)
    if "cls_token" in state:
        token = state["cls_token"]
        if not getattr(student, "no_embed_class", False) and "pos_embed" in state:
            token = token + state["pos_embed"][:, :1]  # the class token as the blocks see it
        state["dist_token"] = token.clone()
    else:
        state["dist_token"] = distilled.dist_token.detach().clone()
    for suffix in ("weight", "bias"):
        if f"head.{suffix}" in state:
            state[f"head_dist.{suffix}"] = state[f"head.{suffix}"].clone()
    distilled.load_state_dict(state)
    return distilled


def _timm_distilled(student: nn.Module) -> "VisionTransformerDistilled":
    """timm's DeiT twin of a plain ViT: the distillation token and its position embedding copy the class ones.

    The two tokens stay equal through every block, so both heads start out agreeing. (The duplicated token is
    attended to twice, so the logits are close to the original model's, not identical.)
    """
    import torch

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
