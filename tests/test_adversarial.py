"""Hostile input, one test per class of defect (issue 13): each crafts its bad input and checks that the CLI
answers with exit 2 and one line (or the correct result), no traceback, and touches nothing outside --out."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_support import assert_one_line_error, run_cli
from hf_support import tiny_hf_vit_state
from vitshrink.io import create_model, save_model






def tree_digest(root: Path) -> dict[str, str]:
    """Every file (and link) under ``root`` with a hash of its content: proof that nothing changed."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = "link:" + os.readlink(path)
            elif path.is_file():
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[rel] = "dir"
    return found


def tiny_vit(num_classes: int = 3, img_size: int = 16, in_chans: int = 3):
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", img_size=img_size, patch_size=8, embed_dim=16, depth=2,
                         num_heads=2, mlp_ratio=2.0, num_classes=num_classes, in_chans=in_chans)
    return model.eval()


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    save_model(tiny_vit(), path, class_names=["cat", "dog", "fish"])
    return path


def write_images(folder: Path, n: int, size: int = 16, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture()
def pool(tmp_path) -> Path:
    root = tmp_path / "pool"
    write_images(root / "a", 4)
    write_images(root / "b", 4, seed=1)
    return root


def select(capsys, vit_file: Path, pool: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(capsys, "select-wild", "--teacher", str(vit_file), "--pool", str(pool), "--out", str(out),
                   "--num", "4", "--criterion", "confidence", "-j", "0", "--device", "cpu", *extra)


# --- paths read back from files never leave their folder ----------------------------------------------
@pytest.mark.parametrize("class_dirs", [["../victim"], ["/abs/victim"], [".."], ["."], "victim", [7]])
def test_select_wild_never_deletes_outside_out(capsys, vit_file, pool, tmp_path, class_dirs):
    out = tmp_path / "out"
    code, _, err = select(capsys, vit_file, pool, out)
    assert code == 0, err
    victim = tmp_path / "victim"  # a folder beside --out
    write_images(victim, 2)
    (victim / "notes.txt").write_text("precious")
    before = tree_digest(tmp_path / "victim"), tree_digest(pool)
    summary = json.loads((out / "selection.json").read_text())
    summary["class_dirs"] = class_dirs
    (out / "selection.json").write_text(json.dumps(summary))
    code, _, err = select(capsys, vit_file, pool, out)
    assert_one_line_error(code, err, "selection.json")
    assert (tree_digest(tmp_path / "victim"), tree_digest(pool)) == before


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_select_wild_refuses_an_unreadable_selection_record(capsys, vit_file, pool, tmp_path, text):
    out = tmp_path / "out"
    assert select(capsys, vit_file, pool, out)[0] == 0
    (out / "selection.json").write_text(text)
    before = tree_digest(tmp_path)
    code, _, err = select(capsys, vit_file, pool, out)
    assert_one_line_error(code, err, "selection.json")
    assert tree_digest(tmp_path) == before  # refused before any work: the class folders are kept


def test_select_wild_scores_csv_paths_stay_in_the_pool(capsys, vit_file, pool, tmp_path):
    out = tmp_path / "out"
    assert select(capsys, vit_file, pool, out)[0] == 0
    secret = tmp_path / "secret.png"
    write_images(tmp_path / "s", 1)[0].rename(secret)
    scores = (out / "scores.csv").read_text().splitlines()
    first = scores[1].split(",")
    first[0] = "../secret.png"
    (out / "scores.csv").write_text("\n".join([scores[0], ",".join(first), *scores[2:]]) + "\n")
    code, _, err = select(capsys, vit_file, pool, out)
    assert_one_line_error(code, err, "scores.csv", "../secret.png")
    assert not any("secret" in p.name for p in out.rglob("*"))


def test_select_wild_symlinks_each_real_image_once_and_never_out_of_the_pool(capsys, vit_file, pool, tmp_path):
    outside = tmp_path / "outside"
    write_images(outside, 3, seed=5)
    (pool / "a" / "loop").symlink_to(pool)  # a loop back to the pool root
    (pool / "b" / "again.png").symlink_to(pool / "a" / "img000.png")  # a second name of one file
    (pool / "escape").symlink_to(outside)  # a folder outside the pool
    (pool / "b" / "escape.png").symlink_to(outside / "img000.png")
    out = tmp_path / "out"
    code, _, err = select(capsys, vit_file, pool, out, "--mode", "list")
    assert code == 0, err
    rows = (out / "scores.csv").read_text().splitlines()[1:]
    assert len(rows) == 8  # the 8 real images, each once
    assert not any("escape" in row or "loop" in row or "again" in row for row in rows)
    assert "outside the pool" in err and "duplicate" in err


def test_select_wild_refuses_out_equal_to_or_above_the_pool(capsys, vit_file, pool, tmp_path):
    before = tree_digest(tmp_path)
    for out in (pool, tmp_path, pool / "a" / ".."):
        code, _, err = select(capsys, vit_file, pool, out)
        assert_one_line_error(code, err, "--out", "--pool")
    assert tree_digest(tmp_path) == before


def test_select_wild_never_scores_its_own_output(capsys, vit_file, pool, tmp_path):
    inside = pool / "selected"
    assert select(capsys, vit_file, pool, inside)[0] == 0
    # A second selection, to another folder inside the pool: the first selection's copies are not scored.
    code, _, err = select(capsys, vit_file, pool, pool / "second")
    assert code == 0, err
    rows = (pool / "second" / "scores.csv").read_text().splitlines()[1:]
    assert len(rows) == 8 and not any(row.startswith("selected/") for row in rows)


# --- tar and image reading ----------------------------------------------------------------------------
def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def bomb_png() -> bytes:
    """A PNG header claiming 30000 x 30000 pixels (900 M, over PIL's bomb limit) with no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def two_class_vit(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "two.safetensors"
    save_model(tiny_vit(num_classes=2), path, class_names=["cat", "dog"])
    return path


def test_unsafe_tar_member_names_are_skipped_and_counted(capsys, two_class_vit, tmp_path):
    from vitshrink.data import resolve_data

    rng = np.random.default_rng(0)
    tar_path = tmp_path / "evil.tar"
    unsafe = ["../../x/y.png", "/abs/y.png", "root.png", "aaa/../../z.png"]
    with tarfile.open(tar_path, "w") as tar:
        for name in ["cat/a.png", "cat/b.png", "dog/c.png", "dog/d.png", *unsafe]:
            add_member(tar, name, png_bytes(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    data = resolve_data(tar_path, val_split=0.5)
    assert data.class_names == ["cat", "dog"]  # no class from an unsafe name, labels not shifted
    assert sorted(data.train.targets + data.val.targets) == [0, 0, 1, 1]
    assert "4 tar member(s) with unsafe names" in data.note
    code, out, err = run_cli(capsys, "evaluate", str(two_class_vit), "--data", str(tar_path), "-j", "0")
    assert code == 0, err
    assert "4 images, 4 unreadable skipped" in " ".join(out.split())


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    from vitshrink.data.folders import ImageSplit, _open_reader

    values = (np.arange(256, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535
    (tmp_path / "data" / "grey").mkdir(parents=True)
    Image.fromarray(values).save(tmp_path / "data" / "grey" / "wide.png")
    assert Image.open(tmp_path / "data" / "grey" / "wide.png").mode.startswith("I")
    img, target = ImageSplit(_open_reader(tmp_path / "data"), img_mode="L")[0]
    assert np.array_equal(np.asarray(img), np.arange(256, dtype=np.uint8).reshape(16, 16))  # v / 257 exactly
    rgb, _ = ImageSplit(_open_reader(tmp_path / "data"), img_mode="RGB")[0]
    assert np.asarray(rgb)[15, 15].tolist() == [255, 255, 255] and np.asarray(rgb)[0, 0].tolist() == [0, 0, 0]


def test_decompression_bombs_are_skipped_and_counted(capsys, two_class_vit, vit_file, tmp_path):
    data = tmp_path / "data"
    write_images(data / "cat", 3)
    write_images(data / "dog", 3, seed=1)
    (data / "cat" / "bomb.png").write_bytes(bomb_png())
    code, out, err = run_cli(capsys, "evaluate", str(two_class_vit), "--data", str(data), "-j", "0")
    assert code == 0, err
    assert "6 images, 1 unreadable skipped" in " ".join(out.split())
    pool = tmp_path / "pool"
    write_images(pool, 3)
    (pool / "bomb.png").write_bytes(bomb_png())
    code, out, err = select(capsys, vit_file, pool, tmp_path / "out", "--mode", "list")
    assert code == 0, err
    assert "too large (decompression bomb)" in " ".join(out.split())
    with tarfile.open(tmp_path / "bomb.tar", "w") as tar:
        for name, path in [("cat/a.png", data / "cat" / "img000.png"), ("dog/b.png", data / "dog" / "img000.png")]:
            add_member(tar, name, path.read_bytes())
        add_member(tar, "dog/bomb.png", bomb_png())
    code, out, err = run_cli(capsys, "evaluate", str(two_class_vit), "--data", str(tmp_path / "bomb.tar"), "-j", "0")
    assert code == 0, err
    assert "2 images, 1 unreadable skipped" in " ".join(out.split())


# --- numeric options: range and finiteness, one line, before any work --------------------------------
BAD_NUMBERS = [
    (["inspect", "{vit}", "--num-heads", "0"], "--num-heads"),
    (["inspect", "{vit}", "--num-heads", "-3"], "--num-heads"),
    (["inspect", "{vit}", "--num-heads", "abc"], "--num-heads"),  # click's usage error, on one line too
    (["distill", "{vit}", "--lr", "fast"], "--lr"),
    (["inspect", "{vit}", "--img-size", "0"], "--img-size"),
    (["inspect", "{vit}", "--img-size", "100000000"], "--img-size"),
    (["inspect", "{vit}", "--in-chans", "0"], "--in-chans"),
    (["inspect", "{vit}", "--num-classes", "-1"], "--num-classes"),
    (["evaluate", "{vit}", "--mean", "nan"], "--mean"),
    (["evaluate", "{vit}", "--mean", "0.5,x"], "--mean"),
    (["evaluate", "{vit}", "--std", "0"], "--std"),
    (["evaluate", "{vit}", "--std", "-1,1,1"], "--std"),
    (["evaluate", "{vit}", "--std", "inf"], "--std"),
    (["evaluate", "{vit}", "-b", "0"], "--batch-size"),
    (["evaluate", "{vit}", "-j", "-1"], "--workers"),
    (["benchmark", "{vit}", "--batch-sizes", "0"], "--batch-sizes"),
    (["benchmark", "{vit}", "--batch-sizes", "1,x"], "--batch-sizes"),
    (["benchmark", "{vit}", "--threads", "0"], "--threads"),
    (["benchmark", "{vit}", "--min-time", "nan"], "--min-time"),
    (["benchmark", "{vit}", "--min-time", "-1"], "--min-time"),
    (["select-wild", "--teacher", "{vit}", "--pool", "{pool}", "--num", "0"], "--num"),
    (["select-wild", "--teacher", "{vit}", "--pool", "{pool}", "--fraction", "nan"], "--fraction"),
    (["select-wild", "--teacher", "{vit}", "--pool", "{pool}", "--num", "2", "-b", "0"], "--batch-size"),
    (["select-wild", "--teacher", "{vit}", "--pool", "{pool}", "--num", "2", "-j", "-2"], "--workers"),
    (["distill", "{vit}", "--lr", "nan"], "--lr"),
    (["distill", "{vit}", "--lr", "0"], "--lr"),
    (["distill", "{vit}", "--seed", "-1"], "--seed"),
    (["distill", "{vit}", "--epochs", "0"], "--epochs"),
    (["distill", "{vit}", "-b", "0"], "--batch-size"),
    (["distill", "{vit}", "-j", "-1"], "--workers"),
    (["distill", "{vit}", "--val-split", "1"], "--val-split"),
    (["distill", "{vit}", "--flops-target", "0"], "--flops-target"),
    (["distill", "{vit}", "--clip-grad", "-1"], "--clip-grad"),
    (["distill", "{vit}", "--smoothing", "1.5"], "--smoothing"),
    (["distill", "{vit}", "--smoothing", "nan"], "--smoothing"),
    (["distill", "{vit}", "--steps-per-epoch", "-3"], "--steps-per-epoch"),
    (["distill", "{vit}", "--warmup-epochs", "-1"], "--warmup-epochs"),
    (["distill", "{vit}", "--weight-decay", "inf"], "--weight-decay"),
    (["distill", "{vit}", "--set", "lr=abc"], "lr"),
    (["distill", "{vit}", "--set", "eval_batch_size=0"], "eval_batch_size"),
    (["distill", "{vit}", "--set", "aug_scale=[0.9,0.1]"], "aug_scale"),
    (["distill", "{vit}", "--set", "warmup_lr=.nan"], "warmup_lr"),
]


@pytest.mark.parametrize("args,flag", BAD_NUMBERS, ids=[" ".join(a[2:] if a[1] == "{vit}" else a[5:])
                                                          for a, _ in BAD_NUMBERS])
def test_out_of_range_numbers_are_one_line_errors(capsys, vit_file, pool, tmp_path, args, flag):
    args = [a.format(vit=vit_file, pool=pool) for a in args]
    if args[0] == "distill":
        args += ["--out", str(tmp_path / "run")]
    if args[0] == "select-wild":
        args += ["--out", str(tmp_path / "sel")]
    before = tree_digest(tmp_path)
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, flag)
    after = tree_digest(tmp_path)
    assert {k: v for k, v in after.items() if k not in ("run", "sel")} == before  # at most an empty --out


# --- non-finite weights and outputs -------------------------------------------------------------------
@pytest.fixture(scope="module")
def nan_vit_file(tmp_path_factory) -> Path:
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[0, 0] = float("nan")
    path = tmp_path_factory.mktemp("models") / "nan.safetensors"
    save_model(model, path, class_names=["cat", "dog", "fish"])
    return path


@pytest.mark.parametrize("command", ["evaluate", "export", "benchmark", "distill", "select-wild"])
def test_nan_weights_are_refused(capsys, nan_vit_file, pool, tmp_path, command):
    args = {"evaluate": ["evaluate", str(nan_vit_file), "--data", str(pool)],
            "export": ["export", str(nan_vit_file), "--data", str(pool), "-o", str(tmp_path / "m.onnx")],
            "benchmark": ["benchmark", str(nan_vit_file), "--min-time", "0"],
            "distill": ["distill", str(nan_vit_file), "--data", str(pool), "--out", str(tmp_path / "run")],
            "select-wild": ["select-wild", "--teacher", str(nan_vit_file), "--pool", str(pool), "--num", "2",
                            "--out", str(tmp_path / "sel")]}[command]
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "blocks.1.mlp.fc1.weight", "NaN")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("command", ["evaluate", "export", "select-wild"])
def test_nan_outputs_are_refused(capsys, vit_file, pool, tmp_path, command):
    # Finite weights, but a std so small that normalised pixels overflow to inf: the logits are NaN.
    broken = ["--std", "1e-39"]
    args = {"evaluate": ["evaluate", str(vit_file), "--data", str(pool), "-j", "0", *broken],
            "export": ["export", str(vit_file), "--data", str(pool), "-o", str(tmp_path / "m.onnx"), *broken],
            "select-wild": ["select-wild", "--teacher", str(vit_file), "--pool", str(pool), "--num", "2", "-j", "0",
                            "--out", str(tmp_path / "sel"), *broken]}[command]
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "NaN")
    assert not (tmp_path / "m.onnx").exists()


# --- output locations ---------------------------------------------------------------------------------
def test_output_that_is_a_file_or_under_a_file_is_one_line(capsys, vit_file, pool, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    cases = [
        (["distill", str(vit_file), "--data", str(pool), "--out", str(a_file)], "--out", a_file),
        (["distill", str(vit_file), "--data", str(pool), "--out", str(a_file / "sub")], "--out", a_file),
        (["select-wild", "--teacher", str(vit_file), "--pool", str(pool), "--num", "2", "--out", str(a_file)], "--out",
         a_file),
        (["export", str(vit_file), "-o", str(a_file / "m.onnx")], "--output", a_file),
        (["export", str(vit_file), "-o", str(tmp_path)], "--output", tmp_path),
        (["inspect", str(vit_file), "--json", str(a_file / "x.json")], "--json", a_file),
        (["benchmark", str(vit_file), "--json", str(tmp_path)], "--json", tmp_path),
    ]
    before = tree_digest(tmp_path)
    for args, flag, named in cases:
        code, out, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, flag, str(named))
        assert out == ""  # refused before any work or output
    assert tree_digest(tmp_path) == before


def test_a_full_output_location_is_one_line_and_leaves_no_file(capsys, vit_file, tmp_path):
    """A file-size limit (RLIMIT_FSIZE, like a full disk) while writing the ONNX file: exit 2, no partial file."""
    import resource
    import signal

    target = tmp_path / "out" / "m.onnx"
    (tmp_path / "out").mkdir()
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, old_limit[1]))
    try:
        code, _, err = run_cli(capsys, "export", str(vit_file), "-o", str(target))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert_one_line_error(code, err, str(target), "File too large")
    assert list((tmp_path / "out").iterdir()) == []


# --- benchmark on files that are not ONNX image classifiers ------------------------------------------
def test_benchmark_refuses_files_that_are_not_onnx_image_models(capsys, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07definitely not protobuf" * 10)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")

    def identity_model(path: Path, elem_type: int, shape: list) -> Path:
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", elem_type, shape)],
                                  [helper.make_tensor_value_info("y", elem_type, shape)])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        return path

    table = identity_model(tmp_path / "table.onnx", TensorProto.FLOAT, [1, 10])  # a rank-2 input
    tokens = identity_model(tmp_path / "tokens.onnx", TensorProto.INT64, [1, 3, 16, 16])  # not float
    for path, needle in [(garbage, "not a valid ONNX model"), (empty, "ONNX"), (table, "image tensor"),
                         (tokens, "image tensor"), (tmp_path / "missing.onnx", "not found")]:
        code, _, err = run_cli(capsys, "benchmark", str(path), "--min-time", "0")
        assert_one_line_error(code, err, path.name, needle)


# --- the last resort: an unexpected failure is one line naming the command, exit 1 --------------------
def test_unexpected_exception_is_one_line_with_debug_for_the_traceback(capsys, vit_file, monkeypatch):
    import vitshrink.inspection

    def broken(model):  # a bug inside the library, after the input was accepted
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(vitshrink.inspection, "describe", broken)
    code, _, err = run_cli(capsys, "inspect", str(vit_file))
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("error: vitshrink inspect failed: ZeroDivisionError: division by zero second line")
    assert "--debug" in lines[0]
    with pytest.raises(ZeroDivisionError):  # --debug: the real exception and its traceback
        run_cli(capsys, "--debug", "inspect", str(vit_file))


# --- every output file has ordinary permissions -------------------------------------------------------
def test_saved_models_get_the_same_permissions_as_other_outputs(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    save_model(tiny_vit(), tmp_path / "student.safetensors")
    assert (tmp_path / "student.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


# --- a validation set whose first images are unreadable ----------------------------------------------
def test_export_sample_skips_unreadable_first_images(capsys, two_class_vit, tmp_path):
    data = tmp_path / "data"
    for cls, seed in (("cat", 0), ("dog", 1)):
        write_images(data / cls, 3, seed=seed)
        for i in range(10):  # sorted before the good ones: every first image of every class is broken
            (data / cls / f"aa{i}.png").write_bytes(b"not a png")
    code, out, err = run_cli(capsys, "export", str(two_class_vit), "--data", str(data), "-o", str(tmp_path / "m.onnx"))
    assert code == 0, err
    assert "on 6 real images" in " ".join(out.split())
    (tmp_path / "m.onnx").unlink()
    for path in (data / "dog").glob("img*.png"):
        path.unlink()
    for path in list((data / "cat").glob("img*.png"))[1:]:
        path.unlink()
    code, _, err = run_cli(capsys, "export", str(two_class_vit), "--data", str(data), "-o", str(tmp_path / "m.onnx"))
    assert_one_line_error(code, err, "fewer than 2 readable images")
    assert not (tmp_path / "m.onnx").exists()


# --- numbers read back from files (compare's report.json and benchmark files) -------------------------
def _report(**student) -> dict:
    model = {"top1": 0.9, "params": 1000, "gmacs": 0.01, "ort_p50_ms": {"1": 1.0}}
    return {"recipe": "vanilla", "distill_seconds": 1.0, "teacher": model, "student": {**model, **student},
            "ratios": {"ort_speedup": {"1": 1.5}}}


@pytest.mark.parametrize("student,needle", [({"top1": float("nan")}, "top1"), ({"top1": "abc"}, "top1"),
                                            ({"params": -1}, "params"), ({"ort_p50_ms": {"0": 1.0}}, "batch size"),
                                            ({"gmacs": float("inf")}, "gmacs")])
def test_compare_checks_every_number_it_reads(capsys, tmp_path, student, needle):
    for name, report in (("good", _report()), ("bad", _report(**student))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(report))
    code, _, err = run_cli(capsys, "compare", str(tmp_path / "good"), str(tmp_path / "bad"))
    assert_one_line_error(code, err, str(tmp_path / "bad" / "report.json"), needle)
    code, out, err = run_cli(capsys, "compare", str(tmp_path / "good"), str(tmp_path / "good"))
    assert code == 0, err


# --- synthesize: class names come from a record the user can edit -------------------------------------
def test_synthesize_never_writes_outside_out_for_crafted_class_names(capsys, tmp_path):
    model_path = tmp_path / "evil_names.safetensors"
    save_model(tiny_vit(num_classes=2), model_path, class_names=["../victim", "zz"])  # sorted, unique: trusted before
    (tmp_path / "victim").mkdir()
    code, _, err = run_cli(capsys, "synthesize", str(model_path), "--num", "2", "--out", str(tmp_path / "out"),
                           "--iterations", "2", "-b", "2", "--device", "cpu")
    assert code == 0, err
    assert list((tmp_path / "victim").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir() and not p.name.startswith(".")) == \
        ["000", "001"]  # index folders instead of the unsafe names
    (tmp_path / "out" / "synthesis.json").write_text("{damaged")
    code, _, err = run_cli(capsys, "synthesize", str(model_path), "--num", "2", "--out", str(tmp_path / "out"),
                           "--iterations", "2", "-b", "2", "--device", "cpu")
    assert_one_line_error(code, err, "synthesis.json")


# --- distill: --resume must continue the same run; the NaN guard keeps only good weights --------------
def _distill(capsys, teacher: Path, data: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(capsys, "distill", str(teacher), "--data", str(data), "--out", str(out), "--epochs", "1",
                   "-b", "8", "-j", "0", "--device", "cpu", "--no-progress", "--checkpoint-steps", "1", *extra)


def assert_error_line(code: int, err: str, *needles: str) -> None:
    """Exit 2, no traceback, exactly one error line (a run may log what it was doing before it stopped)."""
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("labelled")
    write_images(root / "cat", 12, seed=2)
    write_images(root / "dog", 12, seed=3)
    return root


def test_resume_refuses_another_run_and_a_damaged_checkpoint(capsys, two_class_vit, labelled_folder, tmp_path):
    out = tmp_path / "run"
    code, _, err = _distill(capsys, two_class_vit, labelled_folder, out)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())  # issue 21: the report says how the epoch was chosen
    assert report["model_selection"].startswith("last epoch") and report["best_epoch"] == 1
    assert "student from epoch 1: last epoch" in " ".join((out / "report.md").read_text().split())
    other_data = tmp_path / "other"
    write_images(other_data / "cat", 12, seed=5)
    write_images(other_data / "dog", 12, seed=6)
    last = (out / "last.pt").read_bytes()
    for extra, needle in ((["--seed", "1"], "seed (0 in last.pt, 1 now)"), (["-b", "4"], "batch_size"),
                          (["--recipe", "ce"], "recipe ('vanilla' in last.pt, 'ce' now)"),
                          (["--student", "vit_tiny_patch16_224:img_size=16,patch_size=8,embed_dim=16,depth=1,"
                                         "num_heads=2,num_classes=2"], "student ('derived from the teacher'"),
                          (["--mean", "0.1"], "normalisation")):
        code, _, err = _distill(capsys, two_class_vit, labelled_folder, out, "--resume", *extra)
        assert_error_line(code, err, "--resume", needle)
    code, _, err = _distill(capsys, two_class_vit, other_data, out, "--resume")
    assert_error_line(code, err, "data (other images or labels)")
    good = torch.load(out / "last.pt", weights_only=True)  # issue 21: forged fields, one line each
    for field, value, needle in (("arch", "{oops", "field arch"), ("arch", json.dumps({"model": "x", "kwargs": {
            "pretrained": True}}), "kwargs.pretrained"), ("trainable", {"nope": torch.zeros(1)}, "damaged"),
                                 ("optimizer", {"state": 5}, "damaged")):
        torch.save({**good, field: value}, out / "last.pt")
        code, _, err = _distill(capsys, two_class_vit, labelled_folder, out, "--resume")
        assert_error_line(code, err, "last.pt", needle)
    for damaged in (last[: len(last) // 2], b"", b"PK\x03\x04garbage"):
        (out / "last.pt").write_bytes(damaged)
        code, _, err = _distill(capsys, two_class_vit, labelled_folder, out, "--resume")
        assert_error_line(code, err, "last.pt", "damaged")
    assert (out / "last.pt").read_bytes() == damaged  # refused before anything was written


def test_nan_guard_never_checkpoints_diverged_weights(two_class_vit, labelled_folder, tmp_path):
    from vitshrink.errors import UserError
    from vitshrink.io import load_model, model_from_record
    from vitshrink.pipeline import distill
    from vitshrink.train import load_checkpoint

    # The first step runs at warmup_lr (good weights); the next at ~1e30 / 3: weights around 1e30, finite,
    # which the old guard (loss only) checkpointed as "good" and a resume then NaN'd at once.
    with pytest.raises(UserError, match="last good checkpoint kept") as caught:
        distill(load_model(two_class_vit), "vanilla", data=labelled_folder, out_dir=tmp_path, epochs=1, batch_size=8,
                lr=1e30, workers=0, progress=False, device="cpu",
                overrides={"warmup_epochs": 1, "warmup_lr": 1e-6, "clip_grad": None, "checkpoint_steps": 1})
    assert "\n" not in str(caught.value)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["global_step"] == 1
    student = model_from_record(json.loads(state["arch"]))
    student.load_state_dict(state["trainable"])
    with torch.no_grad():
        logits = student.eval()(torch.randn(4, 3, 16, 16))
    assert torch.isfinite(logits).all() and logits.abs().max() < 1e4


def test_a_nan_loss_at_the_first_step_does_not_blame_the_learning_rate(capsys, two_class_vit, labelled_folder,
                                                                      tmp_path):
    code, _, err = _distill(capsys, two_class_vit, labelled_folder, tmp_path / "run", "--std", "1e-39")
    assert_error_line(code, err, "first step", "a lower --lr will not help")


# ======================================================================================================
# Issue 21: a model file is data, never a command; outputs never replace inputs; bounded work.
# Every case: exit 2, one line naming the file or flag, and nothing outside --out changed.
# ======================================================================================================
def forged(source: Path, target: Path, edit) -> Path:
    """A copy of ``source`` whose vitshrink record is edited by ``edit(dict)`` (tensors unchanged)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(source), framework="pt") as handle:
        raw = json.loads(handle.metadata()["vitshrink"])
    edit(raw)
    save_file(load_file(str(source)), str(target), metadata={"vitshrink": json.dumps(raw)})
    return target


@pytest.fixture()
def no_network(monkeypatch):
    """Every outgoing connection attempt is recorded and fails at once."""
    import socket

    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:2] or args[:1])
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def _kwargs(**extra):
    return lambda raw: raw["kwargs"].update(extra)


FORGED_RECORDS = {
    "pretrained": (_kwargs(pretrained=True), "kwargs.pretrained"),
    "url overlay": (_kwargs(pretrained=True, pretrained_cfg_overlay={"url": "http://127.0.0.1:9/w.pth"}),
                    "kwargs.pretrained"),
    "url overlay alone": (_kwargs(pretrained_cfg_overlay={"url": "http://127.0.0.1:9/w.pth"}),
                          "kwargs.pretrained_cfg_overlay"),
    "file overlay": (_kwargs(pretrained_cfg_overlay={"file": "/etc/passwd"}), "kwargs.pretrained_cfg_overlay"),
    "checkpoint_path": (_kwargs(checkpoint_path="/etc/passwd"), "kwargs.checkpoint_path"),
    "hub id cfg": (_kwargs(pretrained_cfg={"hf_hub_id": "timm/vit_tiny_patch16_224.augreg_in21k"}),
                   "kwargs.pretrained_cfg"),
    "cache_dir": (_kwargs(cache_dir="/tmp"), "kwargs.cache_dir"),
    "act_layer path": (_kwargs(act_layer="os.system"), "kwargs.act_layer"),
    "hf-hub model": (lambda raw: raw.update(model="hf-hub:timm/vit_tiny_patch16_224"), "field model"),
    "hub path model": (lambda raw: raw.update(model="timm/vit_tiny_patch16_224"), "field model"),
}


@pytest.mark.parametrize("label", list(FORGED_RECORDS))
def test_a_record_cannot_reach_the_network_or_a_file(capsys, vit_file, tmp_path, no_network, label):
    edit, needle = FORGED_RECORDS[label]
    model = forged(vit_file, tmp_path / "forged.safetensors", edit)
    before = tree_digest(tmp_path)
    code, out, err = run_cli(capsys, "inspect", str(model))
    assert_one_line_error(code, err, "forged.safetensors", needle)
    assert no_network == [] and tree_digest(tmp_path) == before


LOADING_COMMANDS = {
    "evaluate": ["evaluate", "{m}", "--data", "{pool}", "-j", "0"],
    "export": ["export", "{m}", "-o", "{out}/m.onnx"],
    "benchmark": ["benchmark", "{m}", "--min-time", "0"],
    "distill": ["distill", "{m}", "--data", "{pool}", "--out", "{out}", "--epochs", "1", "--device", "cpu"],
    "distill --student": ["distill", "{vit}", "--student", "{m}", "--data", "{data3}", "--out", "{out}",
                          "--device", "cpu", "-b", "2"],
    "select-wild": ["select-wild", "--teacher", "{m}", "--pool", "{pool}", "--num", "2", "--out", "{out}"],
    "synthesize": ["synthesize", "{m}", "--num", "2", "--out", "{out}", "--iterations", "1", "--device", "cpu"],
    "cache-logits": ["cache-logits", "{m}", "--epochs", "1", "--data", "{pool}", "--out", "{out}", "--device", "cpu"],
    "convert": ["convert", "{m}", "-o", "{out}/c.safetensors"],
}


@pytest.fixture(scope="module")
def data3(tmp_path_factory) -> Path:
    """Labelled images of vit_file's three classes."""
    root = tmp_path_factory.mktemp("data3")
    for index, name in enumerate(("cat", "dog", "fish")):
        write_images(root / name, 2, seed=index)
    return root


@pytest.mark.parametrize("command", list(LOADING_COMMANDS))
def test_every_loading_command_refuses_a_record_that_asks_for_the_network(capsys, vit_file, pool, data3, tmp_path,
                                                                          no_network, command):
    model = forged(vit_file, tmp_path / "forged.safetensors",
                   _kwargs(pretrained=True, pretrained_cfg_overlay={"url": "http://127.0.0.1:9/w.pth"}))
    before = tree_digest(tmp_path)
    args = [a.format(m=model, vit=vit_file, pool=pool, out=tmp_path / "out", data3=data3)
            for a in LOADING_COMMANDS[command]]
    code, _, err = run_cli(capsys, *args)
    assert_error_line(code, err, "forged.safetensors", "kwargs.pretrained")  # (after a note on the data split)
    assert no_network == []
    assert {k: v for k, v in tree_digest(tmp_path).items() if not k.startswith("out")} == before


def test_pretrained_timm_names_and_student_specs_never_connect(capsys, vit_file, data3, tmp_path, no_network,
                                                               monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # even a user's opt-in does not make vitshrink download
    code, _, err = run_cli(capsys, "inspect", "vit_tiny_patch16_224", "--pretrained")
    assert_one_line_error(code, err, "vit_tiny_patch16_224", "does not download")
    for student in ("vit_tiny_patch16_224:pretrained=true", "vit_tiny_patch16_224:checkpoint_path=/etc/passwd"):
        code, _, err = run_cli(capsys, "distill", str(vit_file), "--student", student, "--data", str(data3),
                               "--out", str(tmp_path / "run"), "--device", "cpu")
        assert_error_line(code, err, "--student", "not an architecture field")
    code, _, err = run_cli(capsys, "train-teacher", "hf-hub:timm/resnet18.a1_in1k", "--data", str(data3),
                           "--out", str(tmp_path / "teacher"), "--device", "cpu")
    assert_one_line_error(code, err, "hf-hub:timm/resnet18.a1_in1k", "ARCH")
    assert no_network == []
    assert not (tmp_path / "hf").exists() and not (tmp_path / "torch").exists()


def _hf_directory(folder: Path, shard: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 16, "num_hidden_layers": 1,
                                                    "num_attention_heads": 2, "image_size": 16, "patch_size": 8}))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": shard}}))
    return folder


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/abs/outside.safetensors", "sub/../../x.safetensors",
                                   "link.safetensors"])
def test_hf_shard_index_paths_stay_in_the_folder(capsys, tmp_path, shard):
    from safetensors.torch import save_file

    save_file({"a.weight": torch.zeros(2)}, str(tmp_path / "outside.safetensors"))
    folder = _hf_directory(tmp_path / "hf", shard)
    (folder / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    code, _, err = run_cli(capsys, "inspect", str(folder))
    assert_one_line_error(code, err, "model.safetensors.index.json", repr(shard))


# --- outputs never replace inputs ----------------------------------------------------------------------
def test_no_command_writes_over_its_input(capsys, vit_file, pool, tmp_path):
    import shutil

    model = tmp_path / "m.safetensors"
    shutil.copy(vit_file, model)
    run1 = tmp_path / "run1"
    run1.mkdir()
    shutil.copy(vit_file, run1 / "student.safetensors")
    (run1 / "report.json").write_text(json.dumps(_report()))
    data = tmp_path / "data"
    write_images(data / "cat", 2)
    write_images(data / "dog", 2, seed=1)
    cases = [
        (["inspect", model, "--json", model], "--json"),
        (["export", model, "-o", model], "--output"),
        (["export", model, "--data", data, "-o", data / "cat" / "m.onnx"], "--output"),
        (["benchmark", model, "--json", model], "--json"),
        (["convert", model, "-o", model], "--output"),
        (["compare", run1, "--plot", run1 / "report.json"], "--plot"),
        (["distill", run1 / "student.safetensors", "--data", data, "--out", run1], "--out"),
        (["distill", model, "--data", data, "--out", data], "--out"),
        (["distill", model, "--data", data, "--out", data / "cat"], "--out"),
        (["distill", model, "--data", data, "--out", tmp_path], "--out"),
        (["distill", model, "--data", data, "--out", ""], "--out"),
        (["train-teacher", "cifar_resnet20", "--data", data, "--out", data], "--out"),
        (["synthesize", model, "--num", "2", "--out", tmp_path], "--out"),
        (["cache-logits", model, "--epochs", "1", "--data", data, "--out", data], "--out"),
        (["select-wild", "--teacher", run1 / "student.safetensors", "--pool", pool, "--num", "2", "--out", run1],
         "--out"),
    ]
    before = tree_digest(tmp_path)
    for args, flag in cases:
        code, out, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, flag)
        assert tree_digest(tmp_path) == before, args


def test_a_run_folder_is_locked_while_its_run_lives(capsys, vit_file, tmp_path):
    import subprocess

    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".vitshrink.lock"
    other = subprocess.Popen(["sleep", "60"])
    try:
        lock.write_text(f"{other.pid}\n")
        args = ["synthesize", str(vit_file), "--num", "3", "--out", str(out), "--iterations", "1", "-b", "3",
                "--device", "cpu"]
        code, _, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, "--out", f"pid {other.pid}")
        assert sorted(p.name for p in out.iterdir()) == [".vitshrink.lock"]
    finally:
        other.kill()
        other.wait()
    code, _, err = run_cli(capsys, *args)  # the holder died: its stale lock is taken over
    assert code == 0, err
    assert not lock.exists() and (out / "synthesis.json").exists()


# --- bounded work ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,needle", [
    ("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9)),
     "aliases"),
    ("lr: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
    ("lr: " + "{a: " * 100 + "1" + "}" * 100 + "\n", "nested"),
])
def test_settings_yaml_is_bounded(capsys, vit_file, pool, tmp_path, text, needle):
    import time

    config = tmp_path / "bomb.yaml"
    config.write_text(text)
    start = time.monotonic()
    code, _, err = run_cli(capsys, "distill", str(vit_file), "--data", str(pool), "--out", str(tmp_path / "run"),
                           "-c", str(config), "--device", "cpu")
    assert_one_line_error(code, err, "bomb.yaml", needle)
    assert time.monotonic() - start < 20


def test_elongated_images_are_skipped_before_decoding(capsys, two_class_vit, tmp_path):
    import time

    data = tmp_path / "data"
    write_images(data / "cat", 2)
    write_images(data / "dog", 2, seed=1)
    Image.new("L", (1_000_000, 1)).save(data / "cat" / "strip.png")  # a few KB on disk
    Image.new("RGB", (1, 60_000)).save(data / "dog" / "tall.png")
    start = time.monotonic()
    code, out, err = run_cli(capsys, "evaluate", str(two_class_vit), "--data", str(data), "-j", "0")
    assert code == 0, err
    assert "4 images, 2 unreadable skipped" in " ".join(out.split())
    assert time.monotonic() - start < 20


@pytest.mark.parametrize("edit,needle", [
    (lambda raw: raw.update(crop_pct=0.001), "crop_pct"),
    (lambda raw: raw.update(input_size=[3, 100000, 100000]), "input_size"),
    (lambda raw: raw["kwargs"].update(img_size=100000), "kwargs.img_size"),
])
def test_record_preprocessing_is_bounded(capsys, vit_file, tmp_path, edit, needle):
    model = forged(vit_file, tmp_path / "forged.safetensors", edit)
    code, _, err = run_cli(capsys, "inspect", str(model))
    assert_one_line_error(code, err, "forged.safetensors", needle)


def test_deeply_nested_record_is_one_line(capsys, vit_file, tmp_path):
    from safetensors.torch import load_file, save_file

    target = tmp_path / "deep.safetensors"
    save_file(load_file(str(vit_file)), str(target), metadata={"vitshrink": "[" * 100000 + "]" * 100000})
    code, _, err = run_cli(capsys, "inspect", str(target))
    assert_one_line_error(code, err, "deep.safetensors")


@pytest.mark.parametrize("args,flag", [
    (["inspect", "{vit}", "--img-size", "8192"], "--img-size"),
    (["inspect", "{vit}", "--img-size", "4096"], "tokens"),  # patch 8: 262144 tokens
    (["inspect", "vit_tiny_patch16_224", "--img-size", "4000"], "tokens"),
    (["train-teacher", "cifar_resnet20", "--img-size", "100000", "--out", "{tmp}/t"], "--img-size"),
    (["inspect", "{vit}", "--key-map", "(a+)+$=x"], "--key-map"),
    (["inspect", "{vit}", "--key-map", "(blocks)\\1=x"], "--key-map"),
    (["inspect", "{vit}", "--key-map", "(a|ab)*c=x"], "--key-map"),
    (["inspect", "{vit}", "--key-map", "a*b*c*d*e=x"], "--key-map"),
])
def test_sizes_and_patterns_are_bounded(capsys, vit_file, tmp_path, args, flag):
    import time

    start = time.monotonic()
    code, _, err = run_cli(capsys, *[a.format(vit=vit_file, tmp=tmp_path) for a in args])
    assert_one_line_error(code, err, flag)
    assert time.monotonic() - start < 20


# --- no silent wrong result -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def always_dog(tmp_path_factory) -> Path:
    """A model that predicts class 0 for every image, whose record names its classes dog, cat, fish."""
    model = tiny_vit()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([10.0, 0.0, 0.0]))
    path = tmp_path_factory.mktemp("models") / "always_dog.safetensors"
    save_model(model, path, class_names=["dog", "cat", "fish"])
    return path


def test_classes_are_matched_by_name_not_folder_order(capsys, always_dog, tmp_path):
    data = tmp_path / "data"  # folders sort as cat, dog, fish: by index the model's "dog" would be cat
    write_images(data / "cat", 1)
    write_images(data / "dog", 3, seed=1)
    write_images(data / "fish", 2, seed=2)
    code, out, err = run_cli(capsys, "evaluate", str(always_dog), "--data", str(data), "-j", "0")
    assert code == 0, err
    assert "top-1 0.5000" in " ".join(out.split())  # the 3 dog images of 6
    (data / "fish").rename(data / "horse")
    code, _, err = run_cli(capsys, "evaluate", str(always_dog), "--data", str(data), "-j", "0")
    assert_one_line_error(code, err, "[cat, dog, horse]", "[dog, cat, fish]")
    write_images(data / "fish", 1, seed=3)
    code, _, err = run_cli(capsys, "evaluate", str(always_dog), "--data", str(data), "-j", "0")
    assert_one_line_error(code, err, "4 classes but the model has 3")


def test_training_labels_follow_the_teachers_class_names(always_dog, tmp_path):
    from vitshrink.io import load_model
    from vitshrink.pipeline import load_data

    data = tmp_path / "data"
    for index, name in enumerate(("cat", "dog", "fish")):
        write_images(data / name, 3, seed=index)
    labelled = load_data(data, None, teacher=load_model(always_dog), val_split=0.34, seed=0)
    assert labelled.class_names == ["dog", "cat", "fish"]
    for split in (labelled.train, labelled.val):
        for index, target in enumerate(split.targets):
            assert labelled.class_names[target] == Path(split.filename(index)).parent.name


def test_symlinked_images_count_once_and_other_formats_are_read(capsys, two_class_vit, tmp_path):
    data = tmp_path / "data"
    write_images(data / "cat", 2)
    write_images(data / "dog", 2, seed=1)
    (data / "cat" / "loop").symlink_to(data)  # a loop back to the root
    (data / "dog" / "again.png").symlink_to(data / "dog" / "img000.png")
    outside = tmp_path / "outside"
    write_images(outside, 2, seed=4)
    (data / "dog" / "escape").symlink_to(outside)
    rng = np.random.default_rng(0)
    for suffix in (".tif", ".gif", ".webp", ".bmp"):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(data / "cat" / f"x{suffix}")
    code, out, err = run_cli(capsys, "evaluate", str(two_class_vit), "--data", str(data), "-j", "0")
    assert code == 0, err
    assert "(8 images, 0 unreadable skipped)" in " ".join(out.split())  # 4 png + 4 other formats, each once


def test_every_class_with_two_images_keeps_a_training_and_a_validation_image():
    from vitshrink.data.folders import stratified_holdout

    train, val = stratified_holdout([0, 0, 1, 2, 2, 2], 0.9, seed=0)
    assert sorted(train + val) == list(range(6))
    assert {0, 1} & set(train) and {0, 1} & set(val)  # class 0: one of each
    assert 2 in train  # the one-image class trains
    assert sum(i in val for i in (3, 4, 5)) == 2 and sum(i in train for i in (3, 4, 5)) == 1


@pytest.mark.parametrize("args,flag", [
    (["distill", "{vit}", "--recipe", "uvc", "--set", "search_steps=-5"], "search_steps"),
    (["distill", "{vit}", "--recipe", "uvc", "--search-steps", "0"], "--search-steps"),
    (["distill", "{vit}", "--recipe", "uvc", "--set", "gate_momentum=2"], "gate_momentum"),
    (["cache-logits", "{vit}", "--epochs", "1", "--seed", "-1"], "--seed"),
    (["cache-logits", "{vit}", "--epochs", "0"], "--epochs"),
])
def test_every_numeric_setting_has_a_range(capsys, vit_file, tmp_path, args, flag):
    args = [a.format(vit=vit_file) for a in args] + ["--out", str(tmp_path / "run")]
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, flag)


def test_a_fraction_that_selects_nothing_is_refused(capsys, vit_file, pool, tmp_path):
    code, _, err = run_cli(capsys, "select-wild", "--teacher", str(vit_file), "--pool", str(pool), "--fraction",
                           "1e-9", "--criterion", "confidence", "-j", "0", "--device", "cpu", "--mode", "list",
                           "--out", str(tmp_path / "sel"))
    assert_one_line_error(code, err, "--fraction", "selects none")  # before any image is scored


# --- every forged run file is a one-line refusal naming the file -------------------------------------------
@pytest.fixture(scope="module")
def logit_cache(tmp_path_factory, two_class_vit, labelled_folder) -> Path:
    from cli_support import main  # noqa: F401  (the CLI, in-process)

    out = tmp_path_factory.mktemp("cache") / "cache"
    import sys

    old = sys.argv
    sys.argv = ["vitshrink", "cache-logits", str(two_class_vit), "--epochs", "1", "--topk", "2", "--data",
                str(labelled_folder), "-b", "8", "--out", str(out), "--device", "cpu"]
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None)
    finally:
        sys.argv = old
    return out


def _edit_meta(edit):
    def apply(cache: Path) -> None:
        meta = json.loads((cache / "meta.json").read_text())
        edit(meta)
        (cache / "meta.json").write_text(json.dumps(meta))
    return apply


FORGED_CACHES = {
    "meta not JSON": (lambda c: (c / "meta.json").write_text("{oops"), "meta.json"),
    "meta a list": (lambda c: (c / "meta.json").write_text("[1]"), "meta.json"),
    "meta deeply nested": (lambda c: (c / "meta.json").write_text("[" * 50000 + "]" * 50000), "meta.json"),
    "epochs a string": (_edit_meta(lambda m: m.update(epochs="1")), "epochs"),
    "topk above classes": (_edit_meta(lambda m: m.update(topk=99)), "topk"),
    "images huge": (_edit_meta(lambda m: m.update(images=10**8)), "values.f16"),
    "fingerprint a list": (_edit_meta(lambda m: m.update(fingerprint=[1])), "fingerprint"),
    "epochs_done too many": (_edit_meta(lambda m: m.update(epochs_done=5)), "epochs_done"),
    "truncated values": (lambda c: (c / "values.f16").write_bytes((c / "values.f16").read_bytes()[:10]),
                         "values.f16"),
    "missing lse": (lambda c: (c / "lse.f32").unlink(), "lse.f32"),
}


@pytest.mark.parametrize("label", list(FORGED_CACHES))
def test_a_forged_logit_cache_is_one_line(capsys, logit_cache, two_class_vit, labelled_folder, tmp_path, label):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(logit_cache, cache)
    damage, needle = FORGED_CACHES[label]
    damage(cache)
    code, _, err = _distill(capsys, two_class_vit, labelled_folder, tmp_path / "run", "--logit-cache", str(cache))
    assert_error_line(code, err, needle)
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("text", ["[" * 100000 + "]" * 100000, '{"student": ' * 3000 + "1" + "}" * 3000])
def test_a_deeply_nested_report_is_one_line(capsys, tmp_path, text):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.json").write_text(text)
    code, _, err = run_cli(capsys, "compare", str(tmp_path / "run"))
    assert_one_line_error(code, err, "report.json")


@pytest.mark.parametrize("config,pre,needle", [
    ({"hidden_size": "16"}, None, "hidden_size"),
    ({"image_size": [16, 16, 16]}, None, "image_size"),
    ({"hidden_act": ["gelu"]}, None, "hidden_act"),
    ({"layer_norm_eps": "1e-6"}, None, "layer_norm_eps"),
    ({"qkv_bias": "yes"}, None, "qkv_bias"),
    ({"model_type": ["vit"]}, None, "model_type"),
    ({}, {"resample": [3], "image_mean": "x"}, "image_mean"),
    ({}, {"do_center_crop": True, "size": {"height": 4000}, "crop_size": {"height": 1}}, "crop_size.height"),
])
def test_hf_configs_with_wrong_types_are_one_line(capsys, tmp_path, config, pre, needle):
    from safetensors.torch import save_file

    folder = tmp_path / "hf"
    folder.mkdir()
    base = {"model_type": "vit", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "image_size": 16, "patch_size": 8, "intermediate_size": 32}
    (folder / "config.json").write_text(json.dumps({**base, **config}))
    if pre is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    save_file(tiny_hf_vit_state(), str(folder / "model.safetensors"))
    code, _, err = run_cli(capsys, "inspect", str(folder))
    assert_one_line_error(code, err, needle)


@pytest.mark.parametrize("setting,needle", [("opt=nosuch", "opt"), ("sched=nosuch", "sched"),
                                            ("select_epoch=first", "select_epoch"),
                                            ("opt=[1]", "opt"), ("sched=7", "sched")])
def test_unknown_optimiser_and_scheduler_names_are_one_line(capsys, vit_file, data3, tmp_path, setting, needle):
    code, _, err = run_cli(capsys, "distill", str(vit_file), "--data", str(data3), "--out", str(tmp_path / "run"),
                           "--set", setting, "--device", "cpu")
    assert_one_line_error(code, err, needle)


# --- refusals the inputs decide come before any work ----------------------------------------------------
def test_data_free_batch_larger_than_the_synthesis_is_refused_at_once(capsys, two_class_vit, tmp_path):
    import time

    start = time.monotonic()
    code, _, err = run_cli(capsys, "distill", str(two_class_vit), "--data-free", "--synth-num", "4", "-b", "8",
                           "--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress")
    assert_error_line(code, err, "--batch-size 8", "--synth-num")
    assert time.monotonic() - start < 20 and not (tmp_path / "run" / "synthetic").exists()


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int8, torch.uint8])
def test_complex_and_8_bit_weights_are_refused_not_cast(capsys, vit_file, tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    state = load_file(str(vit_file))
    state["blocks.0.mlp.fc1.weight"] = state["blocks.0.mlp.fc1.weight"].to(dtype)
    for path in (tmp_path / "w.safetensors", tmp_path / "w.pt"):
        if path.suffix == ".pt":
            torch.save(state, path)
        elif dtype is not torch.complex64:  # safetensors has no complex type
            save_file(state, str(path))
        else:
            continue
        code, _, err = run_cli(capsys, "inspect", str(path), "--arch", "vit_tiny_patch16_224", "--num-heads", "2")
        assert_one_line_error(code, err, path.name, "blocks.0.mlp.fc1.weight", str(dtype).replace("torch.", ""))


def test_convert_refuses_data_with_more_classes_than_the_model(capsys, two_class_vit, data3, tmp_path):
    code, out, err = run_cli(capsys, "convert", str(two_class_vit), "--data", str(data3), "-o",
                             str(tmp_path / "c.safetensors"))
    assert_one_line_error(code, err, "3 classes but the model has 2")
    assert "top-1" not in out and not (tmp_path / "c.safetensors").exists()
