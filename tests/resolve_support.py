"""Small ViTs trained briefly on real MNIST images, saved as foreign checkpoints (plain state dicts): the
originals that behavioural resolution and ``--module`` must read right. Shared by tests and
``benchmarks/hand_written.py``."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST_TRAIN = SHARED_DATA / "mnist" / "train_5k.tar"
MNIST_TEST = SHARED_DATA / "mnist" / "test.tar"


def mnist_tensors(path: Path = MNIST_TRAIN, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] (N, 1, 28, 28) and labels, straight from the tar (class = folder name)."""
    images, labels = [], []
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.lower().endswith(".png")]
        if limit is not None:
            members = members[:: max(1, len(members) // limit)][:limit]
        for member in members:
            pixels = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("L"), np.float32)
            images.append(torch.from_numpy(pixels / 255.0)[None])
            labels.append(int(Path(member.name).parent.name))
    return torch.stack(images), torch.tensor(labels)


def train_briefly(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float],
                  std: Sequence[float], steps: int = 300, batch: int = 64, lr: float = 3e-3,
                  seed: int = 0) -> nn.Module:
    """AdamW on cross-entropy for ``steps`` batches of ``(images - mean) / std``; returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for _ in range(steps):
        index = torch.randint(len(images), (batch,), generator=generator)
        loss = nn.functional.cross_entropy(model((images[index] - mean_t) / std_t), labels[index])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float],
             std: Sequence[float]) -> float:
    mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return float((model.eval()((images - mean_t) / std_t).argmax(1) == labels).float().mean())


# A user's hand-written ViT (its own code, not timm's), written out as a file for --module. ``placement``:
# "pre" (norm before each sub-block), or "res_post" (the norm on the branch output before the residual add:
# a computation vitshrink has no candidate for).
HAND_WRITTEN_VIT = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim, heads, placement):
        super().__init__()
        self.placement = placement
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        if self.placement == "pre":
            h = self.norm1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.mlp(self.norm2(x))
        x = x + self.norm1(self.attn(x, x, x, need_weights=False)[0])
        return x + self.norm2(self.mlp(x))


class TinyViT(nn.Module):
    def __init__(self, dim=32, depth=2, heads=4, patch=7, img=28, chans=1, classes=10, placement="pre"):
        super().__init__()
        self.patch_embedding = nn.Conv2d(chans, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, placement) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embedding(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def build(**kwargs):
    return TinyViT(**kwargs)
'''


def hand_written_namespace() -> dict:
    namespace: dict = {}
    exec(compile(HAND_WRITTEN_VIT, "hand_written_vit.py", "exec"), namespace)  # noqa: S102  (our own test code)
    return namespace


def trained_hand_written(path: Path, mean: Sequence[float], std: Sequence[float], steps: int = 250,
                         **kwargs) -> tuple[Path, nn.Module]:
    """The hand-written ViT trained briefly on MNIST train_5k under ``mean``/``std``, saved as a plain state dict."""
    torch.manual_seed(0)
    model = hand_written_namespace()["build"](**kwargs)
    images, labels = mnist_tensors(MNIST_TRAIN)
    train_briefly(model, images, labels, mean, std, steps=steps)
    torch.save(model.state_dict(), path)
    return path, model


def small_image_folder(folder: Path, per_class: int = 30, source: Path = MNIST_TEST) -> Path:
    """The first ``per_class`` images of each class of ``source`` as an ImageFolder (a cheap labelled set)."""
    counts: dict[str, int] = {}
    with tarfile.open(source) as tar:
        for member in tar.getmembers():
            label = Path(member.name).parent.name
            if member.isfile() and counts.get(label, 0) < per_class:
                counts[label] = counts.get(label, 0) + 1
                (folder / label).mkdir(parents=True, exist_ok=True)
                (folder / label / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    return folder
