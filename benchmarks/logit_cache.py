"""Student step throughput: student-only (CE) vs live KD vs KD from a logit cache, in one run (CPU).

    PYTHONPATH=. nice -n 5 python benchmarks/logit_cache.py [--steps 20] [--batch 64]

Rows: the bundled teacher (ViT at 32 px) and a random-weight ViT-S-width teacher (~10x the student). The
student is the bundled teacher at half depth (the vanilla default). The cache holds K=10 of one epoch of the
bundled 5k CIFAR-10 training views; the timing covers forward + backward + optimiser step of the task.
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
from vitshrink.io import create_model, data_config, save_model, set_data_config
from vitshrink.pipeline import BUNDLED_TEACHER, load_bundled_teacher, resolve_run_settings
from vitshrink.students import derive_student


def _time(step, batches, steps: int) -> float:
    for images, targets, extras in batches[:2]:
        step(images, targets, extras)  # warm-up
    start = time.perf_counter()
    for images, targets, extras in batches[:steps]:
        step(images, targets, extras)
    return steps * batches[0][0].shape[0] / (time.perf_counter() - start)


def measure(teacher, teacher_file, steps: int, batch: int, tmp: Path) -> dict:
    _, settings = resolve_run_settings("vanilla", overrides={"batch_size": batch, "workers": 0})
    cfg = dict(settings.values)
    data = resolve_data()
    torch.manual_seed(0)
    student = derive_student(load_bundled_teacher())
    cache_logits(teacher, teacher_file, data.train, tmp / "cache", cfg=cfg, epochs=1, topk=10, seed=0, num_classes=10)
    source = SeededSource(with_transform(data.train, train_transform(student, cfg)), batch_size=batch, seed=0, workers=0)
    source.set_epoch(0)
    batches = [b for _, b in zip(range(steps + 2), source)]
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
    return {"student_only": _time(runner(None), batches, steps), "live_kd": _time(runner(live), batches, steps),
            "cache_kd": _time(runner(cached), batches, steps),
            "teacher_params": sum(p.numel() for p in teacher.parameters()),
            "student_params": sum(p.numel() for p in student.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows["bundled"] = measure(load_bundled_teacher(), BUNDLED_TEACHER, args.steps, args.batch, Path(tmp) / "a")
        big = create_model("vit_small_patch16_224", img_size=32, patch_size=4, num_classes=10)
        set_data_config(big, **{k: data_config(load_bundled_teacher())[k] for k in ("mean", "std")})
        big_file = Path(tmp) / "vits.safetensors"
        save_model(big, big_file)
        rows["vit_s_width"] = measure(big, big_file, args.steps, args.batch, Path(tmp) / "b")
    for row in rows.values():
        row["cache_vs_student_only"] = row["cache_kd"] / row["student_only"]
        row["cache_vs_live"] = row["cache_kd"] / row["live_kd"]
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
