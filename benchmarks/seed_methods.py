"""The survey's other methods beside their baselines (issue 25), at CPU scale, one table and JSON.

    python benchmarks/seed_methods.py [--epochs 3] [--seeds 0,1] [--out output/seed_methods]
        [--json benchmarks/results/seed_methods_cpu.json]

Group "vit": the bundled ViT teacher -> the derived half-depth student (initialised from the teacher), trained
with ``vanilla``, ``deit``, ``manifold`` and ``tat`` at their presets; ``manifold`` and ``tat`` are compared with
both ``vanilla`` and ``deit``. Group "cnn": the bundled ViT teacher -> CIFAR ResNet-20 (from its own init)
trained with labels alone (``ce``), with ``vanilla`` KD and with ``crossarch``, all at crossarch's learning rate
(its preset; so only the loss differs). Training data: the bundled 5k CIFAR-10 images; top-1 on all 10,000
images of ../shared/data/cifar10/test.tar at the final epoch. The JSON is rewritten after every run, so an
interrupted benchmark keeps what completed.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitshrink.config import load_preset  # noqa: E402
from vitshrink.io import load_model  # noqa: E402
from vitshrink.pipeline import BUNDLED_TEACHER, distill  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEST = REPO.parent / "shared" / "data" / "cifar10" / "test.tar"
TRAIN = REPO / "vitshrink" / "assets" / "cifar10_train_5k.tar"
# (group, recipe, student, the baselines it must beat)
ROWS = [("vit", "vanilla", None, []), ("vit", "deit", None, []), ("vit", "manifold", None, ["vanilla", "deit"]),
        ("vit", "tat", None, ["vanilla", "deit"]), ("cnn", "ce", "cifar_resnet20", []),
        ("cnn", "vanilla", "cifar_resnet20", []), ("cnn", "crossarch", "cifar_resnet20", ["ce", "vanilla"])]


def run_one(group: str, recipe: str, student: str | None, seed: int, args: argparse.Namespace) -> dict:
    teacher = load_model(BUNDLED_TEACHER)  # fresh each time: nothing carries over between runs
    # The CNN rows share crossarch's learning rate (a CNN from its own init), so only the loss differs.
    lr = float(load_preset("crossarch")["lr"]) if group == "cnn" else None
    started = time.perf_counter()
    result = distill(teacher, recipe, student=student, data=str(TRAIN), val_data=str(args.val_data),
                     out_dir=args.out / f"{group}_{recipe}_seed{seed}", epochs=args.epochs, lr=lr, seed=seed,
                     device="cpu", workers=0, progress=False, overrides={"bench_batch_sizes": [1]})
    summary = list(csv.DictReader((result.out_dir / "summary.csv").open()))
    return {"group": group, "recipe": recipe, "student": student or "derived half-depth ViT", "seed": seed,
            "final_top1": float(summary[-1]["eval_top1"]) / 100, "best_top1": result.report["student"]["top1"],
            "teacher_top1": result.report["teacher"]["top1"], "epochs": args.epochs, "lr": lr,
            "student_params": result.report["student"]["params"], "wall_s": round(time.perf_counter() - started, 1)}


def verdicts(rows: list[dict]) -> list[dict]:
    """Per method row: its mean final top-1 over the seeds that completed, against each baseline's mean over
    the same seeds; ``beat`` True when above every baseline, False when not above one of those measured, None
    while a baseline is missing and none is above it."""
    out = []
    for group, recipe, _, baselines in ROWS:
        if not baselines:
            continue
        mine = {r["seed"]: r["final_top1"] for r in rows if (r["group"], r["recipe"]) == (group, recipe)}
        entry = {"group": group, "recipe": recipe, "seeds": sorted(mine), "top1": None, "vs": {}, "beat": None}
        if mine:
            entry["top1"] = statistics.mean(mine.values())
            for base in baselines:
                theirs = {r["seed"]: r["final_top1"] for r in rows
                          if (r["group"], r["recipe"]) == (group, base) and r["seed"] in mine}
                if len(theirs) == len(mine):
                    entry["vs"][base] = round((entry["top1"] - statistics.mean(theirs.values())) * 100, 2)
            if any(gain <= 0 for gain in entry["vs"].values()):
                entry["beat"] = False  # already not above one baseline
            elif len(entry["vs"]) == len(baselines):
                entry["beat"] = True
        out.append(entry)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--val-data", type=Path, default=TEST)
    parser.add_argument("--only", default=None,
                        help="comma-separated group:recipe rows to run, in this order (default: all, table order)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the runs already in --json and skip them (continue an interrupted benchmark)")
    parser.add_argument("--out", type=Path, default=Path("output/seed_methods"))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/seed_methods_cpu.json"))
    parser.add_argument("--rescore", action="store_true", help="only recompute the verdicts of --json")
    args = parser.parse_args()
    if args.rescore:
        saved = json.loads(args.json.read_text())
        args.json.write_text(json.dumps({**saved, "verdicts": verdicts(saved["runs"])}, indent=2))
        return
    rows: list[dict] = json.loads(args.json.read_text())["runs"] if args.keep and args.json.exists() else []
    order = [f"{group}:{recipe}" for group, recipe, _, _ in ROWS] if args.only is None else args.only.split(",")
    students = {f"{group}:{recipe}": student for group, recipe, student, _ in ROWS}
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in order:
            group, recipe = name.split(":")
            if any((r["group"], r["recipe"], r["seed"]) == (group, recipe, seed) for r in rows):
                continue
            rows.append(run_one(group, recipe, students[name], seed, args))
            print(json.dumps(rows[-1]), flush=True)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join(["python"] + sys.argv), "machine": platform.platform(),
                "teacher": str(BUNDLED_TEACHER), "train": str(TRAIN), "val_data": str(args.val_data),
                "epochs": args.epochs, "runs": rows, "verdicts": verdicts(rows),
                "note": "top-1 at the final epoch on the whole test set; a method 'beat' its baselines when its mean "
                        "over the completed seeds is above each baseline's mean over the same seeds"}, indent=2))
    for entry in verdicts(rows):
        print(f"{entry['group']}:{entry['recipe']}: top-1 {entry['top1']}, vs {entry['vs']}, beat: {entry['beat']}")


if __name__ == "__main__":
    main()
