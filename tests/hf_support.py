"""A tiny Hugging Face ViT checkpoint for tests and the adversarial sweep (no transformers import)."""
from __future__ import annotations

import torch


def tiny_hf_vit_state() -> dict[str, torch.Tensor]:
    """A one-layer Hugging Face ViT (hidden 16, patch 8, image 16, MLP 32) state dict of zeros."""
    shapes = {"vit.embeddings.cls_token": (1, 1, 16), "vit.embeddings.position_embeddings": (1, 5, 16),
              "vit.embeddings.patch_embeddings.projection.weight": (16, 3, 8, 8),
              "vit.embeddings.patch_embeddings.projection.bias": (16,),
              "vit.layernorm.weight": (16,), "vit.layernorm.bias": (16,)}
    layer = "vit.encoder.layer.0."
    for name in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                 "attention.output.dense"):
        shapes[f"{layer}{name}.weight"], shapes[f"{layer}{name}.bias"] = (16, 16), (16,)
    shapes[f"{layer}intermediate.dense.weight"], shapes[f"{layer}intermediate.dense.bias"] = (32, 16), (32,)
    shapes[f"{layer}output.dense.weight"], shapes[f"{layer}output.dense.bias"] = (16, 32), (16,)
    for norm in ("layernorm_before", "layernorm_after"):
        shapes[f"{layer}{norm}.weight"], shapes[f"{layer}{norm}.bias"] = (16,), (16,)
    return {name: torch.zeros(shape) for name, shape in shapes.items()}
