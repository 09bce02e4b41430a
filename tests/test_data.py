"""Data resolution on the real bundled CIFAR-10 tars: splits, hold-out, class alignment, unreadable images."""
from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path

import pytest

from vitshrink.data import BUNDLED_VAL, make_loader, resolve_data, stratified_holdout
from vitshrink.errors import UserError


def extract(tmp: Path, classes: tuple[str, ...], per_class: int) -> Path:
    with tarfile.open(BUNDLED_VAL) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.split("/")[0] in classes]
        taken: Counter = Counter()
        chosen = []
        for member in members:
            cls = member.name.split("/")[0]
            if taken[cls] < per_class:
                chosen.append(member)
                taken[cls] += 1
        tar.extractall(tmp, members=chosen, filter="data")
    return tmp


def test_bundled_default_is_cifar10_subset():
    data = resolve_data()
    assert (len(data.train), len(data.val)) == (5000, 1000)
    assert data.class_names[:3] == ["airplane", "automobile", "bird"]
    assert Counter(data.val.targets) == {i: 100 for i in range(10)}


def test_tar_without_split_gets_stratified_seeded_holdout():
    data = resolve_data(BUNDLED_VAL, val_split=0.2, seed=3)
    assert len(data.val) == 200 and len(data.train) == 800
    assert Counter(data.val.targets) == {i: 20 for i in range(10)}
    assert "held out 200 of 1000" in data.note
    again = resolve_data(BUNDLED_VAL, val_split=0.2, seed=3)
    assert again.val.indices == data.val.indices
    other = resolve_data(BUNDLED_VAL, val_split=0.2, seed=4)
    assert other.val.indices != data.val.indices
    assert not set(data.val.indices) & set(data.train.indices)


def test_root_with_train_and_val_folders_is_used_as_is(tmp_path):
    extract(tmp_path / "train", ("cat", "dog"), 6)
    extract(tmp_path / "val", ("cat", "dog"), 3)
    data = resolve_data(tmp_path)
    assert (len(data.train), len(data.val)) == (12, 6)
    assert data.class_names == ["cat", "dog"] and data.note is None


def test_training_subset_of_classes_aligns_with_validation_classes(tmp_path):
    extract(tmp_path, ("cat", "truck"), 5)
    data = resolve_data(tmp_path, BUNDLED_VAL)
    assert data.num_classes == 10
    assert sorted(set(data.train.targets)) == [3, 9]  # cat and truck in CIFAR-10's order
    assert {data.train[i][1] for i in range(len(data.train))} == {3, 9}


def test_validation_missing_a_training_class_is_refused(tmp_path):
    extract(tmp_path / "a", ("cat", "truck"), 2)
    extract(tmp_path / "b", ("cat",), 2)
    with pytest.raises(UserError, match="no class folder for training classes"):
        resolve_data(tmp_path / "a", tmp_path / "b")


def test_loader_skips_and_counts_corrupt_images(tmp_path):
    extract(tmp_path, ("cat",), 4)
    (tmp_path / "cat" / "zero.jpg").write_bytes(b"")
    (tmp_path / "cat" / "garbage.png").write_bytes(b"\x89PNG but not really")
    data = resolve_data(tmp_path, val_split=0.5)
    import torchvision.transforms as T

    data.train.transform = T.ToTensor()
    data.val.transform = T.ToTensor()
    seen = skipped = 0
    for split in (data.train, data.val):
        for images, targets, bad in make_loader(split, 4, workers=0):
            seen += len(targets)
            skipped += bad
    assert (seen, skipped) == (4, 2)


def test_holdout_rejects_bad_fraction():
    with pytest.raises(UserError, match="--val-split"):
        stratified_holdout([0, 1, 1], 1.5, 0)
