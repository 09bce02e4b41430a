"""Parameters and MACs/FLOPs (attention included) of torch models and ONNX files.

Counting convention (used everywhere in vitshrink; MACs and FLOPs are different numbers):

* **MACs** are multiply-accumulates of the matrix products of one forward pass at batch size 1:
  convolutions, linear layers, ``matmul``/``bmm``/``baddbmm``/``einsum`` and fused attention
  (``F.scaled_dot_product_attention``: Q@K^T and attn@V, i.e. ``2 * heads * N_q * N_k * head_dim``).
  Bias adds, norms, activations, softmax, residual adds and pooling are **not** counted.
* **FLOPs = 2 x MACs.**

Counting is op-level, with torch's ``FlopCounterMode``, so it follows whatever a model actually
runs: pruned ViTs whose blocks have their own widths, custom attention modules, CNNs. torch's
registry has formulas for the CUDA attention kernels but not for the CPU one
(``aten._scaled_dot_product_flash_attention_for_cpu``), which is why thop/fvcore/a bare
``FlopCounterMode`` under-count timm ViTs on CPU (deit_tiny: 1.075 instead of 1.254 GMACs); the
missing kernels are added here with torch's own ``sdpa_flop_count`` formula.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils import flop_counter

from vitshrink.runtime import eval_mode, model_device, resolve_input_size

# ONNX ops whose MACs ``count_onnx_macs`` knows how to count.
_ONNX_COUNTED = ("MatMul", "Gemm", "Conv")
# ONNX ops that do matrix products but are not counted (their presence makes the count a lower bound).
_ONNX_UNCOUNTED_PRODUCTS = ("Einsum", "Attention", "MultiHeadAttention", "ConvTranspose", "MatMulInteger",
                            "QLinearMatMul", "QLinearConv", "ConvInteger")



def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once; buffers are not parameters)."""
    return sum(p.numel() for p in model.parameters())


@dataclass
class FlopCount:
    """MACs of one forward pass at batch size 1 (see the module docstring for what is counted)."""

    macs: int
    input_size: tuple[int, ...]
    by_module: dict[str, int] = field(default_factory=dict)  # MACs per submodule name, e.g. "blocks.0.attn"
    by_op: dict[str, int] = field(default_factory=dict)  # MACs per op, e.g. "aten.addmm"

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "input_size": list(self.input_size), "flops": self.flops,
                "gmacs": self.gmacs, "gflops": self.gflops}


def _sdpa_formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # Same formula torch registers for its CUDA attention kernels (FLOPs, i.e. 2 x MACs).
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _missing_attention_formulas() -> dict[Any, Callable]:
    """Fused-attention kernels that torch's flop registry lacks (the CPU one, at least)."""
    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable",
             "_scaled_dot_product_attention_math_for_mps")
    mapping = {}
    for name in names:
        op = getattr(torch.ops.aten, name, None)
        if op is not None and op not in flop_counter.flop_registry:
            mapping[op] = _sdpa_formula
    return mapping


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Parameters with ``requires_grad`` off for the count, each restored afterwards.

    FlopCounterMode's module tracker hooks the gradients of every module's tensor inputs; under ``no_grad`` a
    view of a trainable parameter (the latent query a SigLIP attention-pooling head expands) requires grad but
    has no gradient function, and the tracker fails on it ("Expected gradient function to be set").
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def count_flops(model: nn.Module, input_size: Sequence[int] | None = None, *, module_depth: int = 3) -> FlopCount:
    """MACs (and FLOPs = 2 x MACs) of one eval-mode forward pass at batch size 1.

    ``input_size`` is (C, H, W); the default is the model's data config (``loading.data_config``).
    ``by_module`` lists submodules down to ``module_depth`` dotted levels ("blocks.0.attn" is 3).
    Only shapes matter, so a model built under ``torch.device("meta")`` is counted without weights.
    """
    size = resolve_input_size(model, input_size)
    param = next(model.parameters(), None)
    x = torch.randn(1, *size, device=model_device(model), dtype=param.dtype if param is not None else torch.float32)
    counter = flop_counter.FlopCounterMode(display=False, depth=module_depth,
                                           custom_mapping=_missing_attention_formulas())
    with eval_mode(model), _frozen(model), torch.no_grad(), counter:
        model(x)
    counts = counter.get_flop_counts()
    total_flops = counter.get_total_flops()
    by_op = {str(op): int(n) // 2 for op, n in counts.get("Global", {}).items()}
    root = type(model).__name__
    by_module: dict[str, int] = {}
    for name, ops in counts.items():
        if not name.startswith(root + "."):
            continue  # "Global" and the root itself are the total
        short = name[len(root) + 1:]
        if short.count(".") + 1 <= module_depth:
            by_module[short] = sum(int(n) for n in ops.values()) // 2
    # FlopCounterMode counts FLOPs as 2 x MACs for every product it knows.
    return FlopCount(macs=int(total_flops) // 2, input_size=size, by_module=by_module, by_op=by_op)


def _onnx_shapes(model_proto) -> dict[str, list[int | None]]:
    shapes: dict[str, list[int | None]] = {}
    graph = model_proto.graph
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def count_onnx_params(path: str | os.PathLike) -> int:
    """Number of weights stored in an ONNX file: elements of its float initializers with more than one element.

    Scalars are constants (e.g. the attention scale) and integer initializers are shapes/indices.
    This counts what the file stores, which can differ slightly from the torch model's parameter
    count: the exporter folds BatchNorm into conv weights and biases, and stores bit-identical
    tensors once (an untrained model's LayerNorm ones/zeros).
    """
    import onnx

    model_proto = onnx.load(str(path), load_external_data=False)
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                   onnx.TensorProto.DOUBLE}
    return sum(math.prod(init.dims) for init in model_proto.graph.initializer
               if init.data_type in float_types and math.prod(init.dims) > 1)


def count_onnx_macs(path: str | os.PathLike, input_size: Sequence[int] | None = None) -> tuple[FlopCount | None, str | None]:
    """MACs of an ONNX classifier at batch 1, from ONNX shape inference: ``(count, None)`` or ``(None, reason)``.

    Counts MatMul (``numel(out) * K``), Gemm (``M * N * K``) and Conv (``numel(out) * C_in/groups * kH * kW``),
    the same convention as ``count_flops``. A graph with other matrix-product ops (Einsum, fused
    Attention, ...) or a shape inference cannot resolve gets ``None`` and the reason.
    """
    import onnx

    model_proto = onnx.load(str(path), load_external_data=False)
    graph_input = model_proto.graph.input[0]
    dims = graph_input.type.tensor_type.shape.dim
    static = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
    size = tuple(int(v) for v in input_size) if input_size is not None else tuple(static)
    if any(v is None for v in size):
        return None, f"{path}: input {graph_input.name} has symbolic spatial dims; pass input_size"
    # Fix batch (and any symbolic dims) so that inference yields concrete shapes.
    for dim, value in zip(dims, (1, *size)):
        dim.ClearField("dim_param")
        dim.dim_value = int(value)
    try:
        inferred = onnx.shape_inference.infer_shapes(model_proto, data_prop=True)
    except Exception as exc:  # onnx raises InferenceError and friends
        return None, f"ONNX shape inference failed ({type(exc).__name__}: {exc})"
    shapes = _onnx_shapes(inferred)
    uncounted = sorted({n.op_type for n in inferred.graph.node if n.op_type in _ONNX_UNCOUNTED_PRODUCTS})
    if uncounted:
        return None, f"graph has matrix-product ops that are not counted: {', '.join(uncounted)}"
    by_op: dict[str, int] = {}
    for node in inferred.graph.node:
        if node.op_type not in _ONNX_COUNTED:
            continue
        a, b = (shapes.get(name) for name in node.input[:2])
        out = shapes.get(node.output[0])
        if not a or not b or not out or None in a or None in b or None in out:
            return None, f"shape inference left the shapes of {node.op_type} node {node.name!r} unknown"
        if node.op_type == "MatMul":
            macs = math.prod(out) * a[-1]
        elif node.op_type == "Gemm":
            trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
            macs = math.prod(out) * (a[0] if trans_a else a[1])
        else:  # Conv: weight is (C_out, C_in / groups, *kernel)
            macs = math.prod(out) * math.prod(b[1:])
        by_op[node.op_type] = by_op.get(node.op_type, 0) + int(macs)
    return FlopCount(macs=sum(by_op.values()), input_size=size, by_op=by_op), None
