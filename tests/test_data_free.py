"""`vitshrink distill --data-free`: synthesises into OUT/synthetic, trains on it, and the report says that no real
training image was seen and (without --val-data) that no accuracy was measured; bad combinations exit 2."""
from __future__ import annotations

import json

import pytest
import torch

from cli_support import assert_one_line_error, run_cli
from conftest import CIFAR_TEST_1K
from vitshrink.io import create_model, save_model

torch.set_num_threads(1)
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FAST = ["--epochs", "1", "-b", "5", "--synth-num", "10", "--synth-iterations", "3", "--synth-batch-size", "10",
        "--bench-batch-sizes", "[1]", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                         num_classes=10)
    path = tmp_path_factory.mktemp("teacher") / "tiny.safetensors"
    save_model(model, path, class_names=CIFAR_CLASSES)
    return path


def test_data_free_without_val_data_reports_no_real_image_and_no_accuracy(capsys, tmp_path, tiny_teacher):
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "distill", str(tiny_teacher), "--data-free", "--out", str(out), *FAST)
    assert code == 0, err
    pngs = sorted((out / "synthetic").rglob("*.png"))
    assert len(pngs) == 10 and (out / "synthetic" / "manifest.csv").is_file()
    assert {p.parent.name for p in pngs} == set(CIFAR_CLASSES)  # balanced: one per class
    report = json.loads((out / "report.json").read_text())
    assert report["data_free"]["real_training_images"] == 0 and report["data_free"]["images"] == 10
    assert report["data_free"]["accuracy_measured"] is False
    assert report["student"]["top1"] is None and report["teacher"]["top1"] is None
    md = (out / "report.md").read_text()
    assert "saw no real training image" in md and "No accuracy was measured" in md
    assert "bundled" not in report["data"]  # no silent fall-back to the bundled images
    assert (out / "student.onnx").is_file() and report["onnx"]["passed"]
    args = (out / "args.yaml").read_text()
    assert "data_free: true" in args and "synth_num: 10" in args


def test_data_free_with_val_data_measures_accuracy(tmp_path, tiny_teacher):
    from vitshrink.io import load_model
    from vitshrink.pipeline import distill

    if not CIFAR_TEST_1K.exists():
        pytest.skip(f"{CIFAR_TEST_1K} not present")
    result = distill(load_model(tiny_teacher), "vanilla", data_free=True, synth_num=10, val_data=CIFAR_TEST_1K,
                     out_dir=tmp_path / "run", epochs=1, batch_size=5, workers=0, progress=False,
                     options={"synth_iterations": 3, "synth_batch_size": 10, "bench_batch_sizes": [1]})
    assert result.report["data_free"]["accuracy_measured"] is True
    assert 0.0 <= result.report["student"]["top1"] <= 1.0 and result.report["teacher"]["top1"] is not None
    assert "No accuracy was measured" not in (result.out_dir / "report.md").read_text()
    assert "saw no real training image" in (result.out_dir / "report.md").read_text()


def test_data_free_with_data_is_one_line_error(capsys, tmp_path, tiny_teacher):
    (tmp_path / "data").mkdir()  # beside --out: an --out inside --data is refused first (issue 21)
    code, _, err = run_cli(capsys, "distill", str(tiny_teacher), "--data-free", "--data", str(tmp_path / "data"),
                           "--out", str(tmp_path / "run"), *FAST)
    assert_one_line_error(code, err, "--data-free", "--data")
    code, _, err = run_cli(capsys, "distill", str(tiny_teacher), "--data-free", "--synth-num", "0",
                           "--out", str(tmp_path / "run2"), "--no-progress")
    assert_one_line_error(code, err, "--synth-num")
