"""This session's prepared GPU run: CUDA checks of the new code and the GPU-scale benchmarks the issues ask for.

Run on the lent GPU machine from the repo root, with the git-ignored ``.device_data/`` carried (made here by
``python benchmarks/device_data.py pack``):

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_checks.py --budget 570

Every step is a subprocess with its own time limit; ``$OUT/gpu_checks.json`` is rewritten after each step (so a
run stopped at its limit still returns what finished), and each step's log and JSON land in ``$OUT``. The figures
are copied into benchmarks/RESULTS.md by hand, with the card's name that the JSON records.
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
CARRY = ROOT / ".device_data"
DATA = Path("/tmp/vitshrink_data")
OUT = Path(os.environ.get("OUT", "/tmp/gpu_out"))
RESNET56 = CARRY / "cifar10_resnet56_akamaster.th"


class Session:
    def __init__(self, budget: float, device: str, workers: int):
        self.t0, self.budget, self.device, self.workers = time.perf_counter(), budget, device, workers
        self.results: dict = {"date": time.strftime("%Y-%m-%d"), "steps": {}}

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        (OUT / "gpu_checks.json").write_text(json.dumps(self.results, indent=2))

    def run(self, name: str, argv: list[str], limit: float) -> dict:
        limit = min(limit, self.left() - 5)
        if limit < 20:
            self.results["steps"][name] = {"skipped": f"only {self.left():.0f} s left"}
            self.save()
            return self.results["steps"][name]
        start = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        with open(OUT / f"{name}.log", "w") as log:
            try:
                rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=limit, env=env,
                                    cwd=ROOT).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        entry = {"rc": rc, "wall_s": round(time.perf_counter() - start, 1), "limit_s": round(limit, 1),
                 "argv": " ".join(argv[1:])}
        tail = open(OUT / f"{name}.log").read().splitlines()[-8:]
        print(f"[{entry['wall_s']:6.1f}s rc={rc}] {name}\n  " + "\n  ".join(tail), flush=True)
        self.results["steps"][name] = entry
        self.save()
        return entry

    def vitshrink(self, name: str, args: list[str], limit: float) -> dict:
        return self.run(name, [sys.executable, "-m", "vitshrink", *args, "--device", self.device,
                               "-j", str(self.workers), "--no-progress"], limit)


def summary(run: Path) -> dict:
    rows = list(csv.DictReader(open(run / "summary.csv"))) if (run / "summary.csv").exists() else []
    report = json.loads((run / "report.json").read_text()) if (run / "report.json").exists() else None
    return {"epochs": len(rows), "best_top1": max((float(r["eval_top1"]) for r in rows), default=None),
            "epoch_time_s": [float(r["time"]) for r in rows][:3], "report": report}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=570.0, help="seconds for every step together")
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny: check the script itself")
    parser.add_argument("--only", default=None, help="comma-separated step names")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.dry_run else "cuda"
    s = Session(args.budget, device, args.workers)
    only = set(args.only.split(",")) if args.only else None
    want = (lambda name: only is None or name in only)
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_data.py"), "unpack", "--out", str(DATA)],
                   check=True)
    import timm
    import torch

    s.results.update(gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
                     torch=torch.__version__, timm=timm.__version__, cpu_count=os.cpu_count())
    print({k: s.results[k] for k in ("gpu", "torch", "timm", "cpu_count")}, flush=True)
    s.save()
    train, test = DATA / "train.tar", DATA / "test.tar"
    cap = ["--steps-per-epoch", "2"] if args.dry_run else []

    # 2. Involution, RedNet and CiT on CUDA, fp32 and bf16.
    if want("involution") and (ROOT / "benchmarks" / "involution_cuda_check.py").exists():
        s.run("involution", [sys.executable, "benchmarks/involution_cuda_check.py"], 40)  # its log holds the checks
    # 1. The new pipeline on CUDA: bf16 autocast (the default there) with torch.compile, a short deit run.
    if want("pipeline"):
        run = Path("/tmp/deit_compile")
        s.vitshrink("pipeline_compile", ["distill", "--recipe", "deit", "--epochs", "1", "--steps-per-epoch",
                                         "2" if args.dry_run else "40", "-b", "256", "--out", str(run), "--compile"], 60)
        s.results["steps"]["pipeline_compile"]["summary"] = summary(run)
        s.save()
    # 3. UVC at 0.5 with post-training on all of train.tar (issue 14's scale bar: <= 2.0 points below the teacher).
    if want("uvc_full"):
        run = Path("/tmp/uvc_full")
        s.vitshrink("uvc_full", ["distill", "--recipe", "uvc", "--flops-target", "0.5", "--data", str(train),
                                 "--val-data", str(test), "--epochs", "2" if args.dry_run else "10", "-b", "256",
                                 "--out", str(run), *cap], 150)
        s.results["steps"]["uvc_full"]["summary"] = summary(run)
        for name in ("uvc_plan.json", "summary.csv", "report.json"):
            if (run / name).exists():
                shutil.copy(run / name, OUT / f"uvc_full_{name}")
        s.save()
    # 3b. --latency-target on the torch-cuda runtime (issue 14: never run on a GPU yet): table, fit, target vs
    # measured in report.json's pruning.latency, then a short post-training.
    if want("uvc_latency_cuda"):
        run = Path("/tmp/uvc_latency_cuda")
        s.vitshrink("uvc_latency_cuda", ["distill", "--recipe", "uvc", "--latency-target", "0.5",
                                         "--latency-runtime", "ort-cpu" if args.dry_run else "torch-cuda",
                                         "--latency-batch", "1" if args.dry_run else "64", "--data", str(train),
                                         "--val-data", str(test), "--epochs", "1", "-b", "256",
                                         "--set", "search_steps=" + ("3" if args.dry_run else "100"),
                                         "--steps-per-epoch", "2" if args.dry_run else "100", "--out", str(run)], 120)
        report = run / "report.json"
        if report.exists():
            s.results["steps"]["uvc_latency_cuda"]["latency"] = json.loads(report.read_text()).get(
                "pruning", {}).get("latency")
            shutil.copy(report, OUT / "uvc_latency_cuda_report.json")
        s.save()
    # 4. Co-advise (issue 9) at a scale the CPU can't reach.
    if want("coadvise") and (ROOT / "benchmarks" / "coadvise.py").exists():
        s.run("coadvise", [sys.executable, "benchmarks/coadvise.py", "--device", device, "--data-dir", str(DATA),
                           "--resnet56", str(RESNET56), "--out", str(OUT / "coadvise.json"), "--work", "/tmp/coadvise",
                           "--epochs", "1" if args.dry_run else "3", "--teacher-epochs", "1" if args.dry_run else "4",
                           "--seeds", "0,1", "--budget-s", "130", *(["--set", "steps_per_epoch=2"] if args.dry_run
                                                                    else [])], 140)
    # 5. Data-free (issue 10): synthesised vs noise vs real, both teachers.
    if want("data_free"):
        s.run("data_free", [sys.executable, "benchmarks/data_free.py", "--device", device, "--scale",
                            "0.02" if args.dry_run else "1", "--iterations", "5" if args.dry_run else "300",
                            "--synth-batch-size", "250", "--epochs", "1" if args.dry_run else "10",
                            "--resnet56", str(RESNET56), "--real-data", str(train), "--val-data", str(test),
                            "-j", str(args.workers), "--out", str(OUT / "data_free.json"),
                            "--work", "/tmp/data_free"], 100)
    # 6. DearKD beside DeiT with the ResNet-56 (issue 10).
    if want("dearkd") and (ROOT / "benchmarks" / "dearkd.py").exists():
        s.run("dearkd", [sys.executable, "benchmarks/dearkd.py", "--device", device, "--resnet56", str(RESNET56),
                         "--val-data", str(test), "--epochs", "1" if args.dry_run else "20", "--seeds", "0",
                         "-j", str(args.workers), "--out", str(OUT / "dearkd.json"),
                         *(["--set", "steps_per_epoch=2"] if args.dry_run else [])], 80)
    s.save()
    print(json.dumps({k: v for k, v in s.results.items() if k != "steps"}, indent=1), flush=True)


if __name__ == "__main__":
    main()
