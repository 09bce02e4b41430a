"""``torchrun --nproc_per_node 2 -m vitshrink distill`` on CPU (gloo): DDP student, sharded data, rank-0 output."""
from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from distill_support import PYTHON, REPO, subprocess_env
from vitshrink.data import resolve_data
from vitshrink.train import load_checkpoint
from vitshrink.evaluation import evaluate
from vitshrink.io import load_model


def test_torchrun_two_cpu_processes(tiny_teacher_path, tmp_path):
    import subprocess

    out = tmp_path / "ddp"
    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "vitshrink", "distill", str(tiny_teacher_path), "--recipe", "vanilla", "--out", str(out),
               "--epochs", "1", "-b", "16", "--steps-per-epoch", "6", "-j", "0", "--device", "cpu", "--no-progress",
               "--set", "bench_batch_sizes=[1]"]
    result = subprocess.run(command, env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("vitshrink distill report") == 1  # only rank 0 prints the report
    args = yaml.safe_load((out / "args.yaml").read_text())
    assert args["world_size"] == 2
    state = load_checkpoint(out / "last.pt")
    assert state["global_step"] == 6 and len(state["rng"]) == 2  # both ranks' RNG states are kept
    # Each rank evaluated its own shard; the all-reduced top-1 equals one process evaluating everything.
    rows = list(csv.DictReader((out / "summary.csv").open()))
    student = load_model(out / "student.safetensors")
    torch.set_num_threads(1)
    full = evaluate(student, resolve_data().val, workers=0)
    assert float(rows[0]["eval_top1"]) == pytest.approx(full.top1 * 100, abs=1e-9)
    report = json.loads((out / "report.json").read_text())
    assert report["student"]["top1"] == pytest.approx(full.top1)
