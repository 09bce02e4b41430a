"""Does ``--dim-multiple M`` buy latency at equal FLOPs? (issue 14, item 1)

Slices TEACHER to ``--target`` counted FLOPs for each M (no training: latency depends on the shapes only) from two
plans: ``magnitude`` (the one-shot magnitude plan of ``vitshrink.prune.decisions``) and ``search`` (the shape the
UVC search chose at 0.5 in benchmarks/RESULTS.md: every block kept, heads narrowed from 32 to 14 dims, MLPs about
halved, passed through the search's final decisions and greedy band adjustment with that M), exports each student
as ``distill`` ships it (``vitshrink.export.write_onnx``) and times onnxruntime on the CPU with ``vitshrink.measure.ort_latency``. The
machine may be shared, so the models are timed in interleaved rounds (teacher, M=1, M=8, ..., then again) and
each figure is the median over rounds of that round's p50; ``paired_ratio`` is the median over rounds of
student / teacher within the same round.

    python benchmarks/dim_multiple.py vitshrink/assets/teacher_vit_cifar10.safetensors --multiples 1,8,16 \\
        --rounds 7 --threads 2 --json benchmarks/dim_multiple.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from vitshrink._atomic import atomic_write_text
from vitshrink.export import write_onnx
from vitshrink.io import load_model
from vitshrink.measure import count_flops, ort_latency, ort_session
from vitshrink.prune.decisions import Decisions, magnitude_plan
from vitshrink.prune.importance import norm_scale
from vitshrink.prune.resource import ResourceModel
from vitshrink.prune.plan import block_dims
from vitshrink.prune.surgery import slice_vit


def search_shaped_plan(teacher, target: float, multiple: int, head_dim: int = 14, mlp_fraction: float = 0.5):
    """The search's decisions (every block, all heads, ``head_dim`` dims, ``mlp_fraction`` of the MLP), rounded to
    the M grid and moved into the band by the same greedy that finishes UVC's search."""
    resource = ResourceModel(teacher)
    depth = len(resource.dims)
    counts = [[0, d.head_dim - head_dim, d.mlp_hidden - int(mlp_fraction * d.mlp_hidden)] for d in resource.dims]
    state = Decisions(teacher, resource, [norm_scale(list(teacher.blocks))] * depth, [True] * depth, counts,
                      [1.0] * depth, multiple)
    state.adjust(target, 0.02, within=True, skip=False)
    return state.plan()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--multiples", default="1,8,16")
    parser.add_argument("--plans", default="search,magnitude")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per model, batch and round")
    parser.add_argument("--json", default="benchmarks/dim_multiple.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher = load_model(args.teacher)
    size = tuple(teacher.patch_embed.img_size)
    input_size = (teacher.patch_embed.proj.in_channels, *size)
    teacher_macs = count_flops(teacher).macs
    models = {"teacher": teacher}
    rows = {"teacher": {"name": "teacher", "flops_ratio": 1.0}}
    for source in args.plans.split(","):
        for m in (int(v) for v in args.multiples.split(",")):
            plan = (search_shaped_plan(teacher, args.target, m) if source == "search" else
                    magnitude_plan(teacher, args.target, 0.02, dim_multiple=m))
            sliced = slice_vit(teacher, plan)
            name = f"{source} M={m}"
            models[name] = sliced
            rows[name] = {"name": name, "plan": source, "dim_multiple": m,
                          "flops_ratio": count_flops(sliced).macs / teacher_macs,
                          "widths": [[d.num_heads, d.head_dim, d.mlp_hidden] for d in block_dims(sliced)]}
    batches = [int(b) for b in args.batch_sizes.split(",")]
    samples = {name: {b: [] for b in batches} for name in models}
    with tempfile.TemporaryDirectory(prefix="vitshrink-dim-") as tmp:
        sessions = {}
        for name, model in models.items():
            path = Path(tmp) / f"{name.replace('=', '').replace(' ', '_')}.onnx"
            write_onnx(model, path, input_size=input_size)
            sessions[name] = ort_session(path, threads=args.threads)
        for r in range(args.rounds):
            for b in batches:
                for name, session in sessions.items():  # interleaved: A, B, C, A, B, C ...
                    stats = ort_latency(session, b, input_size, min_time_s=args.min_time)
                    samples[name][b].append(stats.p50_ms)
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    for name, row in rows.items():
        row["p50_ms"] = {str(b): statistics.median(samples[name][b]) for b in batches}
        row["rounds_ms"] = {str(b): samples[name][b] for b in batches}
        row["latency_ratio"] = {str(b): row["p50_ms"][str(b)] / statistics.median(samples["teacher"][b])
                                for b in batches}
        # Paired: each round's student / that round's teacher (same load), median over rounds.
        row["paired_ratio"] = {str(b): statistics.median(x / t for x, t in zip(samples[name][b], samples["teacher"][b]))
                               for b in batches}
    record = {"command": " ".join([sys.executable, *sys.argv]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "threads": args.threads, "note": "CPU shared with other jobs; medians of interleaved rounds"},
              "rows": list(rows.values())}
    atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
    for row in rows.values():
        print(f"{row['name']:16s} FLOPs {row['flops_ratio']:.4f}  " + "  ".join(
            f"b{b}: {row['p50_ms'][str(b)]:.3f} ms ({row['latency_ratio'][str(b)]:.3f}x, paired "
            f"{row['paired_ratio'][str(b)]:.3f}x)" for b in batches))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
