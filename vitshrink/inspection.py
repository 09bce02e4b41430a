"""What a model is: the architecture summary behind `vitshrink inspect`."""
from __future__ import annotations

from typing import Any

from torch import nn

from vitshrink.io import data_config, record_of


def _attention_dims(attn: nn.Module | None) -> tuple[int, int]:
    """(heads, head dim) of one attention module (timm's, Eva's, BEiT's); (0, 0) when there is none."""
    heads = int(getattr(attn, "num_heads", 0) or 0) if attn is not None else 0
    head_dim = getattr(attn, "head_dim", None)
    if head_dim is None and heads and hasattr(attn, "qkv"):
        head_dim = attn.qkv.out_features // (3 * heads)
    if head_dim is None and heads and hasattr(attn, "proj"):
        head_dim = attn.proj.in_features // heads
    return heads, int(head_dim or 0)


def _mlp_hidden(mlp: nn.Module | None) -> int:
    # fc2's input is the hidden width for plain and gated (GluMlp, SwiGLU: fc1 is twice as wide) MLPs alike.
    fc2 = getattr(mlp, "fc2", None) if mlp is not None else None
    return int(getattr(fc2, "in_features", 0) or 0)


def _block_row(index: int, block: nn.Module) -> dict[str, Any]:
    """Heads, head dim and MLP width of one block; parallel blocks sum their branches (``parallel``: how many)."""
    if hasattr(block, "attns") and hasattr(block, "ffns"):  # timm ParallelThingsBlock: N attentions, N MLPs
        dims = [_attention_dims(branch.attn) for branch in block.attns]
        return {"block": index, "heads": sum(h for h, _ in dims), "head_dim": dims[0][1] if dims else 0,
                "mlp_hidden": sum(_mlp_hidden(branch.mlp) for branch in block.ffns), "parallel": len(dims)}
    if hasattr(block, "in_proj") and hasattr(block, "mlp_out_proj"):  # ParallelScalingBlock: one fused projection
        return {"block": index, "heads": int(block.num_heads), "head_dim": int(block.head_dim),
                "mlp_hidden": int(block.mlp_out_proj.in_features), "parallel": 2}
    heads, head_dim = _attention_dims(getattr(block, "attn", None))
    return {"block": index, "heads": heads, "head_dim": head_dim, "mlp_hidden": _mlp_hidden(getattr(block, "mlp", None))}


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
        if "parallel" in rows[0]:
            summary["parallel branches"] = rows[0]["parallel"]
        summary["prefix tokens"] = getattr(model, "num_prefix_tokens", 0)
        if len({tuple(r.values())[1:] for r in rows}) == 1:
            rows = []  # uniform model: the summary says it all
    summary["num classes"] = getattr(model, "num_classes", None)
    summary["parameters"] = f"{count_params(model):,}"
    summary["GMACs (batch 1)"] = round(flops.gmacs, 4)
    summary["GFLOPs (= 2 x MACs)"] = round(flops.gflops, 4)
    class_names = record.class_names if record is not None else None
    if class_names:
        summary["classes"] = ", ".join(class_names[:10]) + (" ..." if len(class_names) > 10 else "")
    return {"summary": summary, "blocks": rows}
