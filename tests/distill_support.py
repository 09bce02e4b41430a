"""Shared helpers for the distillation tests that are not fixtures: a class-balanced data slice and the
environment for CLI subprocesses.

Not a test module (no ``test_`` prefix). The fixtures and paths live in ``conftest.py``; the names below are
re-exported so that test files importing them from here keep working.
"""
from __future__ import annotations

import os
import sys

import torch

from conftest import (REPO, RESNET20, TEACHER_ARCH, TEACHER_KWARGS, coadvise_teachers,  # noqa: F401  (re-exports)
                      tiny_teacher_path, train_tiny_teacher)

PYTHON = sys.executable


def train_hard_teacher(*, img_size: int, patch_size: int, n_train: int, batch: int, seed: int = 0):
    """A deliberately hard teacher to prune: 2 blocks, ONE head of width 32, one AdamW pass (lr 3e-3) over
    ``n_train`` real CIFAR-10 images. Returned in eval mode."""
    from vitshrink.io import create_model, set_data_config

    torch.manual_seed(seed)
    model = create_model(TEACHER_ARCH, img_size=img_size, patch_size=patch_size, embed_dim=32, depth=2, num_heads=1,
                         mlp_ratio=2.0, num_classes=10)
    set_data_config(model, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for images, targets, _ in eval_view_loader(model, n=n_train, batch=batch):
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def eval_view_loader(model, *, n: int, batch: int):
    """Shuffled batches of ``n`` bundled training images, in ``model``'s evaluation view (no augmentation)."""
    from vitshrink.data import build_transform, make_loader
    from vitshrink.io import data_config

    data = small_data(n_train=n, n_val=16)
    data.train.transform = build_transform(data_config(model), is_training=False)
    return make_loader(data.train, batch, shuffle=True, workers=0, drop_last=True)


def small_data(n_train: int = 512, n_val: int = 200, seed: int = 0):
    """A class-balanced slice of the bundled data (train_5k / test_1k), for fast runs."""
    from vitshrink.data import ImageSplit, LabelledData, resolve_data

    full = resolve_data()

    def strided(split, n):
        step = max(1, len(split) // n)
        return ImageSplit(split.reader, [split.indices[i] for i in range(0, step * n, step)])

    return LabelledData(strided(full.train, n_train), strided(full.val, n_val), full.class_names,
                        f"bundled CIFAR-10 slice ({n_train} train / {n_val} val)")


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
