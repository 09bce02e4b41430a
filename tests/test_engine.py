"""The distillation engine on real images: outputs, reload, resume after SIGKILL, NaN guard, CLI errors."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cli_support import assert_one_line_error, run_cli
from conftest import RESNET20
from distill_support import PYTHON, REPO, small_data, subprocess_env
from vitshrink.pipeline import distill
from vitshrink.train import load_checkpoint
from vitshrink.errors import UserError
from vitshrink.io import load_model, record_of

OUTPUTS = ("args.yaml", "summary.csv", "student.safetensors", "last.pt", "student.onnx", "report.json", "report.md")


def test_one_epoch_writes_every_output_and_student_reloads_alone(vanilla_run):
    result, out = vanilla_run, vanilla_run.out_dir
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    reloaded = load_model(out / "student.safetensors")  # nothing but the file
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), result.student(x))
    assert len(reloaded.blocks) == 2 and record_of(reloaded).class_names[0] == "airplane"
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert list(rows[0]) == ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr", "time"]
    assert len(rows) == 1 and 0 <= float(rows[0]["eval_top1"]) <= 100
    args = yaml.safe_load((out / "args.yaml").read_text())
    assert args["recipe"] == "vanilla" and args["config"]["epochs"] == 1 and args["config"]["temperature"] == 4.0
    state = torch.load(out / "last.pt", weights_only=True)  # tensors and plain containers only
    assert state["epoch"] == 1 and state["batch"] == 0
    report = json.loads((out / "report.json").read_text())
    assert report["student"]["top1"] == pytest.approx(float(rows[0]["eval_top1"]) / 100)
    assert report["student"]["params"] < report["teacher"]["params"]
    assert 0.4 < report["ratios"]["gmacs"] < 0.6
    # ORT latency at every batch size the run was asked for (the shared run times 1 and 4).
    assert set(report["student"]["ort_p50_ms"]) == {str(b) for b in args["config"]["bench_batch_sizes"]} == {"1", "4"}
    assert report["onnx"]["passed"]
    assert "speed-up" in (out / "report.md").read_text()


def _cli(out: Path, teacher: Path, *extra: str) -> list[str]:
    return [PYTHON, "-m", "vitshrink", "distill", str(teacher), "--recipe", "vanilla", "--out", str(out),
            "--epochs", "2", "-b", "32", "--steps-per-epoch", "10", "--checkpoint-steps", "2", "-j", "0",
            "--device", "cpu", "--no-progress", "--seed", "3", "--set", "bench_batch_sizes=[1]", *extra]


def test_resume_after_sigkill_matches_uninterrupted_run(capsys, tiny_teacher_path, tmp_path):
    env = subprocess_env()
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    proc = subprocess.Popen(_cli(interrupted, tiny_teacher_path), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (interrupted / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    partial = load_checkpoint(interrupted / "last.pt")
    assert partial["epoch"] == 0 and 0 < partial["batch"] < 10  # killed mid-epoch
    assert not (interrupted / "report.json").exists()
    # The resumed run and the uninterrupted reference run the same command in-process (a process other than the
    # killed one, without a Python start to pay for each).
    code, _, err = run_cli(capsys, *_cli(interrupted, tiny_teacher_path, "--resume")[3:])
    assert code == 0, err[-2000:]
    code, _, err = run_cli(capsys, *_cli(reference, tiny_teacher_path)[3:])
    assert code == 0, err[-2000:]
    resumed, uninterrupted = load_checkpoint(interrupted / "last.pt"), load_checkpoint(reference / "last.pt")
    assert resumed["global_step"] == uninterrupted["global_step"] == 20
    for key, value in uninterrupted["trainable"].items():
        assert torch.equal(resumed["trainable"][key], value), key
    assert load_file(str(interrupted / "student.safetensors")).keys() == load_file(
        str(reference / "student.safetensors")).keys()
    summary = lambda run: [(r["epoch"], r["train_loss"], r["eval_top1"])  # noqa: E731
                           for r in csv.DictReader((run / "summary.csv").open())]
    assert summary(interrupted) == summary(reference)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_teacher_path, tmp_path):
    teacher = load_model(tiny_teacher_path)
    with pytest.raises(UserError, match="loss became nan") as caught:
        # Warm-up: the first step runs at warmup_lr (good), the second at ~1e30 / 8 (weights diverge).
        distill(teacher, "vanilla", data=small_data(256, 20), out_dir=tmp_path, epochs=1, batch_size=32, lr=1e30,
                workers=0, progress=False, overrides={"warmup_epochs": 1, "warmup_lr": 1e-6, "clip_grad": None,
                                                      "checkpoint_steps": 1})
    assert "last good checkpoint kept" in str(caught.value) and "\n" not in str(caught.value)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["global_step"] >= 1
    assert all(torch.isfinite(v).all() for v in state["trainable"].values() if v.is_floating_point())


def test_bad_flags_exit_2_with_one_line(capsys, tiny_teacher_path, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "unknown recipe": (["--recipe", "nope"], "unknown recipe"),
        "wider student": (["--student", "vit_tiny_patch16_224:img_size=32,patch_size=8,embed_dim=96,depth=2,"
                           "num_heads=3"], "wider than the teacher"),
        "no images": (["--data", str(empty)], str(empty)),
        "unknown setting": (["--set", "temprature=3"], "unknown setting"),
    }
    common = [str(tiny_teacher_path), "--out", str(tmp_path / "out"), "--no-progress"]
    # One case in a real process (what a user's shell sees, import-time output included); the rest in-process,
    # through the same entry point, without paying for a Python start each.
    args, message = cases.pop("unknown recipe")
    result = subprocess.run([PYTHON, "-m", "vitshrink", "distill", *common, *args], env=subprocess_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert_one_line_error(result.returncode, result.stderr, message)
    for label, (args, message) in cases.items():
        code, _, err = run_cli(capsys, "distill", *common, *args)
        assert_one_line_error(code, err, message)
    assert not (tmp_path / "out" / "student.safetensors").exists()


def test_loader_workers_do_not_change_training(tiny_teacher_path, tmp_path):
    # Augmentation is seeded per (seed, epoch, image): the same batches whichever process makes them.
    teacher = load_model(tiny_teacher_path)
    states = []
    for workers in (0, 2):
        distill(teacher, "vanilla", data=small_data(192, 40), out_dir=tmp_path / f"j{workers}", epochs=1,
                batch_size=32, workers=workers, progress=False,
                overrides={"steps_per_epoch": 3, "bench_batch_sizes": [1]})
        states.append(load_checkpoint(tmp_path / f"j{workers}" / "last.pt")["trainable"])
    for key, value in states[0].items():
        assert torch.equal(states[1][key], value), key


def test_deit_from_a_cnn_teacher_exports_one_output(tmp_path):
    import onnx

    teacher = load_model(RESNET20, arch="cifar_resnet20")
    result = distill(teacher, "deit", student="vit_tiny_patch16_224:img_size=32,patch_size=8,embed_dim=48,depth=2,"
                     "num_heads=3,mlp_ratio=2.0", data=small_data(192, 40), out_dir=tmp_path, epochs=1,
                     batch_size=32, workers=0, progress=False,
                     overrides={"steps_per_epoch": 3, "bench_batch_sizes": [1]})
    graph = onnx.load(str(tmp_path / "student.onnx")).graph
    assert len(graph.output) == 1 and result.report["onnx"]["passed"]
    reloaded = load_model(tmp_path / "student.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), result.student(x))  # the two heads averaged, one tensor
    assert result.report["teacher"]["top1"] > 0.7  # the ResNet-20 teacher is real (~91% on CIFAR-10)
