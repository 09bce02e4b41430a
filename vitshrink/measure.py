"""Params, MACs/FLOPs (attention included) and latency/throughput on onnxruntime and torch.

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

import datetime
import math
import os
import platform
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils import flop_counter

from vitshrink.errors import UserError

RUNTIMES = ("onnxruntime", "torch")

# ONNX ops whose MACs ``count_onnx_macs`` knows how to count.
_ONNX_COUNTED = ("MatMul", "Gemm", "Conv")
# ONNX ops that do matrix products but are not counted (their presence makes the count a lower bound).
_ONNX_UNCOUNTED_PRODUCTS = ("Einsum", "Attention", "MultiHeadAttention", "ConvTranspose", "MatMulInteger",
                            "QLinearMatMul", "QLinearConv", "ConvInteger")


# --------------------------------------------------------------------------------------------------
# Parameters and MACs


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


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def resolve_input_size(model: nn.Module, input_size: Sequence[int] | None) -> tuple[int, ...]:
    if input_size is not None:
        size = tuple(int(v) for v in input_size)
    else:
        from vitshrink.io import data_config

        size = tuple(int(v) for v in data_config(model)["input_size"])
    if len(size) != 3 or min(size) < 1:
        raise UserError(f"input size must be (channels, height, width), got {size}")
    return size


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own training flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


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
    with eval_mode(model), torch.no_grad(), counter:
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


# --------------------------------------------------------------------------------------------------
# Latency and throughput


@dataclass
class LatencyStats:
    """Wall-clock latency of one batch after warm-up; throughput = images / mean latency."""

    batch_size: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput_ips: float
    iters: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_calls(fn: Callable[[], Any], batch_size: int, *, warmup: int = 2, iters: int | None = None,
               min_time_s: float = 2.0, min_iters: int = 3, max_iters: int = 1000,
               sync: Callable[[], None] | None = None) -> LatencyStats:
    """Time ``fn`` (one batch). Without ``iters``, run about ``min_time_s`` seconds (at least ``min_iters`` calls)."""
    sync = sync or (lambda: None)
    for _ in range(max(0, warmup)):
        fn()
    sync()
    samples: list[float] = []

    def timed_call() -> None:
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)

    if iters is None:
        timed_call()  # also the estimate of one call's time
        iters = int(min(max_iters, max(min_iters, math.ceil(min_time_s / max(samples[0], 1e-9)))))
    while len(samples) < iters:
        timed_call()
    ms = np.asarray(samples) * 1e3
    mean_ms = float(ms.mean())
    return LatencyStats(batch_size=int(batch_size), p50_ms=float(np.percentile(ms, 50)),
                        p90_ms=float(np.percentile(ms, 90)), p99_ms=float(np.percentile(ms, 99)),
                        mean_ms=mean_ms, throughput_ips=batch_size / (mean_ms / 1e3), iters=len(samples))


def torch_latency(model: nn.Module, batch_size: int, *, input_size: Sequence[int] | None = None,
                  warmup: int = 2, iters: int | None = None, min_time_s: float = 2.0,
                  autocast_dtype: torch.dtype | None = None) -> LatencyStats:
    """Eval-mode latency of ``model`` on its own device (CUDA is synchronised around every call).

    ``autocast_dtype`` (e.g. ``torch.bfloat16``) times the model under ``torch.autocast``.
    """
    size = resolve_input_size(model, input_size)
    device = model_device(model)
    x = torch.randn(batch_size, *size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    with eval_mode(model), torch.inference_mode(), amp:
        return time_calls(lambda: model(x), batch_size, warmup=warmup, iters=iters, min_time_s=min_time_s, sync=sync)


def ort_providers() -> list[str]:
    """CUDA when both onnxruntime and torch can use it, else CPU."""
    import onnxruntime as ort

    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def ort_session(path: str | os.PathLike, *, threads: int | None = None, providers: Sequence[str] | None = None):
    """An onnxruntime session (``threads`` = intra-op threads; None = onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers or ort_providers()))


def ort_latency(session, batch_size: int, input_size: Sequence[int], *, warmup: int = 2, iters: int | None = None,
                min_time_s: float = 2.0) -> LatencyStats:
    """Latency of an onnxruntime session on a random float32 batch (host input, so CUDA includes the copy)."""
    name = session.get_inputs()[0].name
    feed = {name: np.random.default_rng(0).standard_normal((batch_size, *input_size), dtype=np.float32)}
    return time_calls(lambda: session.run(None, feed), batch_size, warmup=warmup, iters=iters, min_time_s=min_time_s)


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[int]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


MAX_BENCH_BATCH = 4096


def benchmark(
    model_or_onnx_path: nn.Module | str | os.PathLike,
    *,
    batch_sizes: Sequence[int] = (1, 32),
    threads: int | None = None,
    warmup: int = 2,
    iters: int | None = None,
    min_time_s: float = 2.0,
    runtimes: Sequence[str] = RUNTIMES,
    input_size: Sequence[int] | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Params, MACs/FLOPs and latency/throughput per runtime and batch size, as a JSON-ready dict.

    A torch model is exported to a temporary ONNX file for onnxruntime (no parity check here: that is
    ``export.export_onnx``'s job) and timed as-is for torch. An ``.onnx`` path is timed on onnxruntime only;
    its params are the ONNX float initializers and its MACs come from ONNX shape inference
    (``count_onnx_macs``; ``None`` plus ``flops_note`` when that cannot count them).
    ``threads`` sets torch's threads and onnxruntime's intra-op threads for the run (restored after).
    Without ``iters``, each batch size is timed for about ``min_time_s`` seconds (at least 3 calls).
    """
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown or not runtimes:
        raise UserError(f"--runtime: unknown runtime(s) {unknown or list(runtimes)}; choose from {list(RUNTIMES)}")
    from vitshrink.validate import check_float, check_int, check_onnx_classifier, check_torch_classifier

    sizes = [check_int(b, "--batch-sizes", low=1, high=MAX_BENCH_BATCH) for b in batch_sizes]
    if not sizes:
        raise UserError("--batch-sizes must name at least one batch size")
    check_int(threads, "--threads", low=1, high=1024, optional=True)
    check_float(min_time_s, "--min-time", low=0.0, high=3600.0)
    check_int(warmup, "warmup", low=0, high=10_000)
    check_int(iters, "iters", low=1, high=1_000_000, optional=True)
    import onnxruntime as ort

    is_onnx = not isinstance(model_or_onnx_path, nn.Module)
    result: dict[str, Any] = {
        "name": name,
        "source": None,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(),
                    "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "params": None, "macs": None, "flops": None, "gmacs": None, "gflops": None, "flops_note": None,
        "input_size": None, "threads": None, "warmup": warmup, "min_time_s": min_time_s,
        "runtimes": {},
    }
    with _torch_threads(threads) as torch_threads, tempfile.TemporaryDirectory(prefix="vitshrink-bench-") as tmp:
        result["threads"] = threads if threads is not None else torch_threads
        if is_onnx:
            path = Path(model_or_onnx_path)
            if not path.is_file():
                raise UserError(f"{path}: {'is a directory, not an ONNX file' if path.exists() else 'ONNX file not found'}")
            check_onnx_classifier(path, input_size)
            result["source"] = str(path)
            result["name"] = name or path.stem
            result["params"] = count_onnx_params(path)
            count, note = count_onnx_macs(path, input_size)
            if count is None:
                size = tuple(int(v) for v in input_size) if input_size is not None else None
                result["flops_note"] = note
            else:
                size = count.input_size
                result["flops_note"] = "MACs from ONNX shape inference (MatMul, Gemm, Conv)"
            if size is None:
                raise UserError(f"{path}: cannot tell the input size; pass --input-size")
            onnx_path = path
        else:
            model = model_or_onnx_path
            size = resolve_input_size(model, input_size)
            check_torch_classifier(model, size, name or "model")
            result["source"] = "torch model"
            from vitshrink.io import record_of

            record = record_of(model)
            result["name"] = name or (record.name if record is not None else type(model).__name__)
            result["params"] = count_params(model)
            count = count_flops(model, size)
            result["flops_note"] = "MACs of conv/linear/matmul/attention at batch 1; FLOPs = 2 x MACs"
            onnx_path = None
        result["input_size"] = list(size)
        if count is not None:
            result.update(macs=count.macs, flops=count.flops, gmacs=count.gmacs, gflops=count.gflops)

        for runtime in runtimes:
            if runtime == "torch":
                if is_onnx:
                    result["runtimes"]["torch"] = {"skipped": "an ONNX file has no torch model"}
                    continue
                device = model_device(model)
                stats = [torch_latency(model, b, input_size=size, warmup=warmup, iters=iters, min_time_s=min_time_s)
                         for b in sizes]
                result["runtimes"]["torch"] = {
                    "device": str(device) if device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(device)})",
                    "batches": [s.as_dict() for s in stats]}
            else:
                if onnx_path is None:
                    from vitshrink.export import write_onnx

                    onnx_path = Path(tmp) / "model.onnx"
                    write_onnx(model, onnx_path, input_size=size)
                session = ort_session(onnx_path, threads=threads)
                stats = [ort_latency(session, b, size, warmup=warmup, iters=iters, min_time_s=min_time_s)
                         for b in sizes]
                result["runtimes"]["onnxruntime"] = {"provider": session.get_providers()[0],
                                                     "batches": [s.as_dict() for s in stats]}
                del session
    return result


def compare(result: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Ratios candidate / baseline from two ``benchmark`` dicts (``speedup_p50`` is baseline / candidate).

    Only runtimes and batch sizes present in both are compared; batch sizes are string keys (JSON).
    """
    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b in (None, 0) else a / b

    out: dict[str, Any] = {
        "name": result.get("name"), "baseline": baseline.get("name"),
        "params_ratio": ratio(result.get("params"), baseline.get("params")),
        "macs_ratio": ratio(result.get("macs"), baseline.get("macs")),
        "runtimes": {},
    }
    for runtime, entry in result.get("runtimes", {}).items():
        base_entry = baseline.get("runtimes", {}).get(runtime, {})
        base_by_bs = {b["batch_size"]: b for b in base_entry.get("batches", [])}
        per_batch = {}
        for stats in entry.get("batches", []):
            base = base_by_bs.get(stats["batch_size"])
            if base is None:
                continue
            per_batch[str(stats["batch_size"])] = {
                "latency_p50_ratio": ratio(stats["p50_ms"], base["p50_ms"]),
                "speedup_p50": ratio(base["p50_ms"], stats["p50_ms"]),
                "throughput_ratio": ratio(stats["throughput_ips"], base["throughput_ips"]),
            }
        if per_batch:
            out["runtimes"][runtime] = per_batch
    return out
