"""``benchmark``: params, MACs/FLOPs and latency per runtime and batch size as one JSON-ready dict;
``compare``: the ratios between two such dicts."""
from __future__ import annotations

import datetime
import os
import platform
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from vitshrink.errors import UserError
from vitshrink.export import write_onnx
from vitshrink.measure.counting import count_flops, count_onnx_macs, count_onnx_params, count_params
from vitshrink.measure.latency import ort_latency, torch_latency
from vitshrink.runtime import model_device, ort_session, resolve_input_size

RUNTIMES = ("onnxruntime", "torch")


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
    from vitshrink.validate import check_float, check_int

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
            size = _count_onnx(Path(model_or_onnx_path), input_size, name, result)
        else:
            size = _count_torch(model_or_onnx_path, input_size, name, result)
        result["input_size"] = list(size)
        timing = dict(warmup=warmup, iters=iters, min_time_s=min_time_s)
        for runtime in runtimes:
            if runtime == "torch":
                result["runtimes"]["torch"] = ({"skipped": "an ONNX file has no torch model"} if is_onnx else
                                               _time_torch(model_or_onnx_path, sizes, size, timing))
            else:
                onnx_path = Path(model_or_onnx_path) if is_onnx else Path(tmp) / "model.onnx"
                if not onnx_path.exists():
                    write_onnx(model_or_onnx_path, onnx_path, input_size=size)
                result["runtimes"]["onnxruntime"] = _time_onnx(onnx_path, sizes, size, threads, timing)
    return result


def _count_onnx(path: Path, input_size: Sequence[int] | None, name: str | None,
                result: dict[str, Any]) -> tuple[int, ...]:
    """Fill params/MACs of an ONNX file into ``result``; return its input size."""
    from vitshrink.validate import check_onnx_classifier

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
        result.update(macs=count.macs, flops=count.flops, gmacs=count.gmacs, gflops=count.gflops)
    if size is None:
        raise UserError(f"{path}: cannot tell the input size (symbolic height/width); export the model with a "
                        "fixed image size (vitshrink export SPEC --img-size N -o FILE)")
    return size


def _count_torch(model: nn.Module, input_size: Sequence[int] | None, name: str | None,
                 result: dict[str, Any]) -> tuple[int, ...]:
    """Fill params/MACs of a torch model into ``result``; return its input size."""
    from vitshrink.validate import check_torch_classifier

    size = resolve_input_size(model, input_size)
    check_torch_classifier(model, size, name or "model")
    result["source"] = "torch model"
    from vitshrink.io import record_of

    record = record_of(model)
    result["name"] = name or (record.name if record is not None else type(model).__name__)
    result["params"] = count_params(model)
    count = count_flops(model, size)
    result["flops_note"] = "MACs of conv/linear/matmul/attention at batch 1; FLOPs = 2 x MACs"
    result.update(macs=count.macs, flops=count.flops, gmacs=count.gmacs, gflops=count.gflops)
    return size


def _time_torch(model: nn.Module, batch_sizes: list[int], size: tuple[int, ...],
                timing: dict[str, Any]) -> dict[str, Any]:
    device = model_device(model)
    stats = [torch_latency(model, b, input_size=size, **timing) for b in batch_sizes]
    return {"device": str(device) if device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(device)})",
            "batches": [s.as_dict() for s in stats]}


def _time_onnx(path: Path, batch_sizes: list[int], size: tuple[int, ...], threads: int | None,
               timing: dict[str, Any]) -> dict[str, Any]:
    session = ort_session(path, threads=threads)
    stats = [ort_latency(session, b, size, **timing) for b in batch_sizes]
    return {"provider": session.get_providers()[0], "batches": [s.as_dict() for s in stats]}


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
