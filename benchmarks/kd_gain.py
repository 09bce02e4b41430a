"""Does KD pay? The same derived student, epochs, data and seed trained without KD (``ce``), with ``vanilla``
and with ``deit``, in one run: top-1 of each on the validation set, as a table and JSON.

    python benchmarks/kd_gain.py --teacher vitshrink/assets/teacher_vit_cifar10.safetensors \
        [--data vitshrink/assets/cifar10_train_5k.tar] [--val-data ../shared/data/cifar10/test.tar] \
        [--epochs N] [--recipes ce,vanilla,deit] [--set KEY=VALUE ...] [--out output/kd_gain] [--json out.json]

Every setting not given comes from each recipe's preset (recipes/NAME.yaml), so the result is "at the
presets' defaults". ``--set`` applies the same override to every recipe (e.g. ``--set init_from_teacher=false``
to reproduce a from-scratch student). Each run keeps its full run folder under ``--out/RECIPE``.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitshrink.pipeline import BUNDLED_TEACHER, distill  # noqa: E402
from vitshrink.io import load_model  # noqa: E402

SHARED_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "test.tar"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=str(BUNDLED_TEACHER), help="teacher SPEC (default: the bundled ViT)")
    parser.add_argument("--arch", help="--arch for a foreign teacher checkpoint")
    parser.add_argument("--data", default=None, help="training data (default: bundled CIFAR-10 train_5k)")
    parser.add_argument("--val-data", default=str(SHARED_TEST) if SHARED_TEST.exists() else None,
                        help="validation data (default: ../shared/data/cifar10/test.tar when present)")
    parser.add_argument("--recipes", default="ce,vanilla,deit")
    parser.add_argument("--epochs", type=int, default=None, help="default: each preset's epochs")
    parser.add_argument("-b", "--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-j", "--workers", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a preset key for every recipe (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("output/kd_gain"))
    parser.add_argument("--json", type=Path, default=None, help="default: OUT/kd_gain.json")
    args = parser.parse_args()

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    data = args.data
    if data is None and args.val_data is not None:
        data = str(Path(__file__).resolve().parents[1] / "vitshrink" / "assets" / "cifar10_train_5k.tar")
    rows = []
    for recipe in args.recipes.split(","):
        teacher = load_model(args.teacher, arch=args.arch)  # fresh each time: nothing carries over between runs
        started = time.perf_counter()
        result = distill(teacher, recipe, data=data, val_data=args.val_data, out_dir=args.out / recipe,
                         epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         workers=args.workers, device=args.device, overrides=overrides, progress=True)
        summary = list(csv.DictReader((result.out_dir / "summary.csv").open()))
        rows.append({
            "recipe": recipe, "best_top1": result.report["student"]["top1"],
            "final_epoch_top1": float(summary[-1]["eval_top1"]) / 100, "best_epoch": result.report["best_epoch"],
            "teacher_top1": result.report["teacher"]["top1"], "epochs": result.report["epochs"],
            "student_params": result.report["student"]["params"], "student_gmacs": result.report["student"]["gmacs"],
            "wall_s": time.perf_counter() - started,
            "config": yaml.safe_load((result.out_dir / "args.yaml").read_text())["config"],
        })
    baseline = next((r for r in rows if r["recipe"] == "ce"), None)
    print(f"\n{'recipe':<10}{'best top-1':>12}{'final top-1':>13}{'vs ce (pt)':>12}{'teacher':>10}{'wall s':>9}")
    for r in rows:
        gain = (r["final_epoch_top1"] - baseline["final_epoch_top1"]) * 100 if baseline else float("nan")
        r["gain_vs_ce_pt"] = gain if baseline else None
        print(f"{r['recipe']:<10}{r['best_top1']:>12.2%}{r['final_epoch_top1']:>13.2%}{gain:>+12.2f}"
              f"{r['teacher_top1']:>10.2%}{r['wall_s']:>9.1f}")
    output = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python"] + sys.argv),
        "machine": {"platform": platform.platform(), "cpu_count": __import__("os").cpu_count()},
        "teacher": args.teacher, "data": data or "bundled", "val_data": args.val_data or "bundled",
        "seed": args.seed, "overrides": overrides, "runs": rows,
        "note": "gain = final-epoch top-1 minus ce's final-epoch top-1 (best-epoch top-1 is selected on the "
                "validation set itself, so it is optimistic for every recipe alike)",
    }
    path = args.json or args.out / "kd_gain.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(output, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
