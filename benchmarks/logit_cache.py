"""Logit cache benchmarks (issue 11), CPU.

Throughput (default): student step throughput, student-only (CE) vs live KD vs KD from a logit cache, in one run,
the three modes timed in interleaved rounds (vitshrink.measure.interleaved_p50).

    PYTHONPATH=. nice -n 5 python benchmarks/logit_cache.py [--steps 20] [--batch 64]

Rows: the bundled teacher (ViT at 32 px) and a random-weight ViT-S-width teacher (~10x the student). The
student is the bundled teacher at half depth (the vanilla default). The cache holds K=10 of one epoch of the
bundled 5k CIFAR-10 training views; the timing covers forward + backward + optimiser step of the task.

Accuracy (``--accuracy``): the quick start (bundled teacher, bundled train_5k / test_1k, recipe ``vanilla``,
its default settings) distilled with live KD and from a K=10 cache, same epochs, per seed; top-1 on the bundled
validation set (test_1k), the wall time of each run (training alone and the whole run with export and
measurement) and of the cache build; a table on stdout and JSON in ``--out``.

    PYTHONPATH=. nice -n 5 python benchmarks/logit_cache.py --accuracy --epochs 5 --seeds 0,1 \
        --out benchmarks/results/logit_cache_accuracy_cpu.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from vitshrink.data import resolve_data
from vitshrink.data.logit_cache import CachedTeacher, cache_logits
from vitshrink.data.sources import SeededSource, train_transform, with_transform
from vitshrink.distill.tasks import LogitKDTask
from vitshrink.distill.teachers import Teachers
from vitshrink.io import create_model, data_config, set_data_config
from vitshrink.measure import interleaved_p50
from vitshrink.pipeline import load_bundled_teacher, resolve_run_settings
from vitshrink.students import derive_student


def measure(teacher, steps: int, batch: int, tmp: Path) -> dict:
    _, settings = resolve_run_settings("vanilla", overrides={"batch_size": batch, "workers": 0})
    cfg = dict(settings.values)
    data = resolve_data()
    torch.manual_seed(0)
    student = derive_student(load_bundled_teacher())
    cache_logits(teacher, data.train, tmp / "cache", cfg=cfg, epochs=1, topk=10, seed=0, num_classes=10)
    source = SeededSource(with_transform(data.train, train_transform(student, cfg)), batch_size=batch, seed=0, workers=0)
    source.set_epoch(0)
    batches = [b for _, b in zip(range(1), source)]
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    live = LogitKDTask(student, Teachers.live({"teacher": teacher}, data_config(student)), kd_weight=0.5,
                       temperature=1.0)
    cached = LogitKDTask(student, Teachers({"teacher": CachedTeacher(tmp / "cache")}), kd_weight=0.5, temperature=1.0)

    def runner(task):
        def step(images, targets, extras):
            loss = task(images, targets, extras)["loss"] if task is not None else \
                torch.nn.functional.cross_entropy(student(images), targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step

    student.train()
    images, targets, extras = batches[0]
    steps_by_mode = {"student_only": runner(None), "live_kd": runner(live), "cache_kd": runner(cached)}
    # The project's interleaved timer: modes alternate round by round, so drift during the run hits them alike.
    timed = interleaved_p50({mode: (lambda step=step: step(images, targets, extras))
                             for mode, step in steps_by_mode.items()},
                            images.shape[0], rounds=max(1, steps // 3), warmup=2, min_time_s=0.0, min_iters=3)
    return {**{mode: images.shape[0] / (entry["p50_ms"] / 1000) for mode, entry in timed.items()},
            "teacher_params": sum(p.numel() for p in teacher.parameters()),
            "student_params": sum(p.numel() for p in student.parameters())}


def accuracy_row(seed: int, *, epochs: int, topk: int, recipe: str, overrides: dict, tmp: Path) -> dict:
    """One seed: build the cache, then the same run with live KD and from the cache."""
    from vitshrink.pipeline import distill

    _, settings = resolve_run_settings(recipe, flags={"epochs": epochs}, overrides=overrides)
    teacher = load_bundled_teacher()
    start = time.perf_counter()
    cache_logits(teacher, resolve_data().train, tmp / "cache", cfg=dict(settings.values),
                 epochs=epochs, topk=topk, seed=seed, num_classes=10)
    row = {"seed": seed, "cache_build_s": time.perf_counter() - start}
    for name, caches in (("live", None), ("cache", {"teacher": str(tmp / "cache")})):
        start = time.perf_counter()
        result = distill(load_bundled_teacher(), recipe, out_dir=tmp / name, epochs=epochs, seed=seed, device="cpu",
                         progress=False, overrides=dict(overrides), logit_cache=caches)
        row[name] = {"top1": result.report["student"]["top1"], "train_s": result.report["distill_seconds"],
                     "run_s": time.perf_counter() - start}
    return row


def run_accuracy(args) -> dict:
    overrides = {"steps_per_epoch": args.steps_per_epoch} if args.steps_per_epoch else {}
    rows = []
    for seed in (int(v) for v in args.seeds.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(accuracy_row(seed, epochs=args.epochs, topk=args.topk, recipe=args.recipe,
                                     overrides=overrides, tmp=Path(tmp)))
    print(f"recipe {args.recipe}, {args.epochs} epochs, K={args.topk}, bundled train_5k -> test_1k top-1")
    print("| seed | live top-1 | cache top-1 | live train s | cache train s | live run s | cache run s | cache build s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['live']['top1']:.4f} | {r['cache']['top1']:.4f} | {r['live']['train_s']:.1f} | "
              f"{r['cache']['train_s']:.1f} | {r['live']['run_s']:.1f} | {r['cache']['run_s']:.1f} | "
              f"{r['cache_build_s']:.1f} |")
    return {"mode": "accuracy", "recipe": args.recipe, "epochs": args.epochs, "topk": args.topk,
            "steps_per_epoch": args.steps_per_epoch, "threads": torch.get_num_threads(), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--accuracy", action="store_true", help="K-cache vs live KD top-1 instead of throughput")
    parser.add_argument("--epochs", type=int, default=5, help="--accuracy: epochs of each run (quick start: 5)")
    parser.add_argument("--seeds", default="0,1", help="--accuracy: comma-separated seeds")
    parser.add_argument("--topk", type=int, default=10, help="--accuracy: K of the cache")
    parser.add_argument("--recipe", default="vanilla", help="--accuracy: recipe (quick start: vanilla)")
    parser.add_argument("--steps-per-epoch", type=int, default=0, help="--accuracy: cap (smoke runs only)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.accuracy:
        result = run_accuracy(args)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        return
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows["bundled"] = measure(load_bundled_teacher(), args.steps, args.batch, Path(tmp) / "a")
        big = create_model("vit_small_patch16_224", img_size=32, patch_size=4, num_classes=10)
        set_data_config(big, **{k: data_config(load_bundled_teacher())[k] for k in ("mean", "std")})
        rows["vit_s_width"] = measure(big, args.steps, args.batch, Path(tmp) / "b")
    for row in rows.values():
        row["cache_vs_student_only"] = row["cache_kd"] / row["student_only"]
        row["cache_vs_live"] = row["cache_kd"] / row["live_kd"]
    print(json.dumps(rows, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
