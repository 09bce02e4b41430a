"""What applies to a teacher before any work: its family in words, and what a recipe cannot do with it.

Recipes call these checks from ``build_student``, before any search or epoch, so that a family a recipe cannot
handle is one ``UserError`` line naming what is missing (not a traceback, or a refusal after a whole search),
and a setting that cannot apply is adjusted with a note saying so:

* ``uvc`` slices timm's ``Attention``/``Mlp`` blocks (``vitshrink.prune.surgery``): RoPE (EVA-02, ``vit_*_rope_*``),
  relative-position-bias (BEiT) and parallel-block ViTs are refused by name; under qk-norm the q/k norm spans the
  whole head, so head-dim pruning (``prune_head_dims``) is switched off with a note; a ``map`` attention-pooling head
  (SigLIP) is kept whole.
* ``deit`` derives a distillation-token student from the teacher's own blocks (parallel blocks, EVA-02 and RoPE
  included): relative-position-bias ViTs (BEiT: the bias table has one class-token row) are refused unless
  ``--student`` names one; a CNN teacher gets DeiT's own
  DeiT-Tiny-shaped student (its cost checked).
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from vitshrink.errors import UserError
from vitshrink.io import record_of


PARALLEL, ROPE = "a parallel-block ViT", "a ViT with rotary position embeddings"


def model_name(model: nn.Module) -> str:
    """The timm name a model was built as (its record), else its class name."""
    record = record_of(model)
    return record.name if record is not None else type(model).__name__


def other_blocks(model: nn.Module) -> str | None:
    """``None`` for a ViT of timm's plain blocks (or a ``vitshrink_vit``); else what its blocks are, in words."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        return None
    block = blocks[0]
    attn = getattr(block, "attn", None)
    if hasattr(block, "attns") and hasattr(block, "ffns"):
        return f"{PARALLEL} ({type(block).__name__}: {len(block.attns)} attention and MLP branches side by side)"
    if hasattr(block, "in_proj") and hasattr(block, "mlp_out_proj"):
        return f"{PARALLEL} ({type(block).__name__}: attention and MLP in one fused projection)"
    if getattr(model, "rope", None) is not None or "Rope" in type(attn).__name__:
        return f"{ROPE} ({type(model).__name__}: RoPE inside every attention)"
    if getattr(model, "rel_pos_bias", None) is not None or hasattr(attn, "relative_position_bias_table"):
        return f"a ViT with relative position bias ({type(model).__name__}: a learned bias table in every attention)"
    if type(model).__name__ in ("Eva", "Beit"):
        return f"an {type(model).__name__} ViT ({type(block).__name__} blocks, {type(attn).__name__})"
    return None


def check_uvc_applies(teacher: nn.Module, cfg: dict[str, Any], log: Callable[[str], None]) -> None:
    """Refuse a teacher ``uvc`` cannot slice, naming its family; switch off head-dim pruning under qk-norm (noted).

    ``cfg`` is the run's settings (changed in place, so the search and ``args.yaml`` see the adjustment).
    """
    from vitshrink.prune.surgery import check_sliceable

    family = other_blocks(teacher)
    if family is not None:
        raise UserError(f"--recipe uvc: {model_name(teacher)} is {family}; uvc slices timm ViT blocks (timm's "
                        "Attention and Mlp) only")
    check_sliceable(teacher)
    qk_norm = any(not isinstance(getattr(b.attn, "q_norm", nn.Identity()), nn.Identity)
                  for b in teacher.blocks if getattr(b, "attn", None) is not None)
    if qk_norm and cfg.get("prune_head_dims", True):
        cfg["prune_head_dims"] = False
        log("note: the teacher normalises q and k over the whole head (qk-norm), so heads cannot be narrowed: "
            "prune_head_dims=false (whole heads, MLP units and blocks are still pruned)")
    if getattr(teacher, "attn_pool", None) is not None:
        log("note: the attention-pooling head ('map') is kept whole; only the blocks are pruned")


def check_deit_applies(teacher: nn.Module, student: Any) -> None:
    """Refuse a derived DeiT student (no ``--student``) for a teacher whose blocks a distilled ViT cannot copy."""
    if student is not None:
        return  # a named student: add_distillation_token checks it
    family = other_blocks(teacher)
    if family is not None and not family.startswith((PARALLEL, ROPE)):  # timm's own model takes the token
        raise UserError(f"--recipe deit: {model_name(teacher)} is {family}, whose blocks a distillation-token ViT "
                        "cannot copy; pass --student NAME:key=value,... (a timm ViT smaller than the teacher)")
    if getattr(teacher, "global_pool", None) == "prr":
        raise UserError(f"--recipe deit: {model_name(teacher)} pools with a 'prr' attention head, which the derived "
                        "student cannot rebuild; pass --student NAME:key=value,...")
