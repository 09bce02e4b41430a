"""`synthesize` on a real teacher (the shared ResNet-20 CIFAR-10 checkpoint): readable, balanced PNGs the teacher
classifies as their targets, a manifest that tells the truth, and batch-by-batch resume."""
from __future__ import annotations

import csv
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import vitshrink.data.synthetic as synthetic
from conftest import RESNET20
from vitshrink.errors import UserError

torch.set_num_threads(1)
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
NUM, BATCH, ITERATIONS = 20, 10, 30
# The ImageNet set (lr 0.2, cosine) converges within 30 steps; the CIFAR set the teacher would get under auto
# (lr 0.05 constant, BN weight 10) is made for 2,000 (it puts ~40% of images on target after 30, ~65% after 200).
SETTINGS = "deepinversion-imagenet"


def _teacher():
    import vitshrink.models  # noqa: F401  (registers cifar_resnet20)
    from vitshrink.io import load_model, record_of

    if not RESNET20.exists():
        pytest.skip(f"{RESNET20} not present")
    model = load_model(RESNET20, arch="cifar_resnet20")
    record_of(model).class_names = list(CIFAR_CLASSES)  # what a saved record would carry
    return model


@pytest.fixture(scope="module")
def interrupted_then_resumed(tmp_path_factory):
    """Run 1 is killed while writing its second batch; run 2 resumes. Returns (out_dir, run-1 state, result)."""
    out = tmp_path_factory.mktemp("synth") / "images"
    real_optimise, real_write = synthetic.optimise_batch, synthetic._write_batch
    calls = []

    def optimise_then_die(*args, **kwargs):
        calls.append(kwargs["seed"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C while batch 1 was being optimised
        return real_optimise(*args, **kwargs)

    synthetic.optimise_batch = optimise_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            synthetic.synthesize(_teacher(), NUM, out, iterations=ITERATIONS, batch_size=BATCH, device="cpu",
                                 settings=SETTINGS, progress=False)
    finally:
        synthetic.optimise_batch = real_optimise
    first_files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*.png")}
    assert calls == [0, 1] and len(first_files) == BATCH  # batch b's seed is seed * 1_000_003 + b
    resumed_calls = []

    def count_writes(out_dir, batch_index, *args, **kwargs):
        resumed_calls.append(batch_index)
        return real_write(out_dir, batch_index, *args, **kwargs)

    synthetic._write_batch = count_writes
    teacher = _teacher()
    try:
        result = synthetic.synthesize(teacher, NUM, out, iterations=ITERATIONS, batch_size=BATCH, device="cpu",
                                      settings=SETTINGS, progress=False)
    finally:
        synthetic._write_batch = real_write
    assert all(p.requires_grad for p in teacher.parameters())  # frozen only while synthesising
    return out, first_files, resumed_calls, result


def test_resumed_synthesis_does_not_redo_finished_batches(interrupted_then_resumed):
    out, first_files, resumed_calls, result = interrupted_then_resumed
    assert resumed_calls == [1]
    assert (result.batches_made, result.batches_skipped) == (1, 1)
    for path, (mtime, data) in first_files.items():
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data  # untouched
    assert not list(out.rglob("*.tmp"))  # atomic writes leave nothing half-written


def test_synthesised_images_are_readable_balanced_and_classified_as_their_target(interrupted_then_resumed):
    out, _, _, result = interrupted_then_resumed
    files = sorted(out.rglob("*.png"))
    assert len(files) == NUM
    assert Counter(p.parent.name for p in files) == {name: NUM // 10 for name in CIFAR_CLASSES}
    with (out / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == NUM
    assert {r["file"] for r in rows} == {str(p.relative_to(out)) for p in files}
    # The teacher, run independently on the files as read back from disk, agrees with the targets and the manifest.
    teacher = _teacher().eval()
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pixels = np.stack([np.asarray(Image.open(out / r["file"]).convert("RGB")) for r in rows])
    assert pixels.shape == (NUM, 32, 32, 3)
    images = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        probs = teacher(images).softmax(1)
    targets = torch.tensor([int(r["target"]) for r in rows])
    assert all(CIFAR_CLASSES[int(r["target"])] == r["file"].split("/")[0] for r in rows)
    assert (probs.argmax(1) == targets).float().mean().item() >= 0.9
    assert probs.argmax(1).tolist() == [int(r["teacher_top1"]) for r in rows]
    assert probs.max(1).values.tolist() == pytest.approx([float(r["confidence"]) for r in rows], abs=1e-4)
    assert result.target_agreement >= 0.9
    # Not noise: neighbouring pixels are correlated (the TV prior and the BN statistics shape the images).
    grey = pixels.astype(np.float64).mean(axis=3)
    assert np.corrcoef(grey[:, :, :-1].ravel(), grey[:, :, 1:].ravel())[0, 1] > 0.3
    # Usable as --data: timm's ImageFolder reader finds every image under its target class.
    from timm.data import create_dataset

    dataset = create_dataset("", root=str(out))
    assert len(dataset) == NUM and sorted(dataset.reader.class_to_idx) == CIFAR_CLASSES


def test_other_settings_or_a_foreign_folder_are_refused(interrupted_then_resumed, tmp_path):
    out = interrupted_then_resumed[0]
    with pytest.raises(UserError, match="iterations, settings differ"):
        synthetic.synthesize(_teacher(), NUM, out, iterations=ITERATIONS + 1, batch_size=BATCH, device="cpu",
                             settings=SETTINGS, progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a synthesis folder"):
        synthetic.synthesize(_teacher(), NUM, tmp_path, iterations=1, device="cpu", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_cli_refuses_a_prior_the_teacher_lacks(tmp_path, capsys):
    from vitshrink.cli import main
    from vitshrink.io import create_model, save_model

    vit = create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=24, depth=1, num_heads=3,
                       num_classes=4)
    spec = save_model(vit, tmp_path / "vit.safetensors")
    old_argv = sys.argv
    sys.argv = ["vitshrink", "synthesize", str(spec), "--num", "4", "--out", str(tmp_path / "out"), "--prior", "bn"]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = old_argv
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--prior bn" in err and "usable here: patch-sim" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_synthesizes_with_the_patch_similarity_prior(tmp_path, capsys):
    from vitshrink.cli import main
    from vitshrink.io import create_model, save_model

    torch.manual_seed(0)
    vit = create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=24, depth=1, num_heads=3,
                       num_classes=4)
    spec = save_model(vit, tmp_path / "vit.safetensors", class_names=["d", "c", "b", "a"])  # unsorted: index names
    old_argv = sys.argv
    sys.argv = ["vitshrink", "synthesize", str(spec), "--num", "6", "--out", str(tmp_path / "out"),
                "--iterations", "3", "-b", "4", "--device", "cpu"]
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None)
    finally:
        sys.argv = old_argv
    out = capsys.readouterr().out
    assert "patch-sim" in out and "psaq-vit-deit" in out and "wrote" in out
    files = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.png"))
    assert files == ["000/0000000.png", "000/0000004.png", "001/0000001.png", "001/0000005.png", "002/0000002.png",
                     "003/0000003.png"]


def test_resumed_run_writes_the_same_images_as_an_uninterrupted_one(interrupted_then_resumed, tmp_path):
    out = interrupted_then_resumed[0]
    fresh = tmp_path / "fresh"
    synthetic.synthesize(_teacher(), NUM, fresh, iterations=ITERATIONS, batch_size=BATCH, device="cpu",
                         settings=SETTINGS, progress=False)
    resumed = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*.png")}
    assert resumed == {str(p.relative_to(fresh)): p.read_bytes() for p in fresh.rglob("*.png")}
    assert (out / "manifest.csv").read_text() == (fresh / "manifest.csv").read_text()
