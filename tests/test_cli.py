"""The command line on real data: every spine command, and one-line errors with exit code 2."""
from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import pytest
import torch

from cli_support import assert_one_line_error, run_cli
from vitshrink.data import BUNDLED_VAL
from vitshrink.io import create_model, save_model

ROOT = Path(__file__).resolve().parents[1]




@pytest.fixture(scope="module")
def tiny_vit_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=48, depth=2,
                         num_heads=3, num_classes=10)
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    save_model(model, path, class_names=[f"c{i}" for i in range(10)])
    return path




def test_readme_starts_with_the_two_setup_commands_and_ci_runs_them():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert block and readme.index("```bash") < 40, "README must open with the set-up commands"
    commands = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(commands) == 2
    assert "vitshrink distill" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = commands[1].split("&&")[-1].strip()
    assert test_command in ci
    for install in re.findall(r"pip install [^&]+", " ".join(commands)):
        assert install.strip() in ci


def test_inspect_reports_macs_and_flops(capsys, tiny_vit_file):
    code, out, err = run_cli(capsys, "inspect", str(tiny_vit_file))
    assert code == 0, err
    assert "GMACs" in out and "GFLOPs" in out
    assert "4x4" in out  # patch size
    assert "48" in out  # embed dim


def test_evaluate_on_bundled_test_set_shows_progress(capsys, tiny_vit_file):
    code, out, err = run_cli(capsys, "evaluate", str(tiny_vit_file), "-j", "0")
    assert code == 0, err
    top1 = float(re.search(r"top-1 ([0-9.]+)", out).group(1))
    assert 0.0 <= top1 <= 1.0
    assert "1000 images" in out
    assert "evaluate" in err  # the rich progress bar is drawn on stderr


def test_evaluate_skips_and_counts_unreadable_images(capsys, tiny_vit_file, tmp_path):
    with tarfile.open(BUNDLED_VAL) as tar:
        members = [m for m in tar.getmembers() if m.isfile()][:20]
        tar.extractall(tmp_path, members=members, filter="data")
    folder = next(p.parent for p in tmp_path.rglob("*.jpg")).parent
    (folder / "airplane" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "airplane" / "empty.jpg").write_bytes(b"")
    code, out, err = run_cli(capsys, "evaluate", str(tiny_vit_file), "--data", str(folder), "-j", "0")
    assert code == 0, err
    assert "20 images" in out and "2 unreadable skipped" in out


def test_export_checks_parity_on_real_images(capsys, tiny_vit_file, tmp_path):
    onnx_path = tmp_path / "tiny.onnx"
    code, out, err = run_cli(capsys, "export", str(tiny_vit_file), "-o", str(onnx_path))
    assert code == 0, err
    assert onnx_path.exists()
    diff = float(re.search(r"max \|logit diff\| ([0-9.e+-]+)", out).group(1))
    assert diff <= 1e-4
    assert "100%" in out


def test_benchmark_json_with_baseline(capsys, tiny_vit_file, tmp_path):
    out_json = tmp_path / "bench.json"
    code, out, err = run_cli(capsys, "benchmark", str(tiny_vit_file), "--baseline", "vit_tiny_patch16_224",
                             "--img-size", "32", "--batch-sizes", "1,4", "--threads", "1", "--min-time", "0.2", "--json", str(out_json))
    assert code == 0, err
    result = json.loads(out_json.read_text())
    assert set(result) == {"model", "baseline", "ratios"}
    assert result["ratios"]["macs_ratio"] < 1.0
    assert result["ratios"]["runtimes"]["onnxruntime"]["1"]["speedup_p50"] > 0  # the tiny model is smaller than vit_tiny at the same size


# --- bad input: one line, exit code 2 ---------------------------------------------------------------


def test_missing_file(capsys):
    code, _, err = run_cli(capsys, "inspect", "no_such_model.safetensors")
    assert_one_line_error(code, err, "no_such_model.safetensors")


def test_not_a_checkpoint(capsys, tmp_path):
    bogus = tmp_path / "weights.pt"
    bogus.write_bytes(b"this is not a checkpoint at all")
    code, _, err = run_cli(capsys, "inspect", str(bogus), "--arch", "vit_tiny_patch16_224")
    assert_one_line_error(code, err, "weights.pt")


def test_truncated_safetensors(capsys, tmp_path, tiny_vit_file):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_vit_file.read_bytes()[:5000])
    code, _, err = run_cli(capsys, "inspect", str(cut))
    assert_one_line_error(code, err, "cut.safetensors")


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_pickle_that_needs_code_execution_is_refused(capsys, tmp_path):
    marker = tmp_path / "marker.txt"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Exploit(marker)}, evil)
    code, _, err = run_cli(capsys, "inspect", str(evil), "--arch", "vit_tiny_patch16_224")
    assert_one_line_error(code, err, "evil.pth")
    assert not marker.exists()


def test_unknown_timm_name_suggests_close_names(capsys):
    code, _, err = run_cli(capsys, "inspect", "deit_tiny_patch16_24")
    assert_one_line_error(code, err, "deit_tiny_patch16_24", "deit_tiny_patch16_224")


def test_shape_mismatch_names_tensor_and_shapes(capsys, tmp_path):
    from safetensors.torch import save_file

    model = create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3,
                         num_classes=10)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(100, 48)
    path = tmp_path / "foreign.safetensors"
    save_file(state, str(path))
    code, _, err = run_cli(capsys, "inspect", str(path), "--arch", "vit_tiny_patch16_224", "--num-heads", "3")
    assert_one_line_error(code, err, "foreign.safetensors", "blocks.1.mlp.fc1")


def test_data_path_without_images(capsys, tmp_path, tiny_vit_file):
    empty = tmp_path / "empty_data"
    (empty / "some_class").mkdir(parents=True)
    (empty / "some_class" / "notes.txt").write_text("no images here")
    code, _, err = run_cli(capsys, "evaluate", str(tiny_vit_file), "--data", str(empty))
    assert_one_line_error(code, err, "empty_data")
