"""Shared helpers for the distillation tests: a small real ViT teacher trained on the bundled CIFAR-10 data.

Not a test module (no ``test_`` prefix). The teacher is trained once per pytest session (cached under the
session's base temp dir, so every test file that asks reuses the same file).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# One thread: on a small shared CPU box, torch's default thread pool spin-waits against other processes and
# a tiny ViT step measured 45x slower with 2 threads than with 1.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# A ViT at 32 px: 16 patches of 8x8, width 48, 4 blocks (half-depth student: 2 blocks).
TEACHER_ARCH = "vit_tiny_patch16_224"
TEACHER_KWARGS = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, mlp_ratio=2.0, num_classes=10)


def train_tiny_teacher(path: Path, *, epochs: int = 2, seed: int = 0) -> Path:
    """Train the tiny ViT with plain cross-entropy on the bundled 5k CIFAR-10 images and save it."""
    from timm.optim import create_optimizer_v2

    from vitshrink.data import build_transform, make_loader, resolve_data
    from vitshrink.io import create_model, data_config, save_model, set_data_config

    torch.manual_seed(seed)
    model = create_model(TEACHER_ARCH, **TEACHER_KWARGS)
    set_data_config(model, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
    data = resolve_data()
    data.train.transform = build_transform(data_config(model), is_training=True, scale=(0.6, 1.0),
                                           color_jitter=0.0)
    loader = make_loader(data.train, 64, shuffle=True, workers=0, drop_last=True, seed=seed)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=2e-3, weight_decay=0.05)
    model.train()
    for _ in range(epochs):
        for images, targets, _ in loader:
            loss = torch.nn.functional.cross_entropy(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    save_model(model, path, class_names=data.class_names, provenance={"trained_by": "tests/distill_support.py"})
    return path


@pytest.fixture(scope="session")
def tiny_teacher_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.getbasetemp() / "tiny_teacher" / "teacher.safetensors"
    if not path.exists():
        train_tiny_teacher(path)
    return path


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


RESNET20 = REPO.parent / "shared" / "data" / "checkpoints" / "cifar10_resnet20_akamaster.th"


@pytest.fixture(scope="session")
def coadvise_teachers(tmp_path_factory) -> Path:
    """Co-advise teachers as vitshrink safetensors: the shared ResNet-20 (conv), a tiny random RedNet (inv) and
    the same RedNet with 5 classes (inv5, for the class-count error)."""
    from vitshrink.io import create_model, load_model, save_model, set_data_config

    if not RESNET20.exists():
        pytest.skip(f"{RESNET20} not present")
    folder = tmp_path_factory.mktemp("coadvise_teachers")
    save_model(load_model(RESNET20, arch="cifar_resnet20"), folder / "conv.safetensors")
    torch.manual_seed(0)
    rednet = create_model("rednet_cifar26", num_classes=10, base_chs=16)
    set_data_config(rednet, input_size=(3, 32, 32))
    save_model(rednet.eval(), folder / "inv.safetensors")
    save_model(create_model("rednet_cifar26", num_classes=5, base_chs=16).eval(), folder / "inv5.safetensors")
    return folder
