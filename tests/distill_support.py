"""Shared helpers for the distillation tests that are not fixtures: a class-balanced data slice and the
environment for CLI subprocesses.

Not a test module (no ``test_`` prefix). The fixtures and paths live in ``conftest.py``; the names below are
re-exported so that test files importing them from here keep working.
"""
from __future__ import annotations

import os
import sys

from conftest import (REPO, RESNET20, TEACHER_ARCH, TEACHER_KWARGS, coadvise_teachers,  # noqa: F401  (re-exports)
                      tiny_teacher_path, train_tiny_teacher)

PYTHON = sys.executable


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
