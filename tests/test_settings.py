"""Layered settings: base + overlay, each value's source, recipe options as flags / --config / --set, `recipes`."""
from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from cli_support import run_cli
from vitshrink.cli import app
from vitshrink.cli.distill import parse_setting_flags
from vitshrink.config import load_preset, recipe_options, resolve_settings
from vitshrink.errors import UserError


def test_layers_and_sources(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("lr: 3.0e-4\nsearch_steps: 7\n")
    settings = resolve_settings("uvc", config, {"epochs": 2, "batch_size": None}, {"flops_target": 0.3})
    values, sources = settings.values, settings.sources
    assert values["flops_target"] == 0.3 and sources["flops_target"] == "--set"  # no longer skipped
    assert values["epochs"] == 2 and sources["epochs"] == "flag"
    assert values["lr"] == 3.0e-4 and sources["lr"] == f"--config {config}"
    assert values["search_steps"] == 7 and sources["search_steps"] == f"--config {config}"
    assert sources["batch_size"] == "base" and sources["flops_tolerance"] == "preset"
    assert resolve_settings("probe").sources["weight_decay"] == "preset"  # the overlay overrides base
    assert load_preset("probe")["weight_decay"] == 0.025 and load_preset("vanilla")["weight_decay"] == 0.05
    assert "flops_target" in recipe_options("uvc") and "epochs" not in recipe_options("uvc")
    with pytest.raises(UserError, match=r"--flops-target: unknown setting 'flops_target' for recipe vanilla "
                                        r"\(known: .*kd_weight"):
        resolve_settings("vanilla", None, {"flops_target": 0.3}, None)
    with pytest.raises(UserError, match="--set: 'temprature': unknown setting"):
        resolve_settings("vanilla", None, None, {"temprature": 3})


def test_setting_flags_parse_like_the_cli():
    options, positionals = parse_setting_flags(
        ["--flops-target", "0.3", "--no-skip", "teacher.safetensors", "--search-steps=5", "--skip-only", "false"],
        "uvc")
    assert options == {"flops_target": 0.3, "no_skip": True, "search_steps": 5, "skip_only": False}
    assert positionals == ["teacher.safetensors"]
    with pytest.raises(UserError, match="--search-steps: expected a value"):
        parse_setting_flags(["--search-steps"], "uvc")


def test_recipes_list_and_show():
    runner = CliRunner()
    listed = runner.invoke(app, ["recipes"])
    assert listed.exit_code == 0 and all(name in listed.output for name in ("vanilla", "deit", "uvc", "probe", "ce"))
    shown = runner.invoke(app, ["recipes", "show", "uvc"])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    at = next(i for i, line in enumerate(lines) if "--flops-target" in line)
    assert lines[at].split() == ["*", "--flops-target", "=", "0.5", "[recipes/uvc.yaml]"]
    assert "UVC --budget default 0.5" in lines[at + 1]  # the citing comment
    assert any("--epochs = 5  [recipes/base.yaml]" in line for line in lines)


def test_uvc_set_flops_target_reaches_the_search(capsys, tiny_teacher_path, tmp_path):
    """Also the suite's end-to-end run of the uvc recipe with its search (what tests/test_uvc.py checked on a run of
    its own): a physically sliced per-block student at the target, its plan, and an ONNX file that passed parity."""
    from vitshrink.io import load_model
    from vitshrink.measure import count_flops

    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text("bench_batch_sizes: [1]\nsearch_batch_size: 32\n")
    code, _, err = run_cli(capsys, "distill", tiny_teacher_path, "--recipe", "uvc", "--set", "flops_target=0.3",
                           "--search-steps", "4", "--steps-per-epoch", "2", "-b", "32", "--epochs", "1", "-j", "0",
                           "--device", "cpu", "--no-progress", "-c", config, "--out", out)
    assert code == 0, err[-3000:]
    student, teacher = load_model(out / "student.safetensors"), load_model(tiny_teacher_path)
    assert type(student).__name__ == "BlockwiseVisionTransformer"
    ratio = count_flops(student).macs / count_flops(teacher).macs
    assert abs(ratio - 0.3) <= 0.02 and ratio <= 0.3 + 1e-9
    plan = json.loads((out / "uvc_plan.json").read_text())
    assert plan["flops_target"] == 0.3 and 0.28 <= plan["flops_ratio"] <= 0.3
    assert json.loads((out / "report.json").read_text())["onnx"]["passed"]
    args = yaml.safe_load((out / "args.yaml").read_text())
    assert args["config"]["flops_target"] == 0.3 and args["sources"]["flops_target"] == "--set"
    assert args["sources"]["search_steps"] == "flag" and args["config"]["search_steps"] == 4
    assert args["sources"]["bench_batch_sizes"] == f"--config {config}"
    assert args["sources"]["lr"] == "base" and args["sources"]["kd_weight"] == "preset"
