"""select-wild on real data: an MNIST ViT teacher picks digits out of a pool of digits and CIFAR-10 photos."""
from __future__ import annotations

import csv
import io
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitshrink.distill.attention_probe import ClassTokenAttention, blocks_at_fractions, uniform_cosine
from cli_support import run_cli
from conftest import CIFAR_TEST_1K, SHARED_DATA
from vitshrink.data.folders import _open_reader, build_transform
from vitshrink.errors import UserError
from vitshrink.io import create_model, data_config, load_model, record_of, save_model, set_data_config
from vitshrink.data.wild import read_image, select_wild

MNIST_TRAIN = SHARED_DATA / "mnist" / "train_5k.tar"
MNIST_TEST = SHARED_DATA / "mnist" / "test.tar"
N_DIGITS = 200  # and as many photos
BAD_FILES = {"empty file": 1, "truncated": 1, "not an image": 1}


def _tar_members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return [m for m in tar.getmembers() if m.isfile()]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    """A 4-block ViT (7x7 patches, 28x28 grey) trained on MNIST train_5k: about 90% top-1."""
    torch.manual_seed(0)
    images, labels = [], []
    with tarfile.open(MNIST_TRAIN) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        classes = sorted({m.name.split("/")[0] for m in members})
        for member in members:
            img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("L")
            images.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0))
            labels.append(classes.index(member.name.split("/")[0]))
    x = ((torch.stack(images) - 0.1307) / 0.3081).unsqueeze(1)
    y = torch.tensor(labels)
    model = create_model("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1, embed_dim=64, depth=4,
                         num_heads=4, mlp_ratio=2.0, num_classes=10)
    set_data_config(model, mean=(0.1307,), std=(0.3081,))
    epochs, batch = 10, 128
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * (len(x) // batch),
                                                   pct_start=0.15)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core box, 1 thread trains ~5x faster than 2 contending ones
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x) - batch + 1, batch):
            idx = order[start:start + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("teacher") / "mnist_vit.safetensors"
    save_model(model.eval(), path, class_names=classes)
    return path


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """MNIST test digits, as many CIFAR-10 photos, three broken image files and one text file."""
    root = tmp_path_factory.mktemp("pool")
    rng = random.Random(0)
    for tar_path, folder in ((MNIST_TEST, "digits"), (CIFAR_TEST_1K, "photos")):
        with tarfile.open(tar_path) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            for member in rng.sample(members, N_DIGITS):
                target = root / folder / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    (root / "broken").mkdir()
    (root / "broken" / "empty.JPG").write_bytes(b"")
    jpeg = next((root / "photos").rglob("*.jpg")).read_bytes()
    (root / "broken" / "cut.jpeg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "broken" / "words.png").write_text("not a picture")
    (root / "README.txt").write_text("a file that is not an image")
    return root


@pytest.fixture(scope="module")
def reference(teacher_file, pool, tmp_path_factory):
    """One uninterrupted select-wild run (copy mode, combined criterion, N = number of digits)."""
    out = tmp_path_factory.mktemp("reference")
    summary = select_wild(load_model(teacher_file), pool, out, num=N_DIGITS, batch_size=64, progress=False)
    return out, summary


def _selected(out: Path) -> dict[str, dict[str, str]]:
    with (out / "scores.csv").open(newline="") as handle:
        return {row["path"]: row for row in csv.DictReader(handle) if row["selected"] == "1"}


def test_selects_digits_and_counts_broken_files(reference, teacher_file):
    out, summary = reference
    selected = _selected(out)
    precision = sum(path.startswith("digits/") for path in selected) / len(selected)
    assert summary.selected == len(selected) == N_DIGITS
    assert precision >= 0.75, f"only {precision:.0%} of the selected images are digits"
    assert summary.scored == 2 * N_DIGITS
    assert summary.skipped == BAD_FILES
    assert summary.other_files == 1
    # The selection is a pseudo-labelled ImageFolder named by the teacher's classes.
    class_names = record_of(load_model(teacher_file)).class_names
    reader = _open_reader(out)
    assert len(reader) == N_DIGITS
    assert sum(summary.class_histogram.values()) == N_DIGITS
    for name, count in summary.class_histogram.items():
        assert name in class_names
        assert len(list((out / name).iterdir())) == count
    # Predicted names of digits mostly match their true folder (the teacher is a real classifier).
    digit_rows = [row for path, row in selected.items() if path.startswith("digits/")]
    agree = sum(row["pred_name"] == row["path"].split("/")[1] for row in digit_rows) / len(digit_rows)
    assert agree > 0.8


def test_resume_after_stop_scores_each_image_once(reference, teacher_file, pool, tmp_path):
    teacher = load_model(teacher_file)
    seen = {"batches": 0, "images": 0}

    def stop_in_third_batch(module, inputs, output):
        seen["batches"] += 1
        if seen["batches"] == 3:
            raise KeyboardInterrupt("stopped by the test")
        seen["images"] += inputs[0].shape[0]

    handle = teacher.register_forward_hook(stop_in_third_batch)
    with pytest.raises(KeyboardInterrupt):
        select_wild(teacher, pool, tmp_path, num=N_DIGITS, batch_size=64, workers=0, progress=False)
    handle.remove()
    with (tmp_path / "scores.csv").open(newline="") as f:
        partial = list(csv.DictReader(f))
    scored_before = [row for row in partial if not row["skipped"]]
    assert len(partial) == 2 * 64  # both finished batches were kept, broken files included
    assert len(scored_before) == seen["images"]
    assert not (tmp_path / "selection.json").exists()

    seen.update(batches=0, images=0)
    counter = teacher.register_forward_hook(lambda m, i, o: seen.__setitem__("images", seen["images"] + i[0].shape[0]))
    summary = select_wild(teacher, pool, tmp_path, num=N_DIGITS, batch_size=64, workers=0, progress=False)
    counter.remove()
    assert seen["images"] == 2 * N_DIGITS - len(scored_before)  # nothing scored twice
    assert summary.resumed == len(partial)
    assert summary.skipped == BAD_FILES
    assert set(_selected(tmp_path)) == set(_selected(reference[0]))


def test_balanced_selection_takes_each_classes_best(reference, teacher_file, pool, tmp_path):
    """``balanced``: re-ranks the same scores (no rescoring), the best N // C of every predicted class first."""
    import shutil

    shutil.copy2(reference[0] / "scores.csv", tmp_path / "scores.csv")
    teacher = load_model(teacher_file)
    calls = {"forwards": 0}
    handle = teacher.register_forward_hook(lambda m, i, o: calls.__setitem__("forwards", calls["forwards"] + 1))
    summary = select_wild(teacher, pool, tmp_path, num=N_DIGITS, mode="list", balanced=True, progress=False)
    handle.remove()
    assert calls["forwards"] == 0 and summary.selected == N_DIGITS
    with (tmp_path / "scores.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if not r["skipped"]]
    by_class: dict[str, list[tuple[float, str]]] = {}
    for r in rows:
        by_class.setdefault(r["pred"], []).append((float(r["combined"]), r["path"]))
    quota = N_DIGITS // len(by_class)
    chosen = {r["path"] for r in rows if r["selected"] == "1"}
    for pred, ranked in by_class.items():  # each class's `quota` best are in, whatever the global rank
        assert {path for _, path in sorted(ranked)[:quota]} <= chosen, pred
    first = {path for ranked in by_class.values() for _, path in sorted(ranked)[:quota]}
    rest = sorted((float(r["combined"]), r["path"]) for r in rows if r["path"] not in first)
    assert chosen == first | {path for _, path in rest[:N_DIGITS - len(first)]}  # the rest: global rank
    assert min(summary.class_histogram.values()) >= min(quota, min(len(v) for v in by_class.values()))


def test_probe_hook_matches_explicit_attention(teacher_file, pool):
    teacher = load_model(teacher_file)
    transform = build_transform(data_config(teacher))
    paths = sorted((pool / "digits").rglob("*.png"))[:8]
    x = torch.stack([transform(read_image(p, "L")[0]) for p in paths])
    block = teacher.blocks[2]
    captured = {}
    pre = block.attn.register_forward_pre_hook(lambda m, inputs: captured.__setitem__("x", inputs[0]))
    with ClassTokenAttention(teacher, [2]) as probe, torch.no_grad():
        teacher(x)
    pre.remove()
    attn = block.attn
    b, n, _ = captured["x"].shape
    q, k, _ = attn.qkv(captured["x"]).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    full = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1)  # (B, H, N, N)
    torch.testing.assert_close(probe.rows[2], full[:, :, 0, 1:].detach())
    uniform = torch.full((b, n - 1), 1.0 / (n - 1))
    expected = F.cosine_similarity(full[:, 0, 0, 1:].detach(), uniform, dim=1)
    torch.testing.assert_close(uniform_cosine(probe.rows[2]), expected)
    assert blocks_at_fractions(12, (1 / 3, 2 / 3)) == [3, 7]  # the official blocks of a 12-block teacher
    assert blocks_at_fractions(12, (1 / 3, 2 / 3, 1.0)) == [3, 7, 11]




def test_cli_list_mode_and_errors(teacher_file, pool, tmp_path, capsys):
    out = tmp_path / "picked"
    code, stdout, err = run_cli(capsys, "select-wild", "--teacher", str(teacher_file), "--pool", str(pool),
                                "--fraction", "0.25", "--mode", "list", "--criterion", "confidence",
                                "--out", str(out), "-b", "100", "--blocks", "1,3")
    assert code == 0, err
    assert "selected" in stdout and "truncated" in stdout
    listed = (out / "selected.txt").read_text().splitlines()
    assert len(listed) == round(0.25 * 2 * N_DIGITS)
    assert all(Path(p).is_file() for p in listed)
    assert not [p for p in out.iterdir() if p.is_dir()]  # list mode copies nothing
    with (out / "scores.csv").open(newline="") as f:
        assert "probe_b1" in next(csv.reader(f))

    code, _, err = run_cli(capsys, "select-wild", "--teacher", str(teacher_file), "--pool", str(pool),
                           "--num", "3", "--fraction", "0.1", "--out", str(tmp_path / "x"))
    assert code == 2 and err.strip().count("\n") == 0 and "--num" in err
    code, _, err = run_cli(capsys, "select-wild", "--teacher", str(teacher_file), "--pool", str(pool),
                           "--num", "3", "--blocks", "9", "--out", str(tmp_path / "y"))
    assert code == 2 and "--blocks" in err
    # Another --blocks on an existing out dir would mix scores: refused.
    with pytest.raises(UserError, match="scores.csv"):
        select_wild(load_model(teacher_file), pool, out, num=3, blocks=[0], progress=False)


def test_selection_trains_a_student_with_probe(reference, teacher_file, tmp_path):
    """The selected folder is data that ``distill --data`` reads; ``probe`` trains on it without labels."""
    from vitshrink.pipeline import distill

    out, _ = reference
    result = distill(load_model(teacher_file), "probe", data=out, out_dir=tmp_path / "run", epochs=1,
                     overrides={"steps_per_epoch": 2, "bench_batch_sizes": [1]}, progress=False)
    assert (tmp_path / "run" / "student.safetensors").exists()
    assert result.report["recipe"] == "probe"
    assert result.report["student"]["params"] < result.report["teacher"]["params"]
