"""The one prepared GPU session: train the bundled ViT teacher on CUDA, check AMP and torch.compile, time CUDA.

Run on the lent GPU machine from the repo root (inputs carried in the git-ignored ``.device_data/``):
    python3 benchmarks/gpu_session.py
Everything it measures goes to ``$OUT/gpu_session.json`` (copied into benchmarks/RESULTS.md by hand).

Steps: (1) a 50-step probe of the teacher-training run gives the time per step, from which the number of
epochs that fits ``--train-budget`` seconds is chosen; (2) `vitshrink distill` trains the ViT teacher from the
shared ResNet-56 (bf16 autocast on CUDA) on all of cifar10/train.tar, validated on cifar10/test.tar;
(3) the same short `deit` run eager and with ``--compile``; (4) CUDA latency of teacher and derived student.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / ".device_data"
OUT = Path(os.environ.get("OUT", "/tmp/gpu_out"))
STUDENT = "vit_tiny_patch16_224:img_size=32,patch_size=4,embed_dim=192,depth=6,num_heads=6,num_classes=10"


def vitshrink(args: list[str], log: Path, timeout: float) -> tuple[int, float]:
    start = time.perf_counter()
    with open(log, "w") as handle:
        try:
            rc = subprocess.run([sys.executable, "-m", "vitshrink", *args], stdout=handle, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    wall = time.perf_counter() - start
    print(f"[{wall:6.1f}s rc={rc}] vitshrink {' '.join(args)}", flush=True)
    print("".join(open(log).readlines()[-6:]), flush=True)
    return rc, wall


def summary_rows(run: Path) -> list[dict[str, str]]:
    path = run / "summary.csv"
    return list(csv.DictReader(open(path))) if path.exists() else []


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-budget", type=float, default=300.0, help="seconds for the teacher's training epochs")
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--dry-run", action="store_true", help="CPU, a few steps each: check the script itself")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    cap = ["--steps-per-epoch", "2"] if args.dry_run else []
    t0 = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    data = Path("/tmp/vitshrink_data")
    data.mkdir(exist_ok=True)
    for name in ("train", "test"):
        if not (data / f"{name}.tar").exists():
            subprocess.run(f"xz -dc {DATA}/{name}.tar.xz > {data}/{name}.tar", shell=True, check=True)
    import torch

    results: dict = {
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "none (dry run)", "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(),
    }
    import timm

    results["timm"] = timm.__version__
    print(results, flush=True)
    teacher_cnn = str(DATA / "cifar10_resnet56_akamaster.th")
    common = ["distill", teacher_cnn, "--arch", "cifar_resnet56", "--recipe", "vanilla", "--student", STUDENT,
              "-c", "benchmarks/teacher_vit.yaml", "--data", f"{data}/train.tar", "--val-data", f"{data}/test.tar",
              "--device", device, "-j", str(args.workers), "--no-progress", "--seed", "0"]

    # (1) probe: 50 optimizer steps of the real run.
    probe_steps = 2 if args.dry_run else 50
    rc, wall = vitshrink(common + ["--epochs", "1", "--steps-per-epoch", str(probe_steps), "--out", "/tmp/probe"],
                         OUT / "probe.log", timeout=150)
    rows = summary_rows(Path("/tmp/probe"))
    steps_per_epoch = 50000 // 512
    epoch_s = float(rows[0]["time"]) * steps_per_epoch / probe_steps if rows else 10.0
    epochs = max(10, min(args.max_epochs, int(args.train_budget / epoch_s)))
    results["probe"] = {"rc": rc, "wall_s": wall, "epoch0_time_s": rows[0]["time"] if rows else None,
                        "estimated_epoch_s": epoch_s, "chosen_epochs": epochs}
    print(results["probe"], flush=True)

    # (2) the teacher run.
    run = Path("/tmp/teacher_run")
    remaining = 520 - (time.perf_counter() - t0) - 90  # keep time for the compile check and latency
    rc, wall = vitshrink(common + cap + ["--epochs", str(epochs), "--out", str(run)], OUT / "teacher.log",
                         timeout=max(60.0, remaining))
    rows = summary_rows(run)
    results["teacher_run"] = {
        "rc": rc, "wall_s": wall, "epochs_planned": epochs, "epochs_done": len(rows),
        "best_top1": max((float(r["eval_top1"]) for r in rows), default=None),
        "last": rows[-1] if rows else None,
        "train_images_per_s": (50000 // 512 * 512) / (sum(float(r["time"]) for r in rows) / len(rows)) if rows else None,
    }
    for name in ("student.safetensors", "summary.csv", "report.json", "args.yaml"):
        if (run / name).exists():
            shutil.copy(run / name, OUT / f"teacher_{name}")
    print(results["teacher_run"], flush=True)
    (OUT / "gpu_session.json").write_text(json.dumps(results, indent=2))

    # (3) torch.compile vs eager: a short deit run from the new teacher on the bundled data.
    teacher_vit = OUT / "teacher_student.safetensors"
    if teacher_vit.exists() and time.perf_counter() - t0 < 470:
        short = ["distill", str(teacher_vit), "--recipe", "deit", "--device", device, "--epochs", "1", "--steps-per-epoch",
                 "2" if args.dry_run else "30",
                 "-b", "256", "-j", str(args.workers), "--no-progress"]
        for label, extra in (("eager", []), ("compile", ["--compile"])):
            rc, wall = vitshrink(short + extra + ["--out", f"/tmp/deit_{label}"], OUT / f"deit_{label}.log", timeout=120)
            rows = summary_rows(Path(f"/tmp/deit_{label}"))
            results[f"deit_{label}"] = {"rc": rc, "wall_s": wall, "epoch_time_s": rows[0]["time"] if rows else None,
                                        "top1": rows[0]["eval_top1"] if rows else None}
        (OUT / "gpu_session.json").write_text(json.dumps(results, indent=2))

    # (4) CUDA latency of the teacher and its derived half-depth student (fp32 and bf16 autocast).
    if teacher_vit.exists():
        from vitshrink.io import load_model
        from vitshrink.measure import torch_latency
        from vitshrink.students import derive_student

        teacher = load_model(teacher_vit)
        student = derive_student(teacher, depth_ratio=0.5, init=True).to(device)
        teacher.to(device)
        latency = {}
        for name, model in (("teacher", teacher), ("student", student)):
            for dtype_name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
                for batch in (1, 256):
                    if dtype is not None and device == "cpu":
                        continue
                    stats = torch_latency(model, batch, min_time_s=0.1 if args.dry_run else 1.0, autocast_dtype=dtype)
                    latency[f"{name}/{dtype_name}/b{batch}"] = stats.as_dict()
        results["cuda_latency"] = latency
    results["total_s"] = time.perf_counter() - t0
    (OUT / "gpu_session.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=1), flush=True)


if __name__ == "__main__":
    main()
