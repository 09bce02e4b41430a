"""The ``--latency-target`` machinery on TEACHER without training (issue 14): the latency table and its fit
(time to measure, max / mean relative error), then for each target a plan decided on the fitted model without
training (latency depends on the shapes only): the greedy that finishes UVC's search, from the full teacher, with
block skipping allowed as in the search (``--no-skip``: widths only, the one-shot magnitude plan); its measured
corrections, and target vs predicted vs measured.

    python benchmarks/latency_fit.py vitshrink/assets/teacher_vit_cifar10.safetensors --batch-sizes 32,1 \\
        --targets 0.5 --corrections 2 --json benchmarks/results/latency_fit_cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

from vitshrink._atomic import atomic_write_text
from vitshrink.io import load_model
from vitshrink.measure import count_flops
from vitshrink.prune.decisions import Decisions
from vitshrink.prune.importance import norm_scale
from vitshrink.prune.latency_target import correct_with_measurements, latency_resource, measured_latency
from vitshrink.prune.plan import block_dims
from vitshrink.prune.surgery import slice_vit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher")
    parser.add_argument("--batch-sizes", default="32,1")
    parser.add_argument("--targets", default="0.5")
    parser.add_argument("--corrections", type=int, default=2)
    parser.add_argument("--dim-multiple", type=int, default=1)
    parser.add_argument("--no-skip", action="store_true", help="never drop whole blocks")
    parser.add_argument("--json", default="benchmarks/results/latency_fit_cpu.json")
    args = parser.parse_args(argv)
    teacher = load_model(args.teacher)
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        started = time.perf_counter()
        resource = latency_resource(teacher, runtime="ort-cpu", batch_size=batch, dim_multiple=args.dim_multiple)
        table_s = time.perf_counter() - started
        for target in (float(t) for t in args.targets.split(",")):
            def decide(goal: float):
                depth = len(resource.dims)
                state = Decisions(teacher, resource, [norm_scale(list(teacher.blocks))] * depth, [True] * depth,
                                  [[0, 0, 0]] * depth, [0.0] * depth, args.dim_multiple)
                state.adjust(goal, 0.02, within=True, skip=not args.no_skip)
                return state.plan()

            plan, goal, history = correct_with_measurements(
                teacher, decide(target), decide, resource, target=target, runtime="ort-cpu", batch_size=batch,
                steps=args.corrections)
            student = slice_vit(teacher, plan)
            final = measured_latency(teacher, student, resource, plan, target=target, runtime="ort-cpu",
                                     batch_size=batch)
            rows.append({"batch_size": batch, "target": target, "table_seconds": table_s, "fit": resource.fit.as_dict(),
                         "uncorrected": history[0] if history else None, "corrections": history,
                         "final": final, "flops_ratio": count_flops(student).macs / count_flops(teacher).macs,
                         "widths": [[d.num_heads, d.head_dim, d.mlp_hidden] for d in block_dims(student)]})
            atomic_write_text(args.json, json.dumps({
                "command": " ".join([sys.executable, *sys.argv]),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": {"platform": platform.platform(), "note": "2-core CPU shared with other jobs"},
                "rows": rows}, indent=2) + "\n")
    for r in rows:
        first = r["uncorrected"] or {}
        print(f"b{r['batch_size']} target {r['target']}: table {r['table_seconds']:.1f} s, fit max "
              f"{r['fit']['max_rel_error']:.1%} mean {r['fit']['mean_rel_error']:.1%}; fit alone measured "
              f"{first.get('measured_ratio', float('nan')):.3f}; final predicted {r['final']['predicted_ratio']:.3f} "
              f"measured {r['final']['measured_ratio']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
