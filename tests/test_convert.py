"""`vitshrink convert`: a foreign checkpoint becomes a vitshrink safetensors that every later command loads with
no flags; the head count is checked on labelled data; `--key-map` and the mismatch suggestion on the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cli_support import assert_one_line_error, run_cli
from conftest import CIFAR_TEST_1K, REPO
from vitshrink.errors import UserError
from vitshrink.io import load_model, record_of

BUNDLED = REPO / "vitshrink" / "assets" / "teacher_vit_cifar10.safetensors"
pytestmark = pytest.mark.skipif(not CIFAR_TEST_1K.exists(), reason="shared CIFAR-10 test_1k not present")
# The bundled teacher was trained with ImageNet mean/std and 6 heads; vit_tiny's timm default is 3 heads.
NORM = ["--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]


def _as_foreign(source: Path, target: Path) -> Path:
    """A trained vitshrink model as a user's hand-written checkpoint: plain state dict, Sequential MLPs."""
    state = {k.replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.2."): v
             for k, v in load_model(source).state_dict().items()}
    torch.save({"model": state, "epoch": 24}, target)
    return target


@pytest.fixture(scope="module")
def foreign_teacher(tmp_path_factory) -> Path:
    return _as_foreign(BUNDLED, tmp_path_factory.mktemp("foreign") / "my_vit.pth")


def test_convert_decides_the_head_count_on_labelled_images(capsys, foreign_teacher, tmp_path):
    # vit_tiny's timm default is 3 heads; the images decide 6 (the table shows 3 scoring lower).
    out = tmp_path / "converted.safetensors"
    code, _, err = run_cli(capsys, "convert", str(foreign_teacher), "-o", str(out), "--arch", "vit_tiny_patch16_224",
                           "--data", str(CIFAR_TEST_1K), *NORM)
    assert code == 0, err
    rows = [(line[2:].split(",")[0], float(line.split("top-1 ")[1].split()[0]))
            for line in err.splitlines() if "  ->  top-1" in line and " on 256 images" in line]
    assert any(line.startswith("* num_heads=6") for line in err.splitlines())
    best_other = max(top1 for heads, top1 in rows if heads != "num_heads=6")
    assert best_other < max(top1 for heads, top1 in rows if heads == "num_heads=6") - 0.05
    assert record_of(load_model(out)).kwargs["num_heads"] == 6


def test_convert_round_trip_then_inspect_evaluate_distill_with_no_flags(capsys, tiny_teacher_path, tmp_path):
    # The small teacher the distillation tests train (4 blocks of width 48, 3 heads, CIFAR-10 mean/std).
    foreign = _as_foreign(tiny_teacher_path, tmp_path / "small_vit.pth")
    out = tmp_path / "converted.safetensors"
    code, stdout, err = run_cli(capsys, "convert", str(foreign), "-o", str(out), "--arch", "vit_tiny_patch16_224",
                                "--num-heads", "3", "--data", str(CIFAR_TEST_1K),
                                "--mean", "0.4914,0.4822,0.4465", "--std", "0.2470,0.2435,0.2616")
    assert code == 0, err
    assert "Sequential MLP" in err and "wrote" in stdout and "(limit 1e-4)" in stdout
    top1 = float(stdout.split("top-1 ")[1].split()[0])
    assert top1 > 0.25  # 2 epochs on 5k images: well above chance (0.1)
    record = record_of(load_model(out))
    assert record.kwargs["num_heads"] == 3 and record.class_names[0] == "airplane"
    assert record.data["mean"] == (0.4914, 0.4822, 0.4465)

    code, stdout, err = run_cli(capsys, "inspect", str(out))
    assert code == 0 and "note:" not in err and "airplane" in stdout
    code, stdout, err = run_cli(capsys, "evaluate", str(out), "--data", str(CIFAR_TEST_1K), "--device", "cpu",
                                "-j", "0")
    assert code == 0, err
    assert abs(float(stdout.split("top-1 ")[1].split()[0]) - top1) < 0.05
    run = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "distill", str(out), "--out", str(run), "--data", str(CIFAR_TEST_1K),
                                "--epochs", "1", "-b", "32", "--steps-per-epoch", "2", "-j", "0", "--device", "cpu",
                                "--no-progress")
    assert code == 0, err
    report = json.loads((run / "report.json").read_text())
    assert report["onnx"]["passed"] and report["student"]["params"] < report["teacher"]["params"]


def test_cli_mismatch_suggests_a_key_map_and_debug_lists_every_unmatched_key(capsys, tmp_path):
    state = {k.replace("mlp.fc1.", "mlp.lin_in."): v for k, v in load_model(BUNDLED).state_dict().items()}
    path = tmp_path / "odd.safetensors"
    save_file(state, str(path))
    code, _, err = run_cli(capsys, "inspect", str(path), "--arch", "vit_tiny_patch16_224")
    assert_one_line_error(code, err, "odd.safetensors", "looks like blocks.", r"try --key-map 'mlp\.lin_in\.=mlp.fc1.'",
                          "(12 of 12 unmatched tensors would match)")
    with pytest.raises(UserError):  # --debug re-raises for the traceback, after printing the details
        run_cli(capsys, "--debug", "inspect", str(path), "--arch", "vit_tiny_patch16_224")
    err = capsys.readouterr().err
    assert "tensors in the file that the model lacks:" in err and "blocks.5.mlp.lin_in.bias (768,)" in err
    assert "blocks.5.mlp.fc1.weight (768, 192)" in err
    code, stdout, err = run_cli(capsys, "inspect", str(path), "--arch", "vit_tiny_patch16_224", "--num-heads", "6",
                                "--key-map", r"mlp\.lin_in\.=mlp.fc1.")
    assert code == 0, err
    assert "per block" not in stdout and "parameters" in stdout
