"""The per-block latency table of a ViT on one runtime and batch size (``--latency-target``, issue 14).

Probe models are sliced from the teacher itself (``vitshrink.prune.surgery``): no block (the fixed costs: patch
embedding, final norm, head), every block at each setting of a small grid of (heads, head dim, MLP width) (the
full setting is the teacher), and the first half of the teacher's blocks (so the per-block cost is told apart
from the fixed one); each is timed on the runtime (``ort-cpu``: onnxruntime's CPU provider on an ONNX export;
``torch-cuda``: the torch model on CUDA) in interleaved rounds (``vitshrink.measure.interleaved_p50``).
Whole-depth probes, not single blocks: a block timed alone measured ~15% slower than its share of the teacher
(per-model overhead), and a noise-sized signal over the fixed cost misled the fit (issue 14). The
table is what ``vitshrink.prune.latency_fit`` fits. ONNX probes are written by the TorchScript exporter (a
tenth of a second each, where the dynamo exporter that ships ``student.onnx`` takes seconds); the student and
teacher measured after slicing use the shipped exporter, so the report shows how far the two agree.
"""
from __future__ import annotations

import datetime
import statistics
import tempfile
import weakref
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from vitshrink.errors import UserError
from vitshrink.prune.plan import BlockDims, BlockKeep, Plan, block_dims

__all__ = ["LATENCY_RUNTIMES", "check_latency_runtime", "probe_grid", "plan_for_shapes", "measure_latency_table",
           "time_models"]

LATENCY_RUNTIMES = ("ort-cpu", "torch-cuda")


def check_latency_runtime(runtime: Any) -> str:
    """``runtime`` if it is one of ``LATENCY_RUNTIMES`` and usable here, else ``UserError`` (one line)."""
    if runtime not in LATENCY_RUNTIMES:
        raise UserError(f"--latency-runtime must be one of {', '.join(LATENCY_RUNTIMES)}, got {runtime!r}")
    if runtime == "torch-cuda" and not torch.cuda.is_available():
        raise UserError("--latency-runtime torch-cuda: no CUDA device is available on this machine; "
                        "use --latency-runtime ort-cpu")
    return str(runtime)


def probe_grid(d: BlockDims, dim_multiple: int = 1) -> list[tuple[int, int, int]]:
    """Single-block settings to time: heads {H, H/2} x head dim {hd, hd/2} x MLP {m, m/2, m/4} (halves rounded
    to ``dim_multiple``), i.e. 12 settings for a usual block. Varying heads and head dim apart separates the
    per-head cost from the attention MACs."""
    def smaller(full: int, div: int) -> int:
        step = max(1, dim_multiple)
        return max(min(full, step), (full // div) // step * step)

    heads = sorted({d.num_heads, max(1, d.num_heads // 2)}, reverse=True)
    head_dims = sorted({d.head_dim, smaller(d.head_dim, 2)}, reverse=True)
    mlps = sorted({d.mlp_hidden, smaller(d.mlp_hidden, 2), smaller(d.mlp_hidden, 4)}, reverse=True)
    return [(h, hd, m) for h in heads for hd in head_dims for m in mlps]


def plan_for_shapes(teacher: nn.Module, blocks: list[tuple[int, int, int]]) -> Plan:
    """The plan keeping ``teacher``'s first ``len(blocks)`` blocks at those (heads, head dim, MLP) widths (the
    first units of each) and skipping the rest."""
    padded = list(blocks) + [None] * (len(teacher.blocks) - len(blocks))
    return [None if b is None else BlockKeep(heads=list(range(b[0])), mlp=list(range(b[2])),
                                             head_dims=[list(range(b[1]))] * b[0]) for b in padded]


def _probe(teacher: nn.Module, blocks: list[tuple[int, int, int]]) -> nn.Module:
    """A model sliced from ``teacher`` by ``plan_for_shapes``."""
    from vitshrink.prune.surgery import slice_vit

    return slice_vit(teacher, plan_for_shapes(teacher, blocks)).eval()


# model -> {(batch, threads, exporter): call}: the teacher is timed several times per run (table, corrections, final
# measurement) and its export takes seconds; a session keeps its graph after its file is gone. Only shapes matter
# for timing, so a model whose weights change later still times the same.
_ORT_CALLS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _ort_call(model: nn.Module, folder: Path, name: str, batch_size: int, threads: int | None,
              exporter: str) -> Callable[[], Any]:
    key = (batch_size, threads, exporter)
    cached = _ORT_CALLS.get(model, {}).get(key)
    if cached is not None:
        return cached
    import numpy as np

    from vitshrink.export import write_onnx
    from vitshrink.runtime import ort_session, resolve_input_size

    size = resolve_input_size(model, None)
    path = folder / f"{name}.onnx"
    write_onnx(model, path, input_size=size, exporter=exporter)
    session = ort_session(path, threads=threads, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((batch_size, *size),
                                                                                    dtype=np.float32)}
    call = (lambda: session.run(None, feed))
    _ORT_CALLS.setdefault(model, {})[key] = call
    return call


def time_models(models: dict[str, nn.Module], runtime: str, batch_size: int, *, rounds: int = 3,
                min_time_s: float = 0.1, min_iters: int = 3, threads: int | None = None,
                exporter: str = "dynamo") -> dict[str, dict]:
    """Median p50 (ms) of each model on ``runtime`` at ``batch_size``, interleaved rounds."""
    from vitshrink.measure import interleaved_p50
    from vitshrink.runtime import resolve_input_size

    check_latency_runtime(runtime)
    if runtime == "torch-cuda":
        calls = {}
        for name, model in models.items():
            model = model.to("cuda").eval()
            x = torch.randn(batch_size, *resolve_input_size(model, None), device="cuda")
            calls[name] = (lambda m=model, x=x: _no_grad_call(m, x))
        return interleaved_p50(calls, batch_size, rounds=rounds, min_time_s=min_time_s, min_iters=min_iters,
                               sync=torch.cuda.synchronize)
    with tempfile.TemporaryDirectory(prefix="vitshrink-latency-") as tmp:
        calls = {name: _ort_call(model.cpu(), Path(tmp), name, batch_size, threads, exporter)
                 for name, model in models.items()}
        return interleaved_p50(calls, batch_size, rounds=rounds, min_time_s=min_time_s, min_iters=min_iters)


def _no_grad_call(model: nn.Module, x: torch.Tensor):
    with torch.inference_mode():
        return model(x)


def measure_latency_table(teacher: nn.Module, runtime: str, batch_size: int, *, dim_multiple: int = 1,
                          rounds: int = 7, min_time_s: float = 0.05, threads: int | None = None,
                          exporter: str = "torchscript", log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The table: one row per probe model, ``{"name", "blocks": [[h, d, m], ...], "ms", "rounds_ms",
    "per_block_ms"}`` (``per_block_ms`` = (ms - fixed) / blocks).

    Rows: ``fixed`` (no block), ``all_h{h}_d{hd}_m{m}`` (every block at each ``probe_grid`` setting of the
    teacher's first block; the first one is the teacher) and ``half_depth`` (the first half of the blocks).
    ``ms`` is paired with the teacher: the median over rounds of (row / teacher in the same round) times the
    teacher's median, so that load that comes and goes between rounds on a shared machine cancels.
    ``exporter`` writes the ``ort-cpu`` probes (TorchScript by default: fast; benchmarks/latency_exporters.py
    compares it with the shipped dynamo exporter).
    """
    dims = block_dims(teacher)
    depth = len(dims)
    full = [(d.num_heads, d.head_dim, d.mlp_hidden) for d in dims]
    shapes: dict[str, list[tuple[int, int, int]]] = {"fixed": []}
    for h, hd, m in probe_grid(dims[0], dim_multiple):
        shapes[f"all_h{h}_d{hd}_m{m}"] = [(min(h, d.num_heads), min(hd, d.head_dim), min(m, d.mlp_hidden))
                                          for d in dims]
    if depth >= 2:
        shapes["half_depth"] = full[: depth // 2]
    reference = next(name for name, blocks in shapes.items() if blocks == full)
    models = {name: (teacher if name == reference else _probe(teacher, blocks)) for name, blocks in shapes.items()}
    if log is not None:
        log(f"latency table: timing {len(models)} probe models on {runtime}, batch {batch_size}, {rounds} rounds")
    started = datetime.datetime.now(datetime.timezone.utc)
    timed = time_models(models, runtime, batch_size, rounds=rounds, min_time_s=min_time_s, min_iters=1,
                        threads=threads, exporter=exporter)
    seconds = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    ref_rounds = timed[reference]["rounds_ms"]
    ref_ms = statistics.median(ref_rounds)
    paired = {name: ref_ms * statistics.median(r / t for r, t in zip(timed[name]["rounds_ms"], ref_rounds))
              for name in shapes}
    rows = [{"name": name, "blocks": [list(b) for b in shapes[name]], "ms": paired[name],
             "unpaired_ms": timed[name]["p50_ms"], "rounds_ms": timed[name]["rounds_ms"],
             **({"per_block_ms": (paired[name] - paired["fixed"]) / len(shapes[name])} if shapes[name] else {})}
            for name in shapes]
    return {"runtime": runtime, "batch_size": int(batch_size), "threads": threads, "rounds": rounds,
            "reference": reference, "exporter": exporter if runtime == "ort-cpu" else None,
            "seconds": seconds, "date": started.isoformat(timespec="seconds"), "rows": rows}
