"""What a model is: the architecture summary behind `vitshrink inspect`."""
from __future__ import annotations

from typing import Any

from torch import nn

from vitshrink.io import data_config, record_of


def _block_row(index: int, block: nn.Module) -> dict[str, Any]:
    attn = getattr(block, "attn", None)
    mlp = getattr(block, "mlp", None)
    heads = getattr(attn, "num_heads", 0) if attn is not None else 0
    head_dim = getattr(attn, "head_dim", None)
    if head_dim is None and attn is not None and hasattr(attn, "qkv") and heads:
        head_dim = attn.qkv.out_features // (3 * heads)
    fc1 = getattr(mlp, "fc1", None)
    return {
        "block": index,
        "heads": heads,
        "head_dim": head_dim or 0,
        "mlp_hidden": getattr(fc1, "out_features", 0) if fc1 is not None else 0,
    }


def describe(model: nn.Module) -> dict[str, Any]:
    """A JSON-able summary: ``{"summary": {...}, "blocks": [per-block dims] or []}``."""
    from vitshrink.measure import count_flops, count_params

    cfg = data_config(model)
    record = record_of(model)
    flops = count_flops(model, tuple(cfg["input_size"]))
    summary: dict[str, Any] = {
        "architecture": record.name if record is not None else type(model).__name__,
        "class": type(model).__name__,
        "input size": "x".join(str(v) for v in cfg["input_size"]),
        "mean / std": f"{tuple(round(v, 4) for v in cfg['mean'])} / {tuple(round(v, 4) for v in cfg['std'])}",
    }
    blocks = getattr(model, "blocks", None)
    rows: list[dict[str, Any]] = []
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and blocks is not None:
        rows = [_block_row(i, block) for i, block in enumerate(blocks)]
        kept = getattr(model, "kept_blocks", None)
        if kept is not None:
            for row, teacher_index in zip(rows, kept):
                row["teacher_block"] = teacher_index
        summary["patch size"] = "x".join(str(v) for v in patch_embed.patch_size)
        summary["embed dim"] = getattr(model, "embed_dim", None)
        summary["depth"] = len(blocks)
        heads = {r["heads"] for r in rows}
        mlps = {r["mlp_hidden"] for r in rows}
        summary["heads"] = heads.pop() if len(heads) == 1 else "per block (see table)"
        summary["mlp hidden"] = mlps.pop() if len(mlps) == 1 else "per block (see table)"
        summary["prefix tokens"] = getattr(model, "num_prefix_tokens", 0)
        if len({tuple(r.values()) [1:] for r in rows}) == 1:
            rows = []  # uniform model: the summary says it all
    summary["num classes"] = getattr(model, "num_classes", None)
    summary["parameters"] = f"{count_params(model):,}"
    summary["GMACs (batch 1)"] = round(flops.gmacs, 4)
    summary["GFLOPs (= 2 x MACs)"] = round(flops.gflops, 4)
    class_names = record.class_names if record is not None else None
    if class_names:
        summary["classes"] = ", ".join(class_names[:10]) + (" ..." if len(class_names) > 10 else "")
    return {"summary": summary, "blocks": rows}
