"""The suite's one home for fixtures and paths: one torch thread, where the shared data lives, and the session
fixtures that train or convert a teacher once for every test file that asks.

Helpers that are not fixtures (``small_data``, ``subprocess_env``, ``run_cli``) live in ``distill_support.py``
and ``cli_support.py``; those modules re-export the fixtures below under their old names, so a test file that
still imports them from there keeps working.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the CLI subprocesses some tests start

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: on a small shared CPU box, torch's default thread pool spin-waits against other processes and
# a tiny ViT step measured 45x slower with 2 threads than with 1.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# The project's real data lives beside the checkout (../shared/data), in CI as on a developer's machine.
SHARED_DATA = REPO.parent / "shared" / "data"
CHECKPOINTS = SHARED_DATA / "checkpoints"
RESNET20 = CHECKPOINTS / "cifar10_resnet20_akamaster.th"
CIFAR_TEST_1K = SHARED_DATA / "cifar10" / "test_1k.tar"

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
    save_model(model, path, class_names=data.class_names, provenance={"trained_by": "tests/conftest.py"})
    return path


@pytest.fixture(scope="session")
def tiny_teacher_path(tmp_path_factory) -> Path:
    """The tiny ViT teacher, trained once per session (2 epochs on the bundled 5k CIFAR-10 images)."""
    path = tmp_path_factory.getbasetemp() / "tiny_teacher" / "teacher.safetensors"
    if not path.exists():
        train_tiny_teacher(path)
    return path


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


@pytest.fixture(scope="session")
def vanilla_run(tiny_teacher_path, tmp_path_factory):
    """One finished ``vanilla`` run of the tiny teacher (1 epoch on a 384/100 slice of the bundled data, ORT latency
    at batch 1 and 4), for the tests that only read a run folder's outputs: they must not write into it. Returns
    the ``DistillResult``; ``.out_dir`` is the folder."""
    from distill_support import small_data
    from vitshrink.io import load_model
    from vitshrink.pipeline import distill

    return distill(load_model(tiny_teacher_path), "vanilla", data=small_data(384, 100),
                   out_dir=tmp_path_factory.mktemp("vanilla_run") / "vanilla", epochs=1, batch_size=32, workers=0,
                   progress=False, overrides={"bench_batch_sizes": [1, 4]})
