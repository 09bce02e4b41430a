"""Latency and throughput of one batch, on torch and on onnxruntime (p50/p90/p99 after warm-up)."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from vitshrink.runtime import eval_mode, model_device, resolve_input_size


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


def ort_latency(session, batch_size: int, input_size: Sequence[int], *, warmup: int = 2, iters: int | None = None,
                min_time_s: float = 2.0) -> LatencyStats:
    """Latency of an onnxruntime session on a random float32 batch (host input, so CUDA includes the copy)."""
    name = session.get_inputs()[0].name
    feed = {name: np.random.default_rng(0).standard_normal((batch_size, *input_size), dtype=np.float32)}
    return time_calls(lambda: session.run(None, feed), batch_size, warmup=warmup, iters=iters, min_time_s=min_time_s)


def interleaved_p50(calls: dict[str, Callable[[], Any]], batch_size: int, *, rounds: int = 3, warmup: int = 1,
                    min_time_s: float = 0.1, min_iters: int = 3,
                    sync: Callable[[], None] | None = None) -> dict[str, dict[str, Any]]:
    """Time several one-batch calls in interleaved rounds (A, B, C, A, B, C, ...) and take, per call, the median
    over rounds of each round's p50: on a shared machine a burst of load then hits every call alike.

    Returns name -> ``{"p50_ms": median, "rounds_ms": [per-round p50, ...]}``.
    """
    per_round: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(max(1, rounds)):
        for name, fn in calls.items():
            stats = time_calls(fn, batch_size, warmup=warmup if r == 0 else 0, min_time_s=min_time_s,
                               min_iters=min_iters, sync=sync)
            per_round[name].append(stats.p50_ms)
    return {name: {"p50_ms": float(np.median(ms)), "rounds_ms": ms} for name, ms in per_round.items()}
