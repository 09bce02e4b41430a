"""Benchmark the ``uvc`` recipe (issue 4): UVC at FLOPs targets 0.7 and 0.5 against the teacher, uniform pruning
to the same FLOPs, the depth-halved student, and the ablations (--no-skip, --skip-only, --no-kd).

``--parts latency`` (issue 14): UVC at ``--latency-target`` (default 0.5) on ort-cpu at batch 32 and at batch 1,
each beside the FLOPs-targeted UVC student of equal measured latency: its FLOPs target is found by bisection on
students sliced with the one-shot magnitude plan (no training; timed on the same runtime and batch, interleaved
with the teacher), then that target is run through the same recipe. Rows carry top-1, the measured latency
ratio (the run's own report: student.onnx vs the teacher, onnxruntime), and for latency rows the target, the
fitted model's prediction and the ratio measured right after slicing.

Every student gets the same post-training (the uvc preset's KD schedule; uniform and depth-halved students via
the ``vanilla`` recipe, i.e. the same logit KD). Each row: top-1 on the validation tar, parameters, GMACs (batch 1;
GFLOPs = 2 x GMACs) and onnxruntime CPU latency p50 at batch 1 and 32, from each run's report.json.

    python benchmarks/uvc.py TEACHER.safetensors --data ../shared/data/cifar10/train.tar \\
        --val-data ../shared/data/cifar10/test.tar --epochs 30 --out output/bench_uvc --json benchmarks/uvc.json
    python benchmarks/uvc.py TEACHER.safetensors --parts latency --latency-target 0.5 --latency-batches 32,1 ...

Writes JSON (``--json``) with the command, date, machine and every row. Runs are sequential, on one machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from vitshrink._atomic import atomic_write_text
from vitshrink.pipeline import distill
from vitshrink.io import load_model
from vitshrink.measure import count_flops
from vitshrink.prune.decisions import magnitude_plan
from vitshrink.prune.latency_table import time_models
from vitshrink.prune.latency_target import paired_ratio
from vitshrink.prune.surgery import slice_vit, uniform_plan
from vitshrink.prune.uvc_search import ResourceModel


def uniform_student(teacher, target: float):
    """Uniform pruning to ``target``: the largest keep fraction (same in every block) with R <= target."""
    resource = ResourceModel(teacher)
    lo, hi = 0.0, 1.0
    for _ in range(30):  # bisection on the keep fraction
        mid = (lo + hi) / 2
        if resource.plan_ratio(uniform_plan(teacher, max(mid, 1e-6))) <= target:
            lo = mid
        else:
            hi = mid
    plan = uniform_plan(teacher, max(lo, 1e-6))
    return slice_vit(teacher, plan), resource.plan_ratio(plan), lo


def flops_target_of_equal_latency(teacher, latency_ratio: float, batch_size: int, *, steps: int = 6,
                                  rounds: int = 5) -> tuple[float, list[dict[str, float]]]:
    """The FLOPs target whose magnitude-plan student runs at ``latency_ratio`` of the teacher on ort-cpu at
    ``batch_size`` (bisection on the measured ratio; returns the target and every probe)."""
    lo, hi, probes = 0.1, 0.95, []
    for _ in range(steps):
        mid = (lo + hi) / 2
        student = slice_vit(teacher, magnitude_plan(teacher, mid, 0.02))
        timed = time_models({"teacher": teacher, "student": student}, "ort-cpu", batch_size, rounds=rounds,
                            min_time_s=0.2, exporter="dynamo")  # as shipped, as the latency rows are measured
        measured = paired_ratio(timed)
        probes.append({"flops_target": mid, "flops_ratio": count_flops(student).macs / count_flops(teacher).macs,
                       "measured_ratio": measured})
        lo, hi = (mid, hi) if measured < latency_ratio else (lo, mid)
    best = min(probes, key=lambda p: abs(p["measured_ratio"] - latency_ratio))
    return round(best["flops_target"], 4), probes


def report_latency_ratio(report: dict[str, Any], batch_size: int) -> float | None:
    """Student / teacher ORT p50 at ``batch_size`` from a run's report (None if not measured there)."""
    speedup = report.get("ratios", {}).get("ort_speedup", {}).get(str(batch_size))
    return 1.0 / speedup if speedup else None


def row(name: str, result, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    student = result.report["student"]
    return {"name": name, "top1": student["top1"], "params": student["params"], "gmacs": student["gmacs"],
            "ort_p50_ms": student["ort_p50_ms"], "out_dir": str(result.out_dir), **(extra or {})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", help="teacher .safetensors (the bundled CIFAR-10 ViT)")
    parser.add_argument("--data", default=None, help="training tar/dir (default: bundled train_5k)")
    parser.add_argument("--val-data", default=None, help="validation tar/dir (e.g. cifar10/test.tar)")
    parser.add_argument("--targets", default="0.7,0.5")
    parser.add_argument("--ablation-target", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=None, help="post-training epochs (default: preset)")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="cap optimizer steps per epoch")
    parser.add_argument("--search-steps", type=int, default=None, help="UVC search steps (default: preset)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="output/bench_uvc")
    parser.add_argument("--json", default="benchmarks/uvc.json")
    parser.add_argument("--parts", default="main,ablations",
                        help="main (UVC + uniform per target, depth-halved), ablations and/or latency")
    parser.add_argument("--latency-target", type=float, default=0.5)
    parser.add_argument("--latency-batches", default="32,1", help="ort-cpu batch sizes of the latency rows")
    parser.add_argument("--reuse", action="store_true",
                        help="take a row from its run folder's report.json when that run already finished")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))

    targets = [float(t) for t in args.targets.split(",")]
    out = Path(args.out)
    common = dict(data=args.data, val_data=args.val_data, epochs=args.epochs, device=args.device, progress=False)
    shared = {"steps_per_epoch": args.steps_per_epoch} if args.steps_per_epoch else {}
    uvc_only = {**shared, **({"search_steps": args.search_steps} if args.search_steps else {})}
    teacher = load_model(args.teacher)
    rows: list[dict[str, Any]] = []
    teacher_entry = None

    def run(name: str, *distill_args, **distill_kwargs):
        folder = out / name
        if args.reuse and (folder / "report.json").exists():
            return SimpleNamespace(report=json.loads((folder / "report.json").read_text()), out_dir=folder)
        return distill(*distill_args, out_dir=folder, **distill_kwargs)

    def write_json() -> None:  # after every row, so a long run that is stopped keeps what it measured
        record = {
            "command": " ".join([sys.executable, *sys.argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "torch_threads": torch.get_num_threads(),
                        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
            "teacher": {"path": args.teacher, **(teacher_entry or {})},
            "rows": rows,
        }
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
    for target in targets if "main" in parts else []:
        result = run(f"uvc_{target}", teacher, "uvc", flops_target=target, overrides=uvc_only, **common)
        teacher_entry = teacher_entry or result.report["teacher"]
        plan = json.loads((result.out_dir / "uvc_plan.json").read_text())
        rows.append(row(f"uvc@{target}", result, {"flops_ratio": plan["flops_ratio"], "adjusted": plan["adjusted"]}))
        write_json()
        student, ratio, keep = uniform_student(load_model(args.teacher), target)
        result = run(f"uniform_{target}", teacher, "vanilla", student=student, overrides=shared, **common)
        rows.append(row(f"uniform@{target}", result, {"flops_ratio": ratio, "keep_fraction": keep}))
        write_json()
    if "main" in parts:
        result = run("depth_half", teacher, "vanilla", overrides=shared, **common)
        teacher_entry = teacher_entry or result.report["teacher"]
        rows.append(row("depth-halved (vanilla)", result))
        write_json()
    for flag in ("no_skip", "skip_only", "no_kd") if "ablations" in parts else ():
        result = run(f"uvc_{args.ablation_target}_{flag}", teacher, "uvc", flops_target=args.ablation_target,
                     overrides={**uvc_only, flag: True}, **common)
        teacher_entry = teacher_entry or result.report["teacher"]
        plan = json.loads((result.out_dir / "uvc_plan.json").read_text())
        rows.append(row(f"uvc@{args.ablation_target} --{flag.replace('_', '-')}", result,
                        {"flops_ratio": plan["flops_ratio"]}))
        write_json()
    for batch in [int(b) for b in args.latency_batches.split(",")] if "latency" in parts else []:
        teacher_entry = latency_rows(run, rows, teacher, args.latency_target, batch, uvc_only, common) \
            or teacher_entry
        write_json()
    for r in rows:
        print(f"{r['name']:32s} top1 {r['top1']:.4f}  GMACs {r['gmacs']:.4f}  params {r['params']:,}  "
              f"ORT p50 {r['ort_p50_ms']}" + (f"  latency ratio {r['latency_ratio']:.3f}" if r.get("latency_ratio")
                                            else ""))
    return 0


def latency_rows(run, rows: list[dict[str, Any]], teacher, target: float, batch: int, uvc_only: dict[str, Any],
                 common: dict[str, Any]) -> dict[str, Any]:
    """The latency-targeted UVC row at ``batch`` and the FLOPs-targeted UVC row of equal measured latency."""
    options = {**uvc_only, "latency_target": target, "latency_runtime": "ort-cpu", "latency_batch": batch}
    result = run(f"uvc_latency_{target}_b{batch}", teacher, "uvc", overrides=options, **common)
    latency = result.report["pruning"]["latency"]
    measured = report_latency_ratio(result.report, batch) or latency["measured_ratio"]
    rows.append(row(f"uvc@latency {target} (ort-cpu b{batch})", result, {
        "latency_target": target, "batch_size": batch, "predicted_ratio": latency["predicted_ratio"],
        "measured_after_slicing": latency["measured_ratio"], "latency_ratio": measured,
        "flops_ratio": result.report["ratios"]["gmacs"], "fit_max_rel_error": latency["fit_max_rel_error"],
        "fit_mean_rel_error": latency["fit_mean_rel_error"],
        "top1_after_pruning": result.report["pruning"].get("top1_after_pruning")}))
    flops_target, probes = flops_target_of_equal_latency(teacher, measured, batch)
    equal = run(f"uvc_flops_{flops_target}_b{batch}", teacher, "uvc", flops_target=flops_target, overrides=uvc_only,
                **common)
    rows.append(row(f"uvc@FLOPs {flops_target} (equal latency b{batch})", equal, {
        "flops_target": flops_target, "batch_size": batch, "latency_ratio": report_latency_ratio(equal.report, batch),
        "flops_ratio": equal.report["ratios"]["gmacs"], "bisection": probes,
        "top1_after_pruning": equal.report.get("pruning", {}).get("top1_after_pruning")}))
    return result.report["teacher"]


if __name__ == "__main__":
    raise SystemExit(main())
