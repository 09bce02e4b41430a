"""Does the latency table's exporter matter (issue 14)? The table behind ``--latency-target`` times its probe
models from TorchScript-exported ONNX (a tenth of a second each); ``student.onnx`` ships from the dynamo exporter
(seconds each). This fits the latency model once from each exporter's table, then times a few fixed plans (exported
by dynamo, as shipped, interleaved with the teacher) and prints measured vs each fit's predicted ratio.

    OMP_NUM_THREADS=1 python benchmarks/latency_exporters.py --batch 1 --threads 1 \\
        --json benchmarks/results/latency_exporters_cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitshrink._atomic import atomic_write_text  # noqa: E402
from vitshrink.io import load_model  # noqa: E402
from vitshrink.pipeline import BUNDLED_TEACHER  # noqa: E402
from vitshrink.prune.latency_fit import LatencyModel, fit_latency  # noqa: E402
from vitshrink.prune.latency_table import measure_latency_table, plan_for_shapes, time_models  # noqa: E402
from vitshrink.prune.plan import block_dims  # noqa: E402
from vitshrink.prune.resource import ResourceModel  # noqa: E402
from vitshrink.prune.surgery import slice_vit  # noqa: E402


def fixed_plans(teacher) -> dict[str, list]:
    """Plans of known shape: halved widths, halved heads and MLP, two or three blocks skipped."""
    d = block_dims(teacher)[0]
    heads, head_dim, mlp, depth = d.num_heads, d.head_dim, d.mlp_hidden, len(teacher.blocks)
    shapes = {"half_head_dim_half_mlp": [(heads, head_dim // 2, mlp // 2)] * depth,
              "half_heads_half_mlp": [(max(1, heads // 2), head_dim, mlp // 2)] * depth,
              "skip2": [(heads, head_dim, mlp)] * (depth - 2),
              "skip2_three_quarter_widths": [(heads, 3 * head_dim // 4, 3 * mlp // 4)] * (depth - 2),
              "skip3": [(heads, head_dim, mlp)] * (depth - 3)}
    return {name: plan_for_shapes(teacher, blocks) for name, blocks in shapes.items()}


def table_fit(teacher, exporter: str, batch: int, threads: int | None) -> tuple[LatencyModel, dict]:
    """The product's table, timed from ``exporter``'s ONNX files, and the latency model fitted to it."""
    started = time.perf_counter()
    table = measure_latency_table(teacher, "ort-cpu", batch, threads=threads, exporter=exporter)
    seconds = time.perf_counter() - started
    flops = ResourceModel(teacher)
    fit = fit_latency(table["rows"], flops.attn_unit, flops.mlp_unit)
    teacher_ms = next(r["ms"] for r in table["rows"] if r["name"] == table["reference"])
    return LatencyModel(teacher, fit), {"table_seconds": seconds, "teacher_ms": teacher_ms, **fit.errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", nargs="?", default=str(BUNDLED_TEACHER))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: ORT's)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    teacher = load_model(args.teacher).eval()
    fits = {exporter: table_fit(teacher, exporter, args.batch, args.threads) for exporter in ("torchscript", "dynamo")}
    plans = fixed_plans(teacher)
    timed = time_models({"teacher": teacher, **{k: slice_vit(teacher, p).eval() for k, p in plans.items()}},
                        "ort-cpu", args.batch, rounds=7, min_time_s=0.2, threads=args.threads, exporter="dynamo")
    rows = []
    for name, plan in plans.items():
        measured = statistics.median(s / t for s, t in zip(timed[name]["rounds_ms"], timed["teacher"]["rounds_ms"]))
        rows.append({"plan": name, "measured_ratio": measured,
                     **{f"predicted_{e}": model.plan_ratio(plan) for e, (model, _) in fits.items()}})
    print(f"{'exporter':<12}{'table s':>9}{'teacher ms':>12}{'fit max err':>13}{'fit mean err':>14}")
    for exporter, (_, info) in fits.items():
        print(f"{exporter:<12}{info['table_seconds']:>9.1f}{info['teacher_ms']:>12.3f}{info['max_rel_error']:>13.1%}"
              f"{info['mean_rel_error']:>14.1%}")
    print(f"\n{'plan (dynamo-exported, timed)':<30}{'measured':>10}{'pred ts':>9}{'pred dyn':>10}")
    for r in rows:
        print(f"{r['plan']:<30}{r['measured_ratio']:>10.3f}{r['predicted_torchscript']:>9.3f}"
              f"{r['predicted_dynamo']:>10.3f}")
    if args.json:
        result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "machine": platform.processor() or platform.machine(), "command": " ".join(sys.argv),
                  "batch": args.batch, "threads": args.threads,
                  "fits": {e: info for e, (_, info) in fits.items()}, "plans": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
