"""Hostile input, one test per class of defect (issue 13): each crafts its bad input and checks that the CLI
answers with exit 2 and one line (or the correct result), no traceback, and touches nothing outside --out."""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitshrink.cli import main
from vitshrink.io import create_model, save_model, set_data_config


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``vitshrink ARGS`` in-process; return (exit code, stdout, stderr)."""
    old_argv = sys.argv
    sys.argv = ["vitshrink", *args]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old_argv
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


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
