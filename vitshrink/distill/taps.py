"""Feature taps: named points of a model turned into tensors during a forward.

A *point* is a name from ``model.named_modules()`` (``"blocks.2"``, ``"layer1"``, ``"stages.0"``), optionally
with a suffix:

* ``"NAME"`` -- the module's output;
* ``"NAME:input"`` -- the module's (first) input;
* ``"blocks.N:attn"`` -- the attention map (B, heads, N, N) of block N's timm ``Attention``;
* ``"blocks.N:cls_attn"`` -- the class token's attention row (B, heads, N) of that block;
* ``"blocks.N:qkv"`` -- that block's query, key and value, stacked (3, B, heads, N, head_dim), q and k after
  the block's ``q_norm`` / ``k_norm`` (what its softmax sees).

timm's ``Attention`` runs a fused kernel that returns no weights, so the attention points hook the
block's ``attn.qkv`` projection and recompute the softmax from the q and k it already produced: no extra
projection and no change to the forward. Losses receive the dict of features, never the model.

:class:`FeatureTaps` uses forward hooks, removed on exit. :func:`forward_with_taps` uses timm's
``forward_intermediates`` when every point is a plain block of a model that has it, hooks otherwise; both
give the same tensors (tests/test_taps.py).
"""
from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

ATTENTION_SUFFIXES = ("attn", "cls_attn", "qkv")
_BLOCK = re.compile(r"^blocks\.(\d+)$")


def parse_point(point: str) -> tuple[str, str]:
    """``"blocks.2:attn"`` -> ``("blocks.2", "attn")``; no suffix -> ``(name, "output")``."""
    name, _, suffix = point.partition(":")
    suffix = suffix or "output"
    if suffix not in ("output", "input", *ATTENTION_SUFFIXES):
        raise ValueError(f"feature point {point!r}: unknown suffix {suffix!r} (output, input, attn, cls_attn, qkv)")
    return name, suffix


def split_qkv(attn: nn.Module, qkv: torch.Tensor) -> torch.Tensor:
    """The output of a timm ``Attention``'s fused ``qkv`` as (3, B, heads, N, head_dim), q and k normed."""
    batch, tokens, width = qkv.shape
    heads = attn.num_heads
    q, k, v = qkv.reshape(batch, tokens, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4)
    return torch.stack([attn.q_norm(q), attn.k_norm(k), v])


def _attention_from_qkv(attn: nn.Module, qkv: torch.Tensor, class_row: bool) -> torch.Tensor:
    q, k, _ = split_qkv(attn, qkv)
    q = q[:, :, :1] if class_row else q
    scale = getattr(attn, "scale", q.shape[-1] ** -0.5)
    weights = ((q.float() @ k.float().transpose(-2, -1)) * scale).softmax(dim=-1)
    return weights.squeeze(2) if class_row else weights


class FeatureTaps(dict):
    """Context manager filling itself (point -> tensor) during each forward of ``model`` inside it.

    ``with FeatureTaps(model, ["blocks.2", "blocks.1:cls_attn"]) as feats: model(x)``. ``detach=True`` stores
    detached tensors (a frozen teacher's features). Hooks are removed on exit.
    """

    def __init__(self, model: nn.Module, points: Iterable[str], *, detach: bool = False):
        super().__init__()
        self.model, self.points, self.detach = model, list(points), detach
        self._handles: list = []

    def _store(self, point: str, tensor: torch.Tensor) -> None:
        self[point] = tensor.detach() if self.detach else tensor

    def _module(self, name: str) -> nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"feature point {name!r}: no such module in {type(self.model).__name__}") from None

    def _hook(self, point: str) -> None:
        name, suffix = parse_point(point)
        module = self._module(name)
        if suffix in ATTENTION_SUFFIXES:
            attn = getattr(module, "attn", module)
            if not isinstance(getattr(attn, "qkv", None), nn.Linear) or not hasattr(attn, "num_heads"):
                raise ValueError(f"feature point {point!r}: {name} has no timm attention with a fused qkv")
            class_row = suffix == "cls_attn"

            def record_attention(_m, _inputs, qkv, point=point, attn=attn, class_row=class_row, suffix=suffix):
                qkv = qkv.detach() if self.detach else qkv
                self._store(point, split_qkv(attn, qkv) if suffix == "qkv"
                            else _attention_from_qkv(attn, qkv, class_row))
            self._handles.append(attn.qkv.register_forward_hook(record_attention))
        elif suffix == "input":
            self._handles.append(module.register_forward_pre_hook(
                lambda _m, inputs, point=point: self._store(point, inputs[0])))
        else:
            self._handles.append(module.register_forward_hook(
                lambda _m, _inputs, output, point=point: self._store(point, output)))

    def __enter__(self) -> "FeatureTaps":
        try:
            for point in self.points:
                self._hook(point)
        except Exception:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, *exc) -> None:
        self.remove()


def _block_indices(model: nn.Module, points: list[str]) -> list[int] | None:
    """Block indices when every point is a plain ``blocks.N`` of a model with ``forward_intermediates``."""
    if not points or not hasattr(model, "forward_intermediates") or not hasattr(model, "blocks"):
        return None
    matches = [_BLOCK.match(point) for point in points]
    if not all(matches):
        return None
    indices = [int(m.group(1)) for m in matches]
    return indices if max(indices) < len(model.blocks) else None  # out of range: hooks name the point


def forward_with_taps(model: nn.Module, x: torch.Tensor, points: Iterable[str]
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(model output, {point: tensor})`` in one forward.

    timm's ``forward_intermediates`` (tokens in (B, N, C) with the prefix tokens first, as the blocks emit
    them) when every point is a block of a model that has it; hooks otherwise.
    """
    points = list(points)
    indices = _block_indices(model, points)
    if indices is None:
        with FeatureTaps(model, points) as feats:
            output = model(x)
        return output, dict(feats)
    final, intermediates = model.forward_intermediates(x, indices=sorted(set(indices)), output_fmt="NLC",
                                                       return_prefix_tokens=True, norm=False)
    by_index = {}
    for index, item in zip(sorted(set(indices)), intermediates):
        spatial, prefix = item if isinstance(item, tuple) else (item, None)
        by_index[index] = spatial if prefix is None else torch.cat([prefix, spatial], dim=1)
    return model.forward_head(final), {point: by_index[i] for point, i in zip(points, indices)}
