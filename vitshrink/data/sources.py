"""Training data sources: where a run's batches come from, as ``(images, targets, extras)``.

``extras`` is a dict holding at least ``"key"``: a LongTensor [B, 2] of each image's ``(epoch, index)``, the
seed of its augmentation (``SeededAugmentation``), so an image's view can be replayed (a logit cache reads it).

Determinism and resume: the training order of epoch ``e`` is a seeded permutation (torch's
``DistributedSampler`` with ``seed``; one replica when not distributed), and every image's augmentation is
drawn from RNGs seeded by ``(seed, epoch, index)``, so a batch is the same whichever worker makes it and however
many batches were skipped (``set_epoch(epoch, skip_batches)``).

Sources: a labelled folder or tar, a pseudo-labelled ``select-wild`` selection and a synthesised set are all
image folders read by :mod:`vitshrink.data.folders`, so :class:`SeededSource` serves them; a cached-logit
replay (later) is another class with the same interface. Nothing mutates a shared split's ``.transform``:
:func:`with_transform` makes a view of the split with its own.
"""
from __future__ import annotations

import copy
import os
import random
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


class TrainingSource(Protocol):
    """What the training loop draws from."""

    batch_size: int

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None: ...

    def batches_per_epoch(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]: ...


def with_transform(split: Dataset, transform: Callable | None) -> Dataset:
    """A view of ``split`` (same images and targets) with its own ``transform``; ``split`` is untouched."""
    view = copy.copy(split)
    view.transform = transform
    return view


def train_transform(model: nn.Module, cfg: dict[str, Any]) -> Callable:
    """The student's training transform from the run's augmentation settings (``aug_*`` in recipes/base.yaml)."""
    from vitshrink.data.folders import build_transform
    from vitshrink.io import data_config

    aug = {"scale": tuple(cfg["aug_scale"]), "hflip": cfg["aug_hflip"], "color_jitter": cfg["aug_color_jitter"],
           "auto_augment": cfg["aug_auto_augment"], "re_prob": cfg["aug_re_prob"]}
    return build_transform(data_config(model), is_training=True, **aug)


def eval_transform(model: nn.Module) -> Callable:
    from vitshrink.data.folders import build_transform
    from vitshrink.io import data_config

    return build_transform(data_config(model), is_training=False)


class SeededAugmentation(Dataset):
    """Looks up ``(epoch, index)`` keys; the augmentation RNGs are seeded from ``(seed, epoch, index)``.

    Returns ``(image, target, key)`` (``None`` for an unreadable image). The caller's python/numpy/torch CPU
    RNG states are restored afterwards, so data loading never perturbs the model's own randomness (dropout,
    drop-path) in the main process.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        sample_seed = (self.seed * 1_000_003 + epoch * 7_919 + index) % (2**31)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(sample_seed)
            np.random.seed(sample_seed)
            torch.default_generator.manual_seed(sample_seed)
            try:
                item = self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
        return None if item is None else (item[0], item[1], (epoch, index))


class EpochSampler(Sampler):
    """torch's DistributedSampler order for ``epoch`` (this rank's shard), as ``(epoch, index)`` keys,
    skipping the first ``skip`` samples (the batches a resumed run has already trained on)."""

    def __init__(self, n: int, *, seed: int, rank: int, world_size: int):
        self.inner = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in enumerate(self.inner):
            if position >= self.skip:
                yield self.epoch, index

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip)

    def shard_size(self) -> int:
        return len(self.inner)


def collate_keyed(batch: list) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Stack ``(image, target, key)`` samples, dropping unreadable ones (``None``); ``extras["skipped"]`` counts them."""
    good = [item for item in batch if item is not None]
    extras: dict[str, Any] = {"skipped": len(batch) - len(good)}
    if not good:
        extras["key"] = torch.empty(0, 2, dtype=torch.long)
        return torch.empty(0), torch.empty(0, dtype=torch.long), extras
    extras["key"] = torch.tensor([item[2] for item in good], dtype=torch.long)
    return (torch.stack([item[0] for item in good]), torch.tensor([item[1] for item in good], dtype=torch.long),
            extras)


def _loader(dataset: Dataset, batch_size: int, sampler: Sampler, workers: int | None, seed: int) -> DataLoader:
    # The same loader settings as vitshrink.data.make_loader, with the keyed collate.
    if workers is None:
        workers = min(4, max(0, (os.cpu_count() or 1) - 1))
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_keyed, drop_last=True, pin_memory=torch.cuda.is_available(),
                      persistent_workers=workers > 0, generator=generator)


class SeededSource:
    """Seeded, resumable ``(images, targets, extras)`` batches of an image dataset, this rank's shard."""

    def __init__(self, dataset: Dataset, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 workers: int | None = None, description: str = ""):
        self.dataset = SeededAugmentation(dataset, seed)
        self.batch_size, self.description = batch_size, description
        self.sampler = EpochSampler(len(dataset), seed=seed, rank=rank, world_size=world_size)
        self.loader = _loader(self.dataset, batch_size, self.sampler, workers, seed)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.sampler.set_epoch(epoch, skip=skip_batches * self.batch_size)

    def batches_per_epoch(self) -> int:
        """Full batches in this rank's shard of one epoch."""
        return self.sampler.shard_size() // self.batch_size

    def images_per_epoch(self) -> int:
        return self.sampler.shard_size()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        return iter(self.loader)


def labelled_source(split: Dataset, student: nn.Module, cfg: dict[str, Any], *, seed: int, rank: int = 0,
                    world_size: int = 1) -> SeededSource:
    """A labelled split (folder, tar, ``select-wild`` selection, synthesised folder) with the student's
    training transform (a view: the split itself is unchanged)."""
    return SeededSource(with_transform(split, train_transform(student, cfg)), batch_size=int(cfg["batch_size"]),
                        seed=seed, rank=rank, world_size=world_size, workers=cfg["workers"])
