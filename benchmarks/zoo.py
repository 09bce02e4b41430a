"""Every timm ViT family through inspect / evaluate / export / ``uvc`` / ``deit`` (issue 26).

Each family is a tiny random-weight configuration (``--img-size`` px, patch 8, width 48, 3 heads, ``--depth``
blocks, 10 classes) saved as a vitshrink file and loaded back, as a user's checkpoint would be. Per family:
``inspect`` (``vitshrink.inspection.describe``), ``evaluate`` (top-1 on ``--eval-images`` bundled test images;
random weights, so ~10%: only that it runs), ``export`` (ONNX with parity on real images), then ``uvc`` at
``--flops-target`` and ``deit`` (derived student), each one short epoch. Every cell is ``works``, ``refused``
(the one line) or ``fails`` (the exception); recipe rows carry student/teacher GMACs (counted, batch 1) and
the onnxruntime p50 latency ratio at batch 1 that the run's own report measured (student.onnx vs the teacher).

    nice -n 10 python benchmarks/zoo.py --json benchmarks/results/zoo_cpu.json --out /tmp/zoo

Writes JSON (``--json``) with the command, date, machine and one row per family; prints a Markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from vitshrink._atomic import atomic_write_text
from vitshrink.errors import UserError

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "deit": ("deit_tiny_patch16_224", {}),
    "deit3 (LayerScale, no_embed_class)": ("deit3_small_patch16_224", {}),
    "DINOv2 + registers": ("vit_small_patch14_reg4_dinov2", {}),
    "CLIP (norm_pre)": ("vit_base_patch16_clip_224", {}),
    "CLIP quickgelu": ("vit_base_patch16_clip_quickgelu_224", {}),
    "SigLIP (map head)": ("vit_base_patch16_siglip_224", {}),
    "gap (avg pool)": ("vit_base_patch16_gap_224", {}),
    "qk-norm": ("vit_small_patch16_224", {"qk_norm": True}),
    "parallel (18x2)": ("vit_small_patch16_18x2_224", {}),
    "parallel scaling (xp)": ("vit_base_patch16_xp_224", {}),
    "EVA-02": ("eva02_tiny_patch14_224", {}),
    "RoPE ViT": ("vit_base_patch16_rope_224", {}),
    "RoPE + reg + gap": ("vit_base_patch16_rope_reg1_gap_256", {}),
    "BEiT (rel-pos bias)": ("beit_base_patch16_224", {}),
}


def _cell(step: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one step: ``works`` with its figures, ``refused`` with the one line, or ``fails`` with the exception."""
    start = time.perf_counter()
    try:
        cell = {"status": "works", **(step() or {})}
    except UserError as exc:
        cell = {"status": "refused", "line": str(exc)}
    except Exception as exc:  # the benchmark records failures instead of stopping
        cell = {"status": "fails", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    cell["seconds"] = round(time.perf_counter() - start, 2)
    return cell


def _recipe_cell(teacher_path: Path, recipe: str, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from vitshrink.data import resolve_data
    from vitshrink.io import load_model
    from vitshrink.measure import count_flops
    from vitshrink.pipeline import distill

    def run() -> dict[str, Any]:
        data = _slice(resolve_data(), args)
        teacher = load_model(teacher_path)
        overrides = {"steps_per_epoch": args.steps, "bench_batch_sizes": [1]}
        if recipe == "uvc":
            overrides.update(search_steps=args.search_steps, search_batch_size=16)
        result = distill(teacher, recipe, data=data, out_dir=out, epochs=1, batch_size=16, workers=0, progress=False,
                         flops_target=args.flops_target if recipe == "uvc" else None, overrides=overrides)
        student = load_model(out / "student.safetensors")  # reloaded with no flags
        report = result.report
        t_ms, s_ms = report["teacher"]["ort_p50_ms"]["1"], report["student"]["ort_p50_ms"]["1"]
        return {"student_gmacs": count_flops(student).gmacs, "teacher_gmacs": count_flops(teacher).gmacs,
                "gmacs_ratio": count_flops(student).macs / count_flops(teacher).macs,
                "latency_ratio_b1": (s_ms / t_ms) if t_ms and s_ms else None, "onnx_parity": report["onnx"]["passed"],
                "student_model": type(student).__name__}

    return _cell(run)


def _slice(full, args: argparse.Namespace):
    from vitshrink.data import ImageSplit, LabelledData

    step = max(1, len(full.train) // args.train_images)
    train = ImageSplit(full.train.reader, [full.train.indices[i] for i in range(0, step * args.train_images, step)])
    every = max(1, len(full.val) // args.eval_images)  # the test tar is sorted by class: stride over it
    val = ImageSplit(full.val.reader, [full.val.indices[i] for i in range(0, every * args.eval_images, every)])
    return LabelledData(train, val, full.class_names, f"bundled CIFAR-10 slice ({args.train_images} train)")


def family_row(label: str, name: str, extra: dict[str, Any], out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from vitshrink.data import build_transform, make_loader, resolve_data
    from vitshrink.evaluation import evaluate_loader
    from vitshrink.export import export_onnx
    from vitshrink.inspection import describe
    from vitshrink.io import create_model, data_config, load_model, save_model

    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    row: dict[str, Any] = {"family": label, "model": name}
    teacher_path = folder / "teacher.safetensors"
    row["load"] = _cell(lambda: save_model(create_model(name, img_size=args.img_size, patch_size=8, embed_dim=48,
                                                        depth=args.depth, num_heads=3, num_classes=10, **extra).eval(),
                                           teacher_path) and None)
    if row["load"]["status"] != "works":
        return row

    def inspect() -> dict[str, Any]:
        summary = describe(load_model(teacher_path))["summary"]
        return {"heads": summary.get("heads"), "mlp_hidden": summary.get("mlp hidden"),
                "gmacs": summary["GMACs (batch 1)"]}

    def evaluate() -> dict[str, Any]:
        model = load_model(teacher_path)
        val = _slice(resolve_data(), args).val
        val.transform = build_transform(data_config(model), is_training=False)
        return {"top1": evaluate_loader(model, make_loader(val, 32, workers=0)).top1}

    def export() -> dict[str, Any]:
        parity = export_onnx(load_model(teacher_path), folder / "teacher.onnx")
        return {"max_abs_diff": parity.max_abs_diff}

    row["inspect"], row["evaluate"], row["export"] = _cell(inspect), _cell(evaluate), _cell(export)
    for recipe in ("uvc", "deit"):
        row[recipe] = _recipe_cell(teacher_path, recipe, folder / recipe, args)
    return row


def _fmt(cell: dict[str, Any], recipe: bool = False) -> str:
    if cell["status"] == "refused":
        return f"refused: {cell['line']}"
    if cell["status"] == "fails":
        return f"**fails**: {cell['error']}"
    if not recipe:
        return "works"
    latency = cell["latency_ratio_b1"]
    return (f"works: {cell['student_gmacs']:.5f}/{cell['teacher_gmacs']:.5f} GMACs = {cell['gmacs_ratio']:.3f}, "
            f"latency x{latency:.2f}" if latency is not None else "works")


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| family (timm name) | inspect | evaluate | export | uvc (student/teacher GMACs, b1 latency ratio) | "
             "deit (same) |", "|---|---|---|---|---|---|"]
    for row in rows:
        if row["load"]["status"] != "works":
            lines.append(f"| {row['family']} (`{row['model']}`) | {_fmt(row['load'])} | | | | |")
            continue
        lines.append(f"| {row['family']} (`{row['model']}`) | {_fmt(row['inspect'])} | {_fmt(row['evaluate'])} | "
                     f"{_fmt(row['export'])} | {_fmt(row['uvc'], True)} | {_fmt(row['deit'], True)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--flops-target", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=4, help="training steps of the one epoch")
    parser.add_argument("--search-steps", type=int, default=8)
    parser.add_argument("--train-images", type=int, default=128)
    parser.add_argument("--eval-images", type=int, default=64)
    parser.add_argument("--only", default=None, help="comma-separated substrings of family labels to run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="zoo_"))
    families = {k: v for k, v in FAMILIES.items()
                if args.only is None or any(s.lower() in k.lower() for s in args.only.split(","))}
    rows = []
    for label, (name, extra) in families.items():
        rows.append(family_row(label, name, extra, out, args))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    table = markdown(rows)
    print(table)
    if args.json is not None:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "")
        record = {"command": " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  "machine": {"platform": platform.platform(), "cpu": model, "torch": torch.__version__},
                  "settings": vars(args) | {"json": str(args.json), "out": str(out)}, "rows": rows, "table": table}
        atomic_write_text(args.json, json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
