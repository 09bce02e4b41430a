"""A TinyViT-style cache of sparse teacher logits, replayed with the same augmented views.

TinyViT (Wu et al., ECCV 2022) runs the teacher once over every epoch's augmented views, keeps the top-k of
each image's teacher output and replays the exact view at training time, so no teacher runs while the student
trains. Here a view is already a pure function of ``(seed, epoch, index)`` (:class:`SeededAugmentation`), so the
cache is indexed by ``extras["key"]`` = ``(epoch, index)``.

Layout of a cache folder: ``meta.json`` (fingerprint, shape, epochs done) and two memory-mapped arrays of shape
``[epochs, images, K]``: ``values.f16`` (the top-K teacher log-probabilities, i.e. logit minus log-sum-exp,
fp16) and ``indices.i16``/``indices.i32`` (class indices), plus ``lse.f32`` ``[epochs, images]`` (the log-sum-exp
of the full logits, so the teacher's own logits come back, not just their softmax). Log-probabilities rather
than raw logits: fp16 then rounds the large probabilities (log p near 0) finely, as TinyViT's fp16
probabilities do, instead of by up to 2^-7 of a logit of 10-20. :class:`CachedTeacher` rebuilds full logits whose softmax puts the stored mass on
the top-K classes and spreads the remaining mass uniformly over the others (TinyViT's rule); with K = number of
classes the logits are the teacher's own, up to fp16 rounding.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from vitshrink._atomic import atomic_write_text
from vitshrink.errors import UserError
from vitshrink.io.fields import read_json

META = "meta.json"
VERSION = 2  # 2: values are log-probabilities (1 stored raw logits)


def teacher_hash(teacher: nn.Module) -> str:
    """sha256 of the teacher's weights (names and CPU bytes) and of the preprocessing it expects: the same
    teacher gives the same hash whatever file format or flags it was loaded from."""
    from vitshrink.io import data_config

    digest = hashlib.sha256()
    for name, tensor in teacher.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    config = data_config(teacher)
    digest.update(json.dumps({k: list(config[k]) if isinstance(config[k], tuple) else config[k]
                              for k in ("input_size", "mean", "std", "interpolation") if k in config}).encode())
    return digest.hexdigest()


def listing_hash(split: Any) -> str:
    """sha256 of a split's listing: its images (file names where the reader has them), order and targets."""
    digest = hashlib.sha256()
    reader = getattr(split, "reader", None)
    name_of = getattr(reader, "_filename", None)
    for position, index in enumerate(getattr(split, "indices", range(len(split)))):
        name = name_of(index) if name_of is not None else str(index)
        target = split.targets[position] if hasattr(split, "targets") else ""
        digest.update(f"{name}\t{target}\n".encode())
    return digest.hexdigest()


def fingerprint(*, teacher_hash: str, data_listing: str, augmentation: Mapping[str, Any], seed: int,
                input_size: tuple[int, ...], mean: tuple[float, ...], std: tuple[float, ...], topk: int) -> dict:
    """What a cache depends on; a run whose own fingerprint differs in any key must not read it."""
    return {"teacher": teacher_hash, "data": data_listing,
            "augmentation": {key: (list(v) if isinstance(v, (tuple, list)) else v) for key, v in augmentation.items()},
            "seed": int(seed), "input_size": [int(v) for v in input_size],
            "mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std], "topk": int(topk)}


def augmentation_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The run settings that shape a training view (``aug_*`` in recipes/base.yaml)."""
    return {key: cfg[key] for key in sorted(cfg) if key.startswith("aug_")}


def read_meta(path: str | Path) -> dict:
    meta_path = Path(path) / META
    if not meta_path.is_file():
        raise UserError(f"--logit-cache {path}: not a logit cache (no {META}; make one with `vitshrink cache-logits`)")
    meta = read_json(meta_path, "logit-cache record (rebuild it with `vitshrink cache-logits`)")
    if meta.get("version") != VERSION:
        raise UserError(f"--logit-cache {path}: made by another vitshrink version (cache format "
                        f"{meta.get('version')!r:.40}, this one reads {VERSION}); rebuild it with "
                        "`vitshrink cache-logits`")
    _check_meta(meta, meta_path)
    return meta


def _check_meta(meta: dict, meta_path: Path) -> None:
    """Every field a run reads back from meta.json, and the array files' sizes, before anything is mapped."""
    from vitshrink.io.fields import check_int

    where = str(meta_path)
    check_int(where, "num_classes", meta.get("num_classes"), 1, 10**6)
    check_int(where, "topk", meta.get("topk"), 1, meta["num_classes"])
    check_int(where, "epochs", meta.get("epochs"), 1, 100_000)
    check_int(where, "images", meta.get("images"), 1, 10**9)
    check_int(where, "epochs_done", meta.get("epochs_done"), 0, meta["epochs"])
    fingerprint = meta.get("fingerprint")
    if not isinstance(fingerprint, dict) or fingerprint.get("topk") != meta["topk"] \
            or not isinstance(fingerprint.get("teacher"), str) or not isinstance(fingerprint.get("seed"), int):
        raise UserError(f"{where}: damaged logit-cache record (field fingerprint)")
    for name, itemsize, per_row in _array_files(meta):
        file = meta_path.parent / name
        expected = meta["epochs"] * meta["images"] * per_row * itemsize
        size = file.stat().st_size if file.is_file() else None
        if size != expected:
            raise UserError(f"{file}: logit-cache array has {size if size is not None else 'no'} bytes, "
                            f"meta.json says {expected}; rebuild the cache with `vitshrink cache-logits`")


def _array_files(meta: dict) -> list[tuple[str, int, int]]:
    """(file name, bytes per item, items per image-epoch) of the three arrays."""
    index_dtype = np.dtype(np.int16 if meta["num_classes"] < 2**15 else np.int32)
    return [("values.f16", 2, meta["topk"]), (f"indices.{index_dtype.str[1:]}", index_dtype.itemsize, meta["topk"]),
            ("lse.f32", 4, 1)]


def check_fingerprint(path: str | Path, expected: Mapping[str, Any], *, epochs: int) -> dict:
    """The cache's meta when it matches ``expected`` and holds ``epochs`` epochs; else one-line UserError."""
    meta = read_meta(path)
    stored = meta["fingerprint"]
    differs = [key for key in expected if key != "topk" and stored.get(key) != expected[key]]
    if differs:
        raise UserError(f"--logit-cache {path}: made for another {', '.join(differs)} than this run "
                        f"(rebuild it with `vitshrink cache-logits`)")
    if meta["epochs_done"] < epochs:
        raise UserError(f"--logit-cache {path}: holds {meta['epochs_done']} epochs, this run trains {epochs}")
    return meta


def cache_record(path: str | Path) -> dict:
    """What ``args.yaml`` and the report say about a cache a run read: its folder, fingerprint and epochs."""
    meta = read_meta(path)
    return {"path": str(path), "fingerprint": meta["fingerprint"], "epochs": meta["epochs_done"]}


def cache_notes(caches: Mapping[str, str | Path]) -> list[str]:
    """report.md's line per cached role: the teacher did not run during training."""
    notes = []
    for role, path in caches.items():
        fp = read_meta(path)["fingerprint"]
        notes.append(f"Teacher logits ({role}) were read from the logit cache {path} (top-{fp['topk']}, seed "
                     f"{fp['seed']}, teacher sha256 {fp['teacher'][:12]}); that teacher did not run during training.")
    return notes


# Settings under which the teacher sees something other than the stored view: mixup / cutmix batches (TinyViT
# replays its mixup from a stored seed; our cache stores unmixed views only) and uvc's official post-training
# objective (it mixes the batch inside the loss).
MIXING_KEYS = ("mixup", "mixup_alpha", "cutmix", "cutmix_alpha", "cutmix_minmax")  # timm Mixup's argument names


def check_replayable(recipe: str, cfg: Mapping[str, Any]) -> None:
    """Refuse ``--logit-cache`` for a run whose teacher would not see the cached views."""
    mixing = [key for key in MIXING_KEYS if cfg.get(key) not in (None, 0, 0.0, False)]
    if cfg.get("mixup_prob") in (0, 0.0):
        mixing = []
    if mixing:
        flags = " ".join(f"--{key.replace('_', '-')} 0" for key in mixing)
        raise UserError(f"--logit-cache: {' and '.join(mixing)} {'is' if len(mixing) == 1 else 'are'} on in the "
                        f"{recipe} settings, so the teacher would see mixed images that the cache does not hold; "
                        f"add {flags} or run without --logit-cache")
    if recipe == "uvc" and cfg.get("posttrain_objective") == "official":
        raise UserError("--logit-cache: uvc's posttrain_objective official runs the teacher on mixup/cutmix "
                        "images, which the cache does not hold; use posttrain_objective kd or no cache")


def _arrays(path: Path, meta: dict, mode: str) -> tuple[np.memmap, np.memmap, np.memmap]:
    shape = (meta["epochs"], meta["images"], meta["topk"])
    index_dtype = np.int16 if meta["num_classes"] < 2**15 else np.int32
    values = np.memmap(path / "values.f16", dtype=np.float16, mode=mode, shape=shape)
    indices = np.memmap(path / f"indices.{np.dtype(index_dtype).str[1:]}", dtype=index_dtype, mode=mode, shape=shape)
    lse = np.memmap(path / "lse.f32", dtype=np.float32, mode=mode, shape=shape[:2])
    return values, indices, lse


def bytes_per_image_epoch(topk: int, num_classes: int) -> int:
    """Storage of one image-epoch: K fp16 values, K class indices, one fp32 log-sum-exp."""
    return topk * 2 + topk * (2 if num_classes < 2**15 else 4) + 4


def open_cache(path: Path, fp: dict, *, epochs: int, images: int, num_classes: int) -> dict:
    """The meta of the cache at ``path``: a new one (files allocated), or an existing one with the same
    fingerprint and shape (a resumed run)."""
    path.mkdir(parents=True, exist_ok=True)
    if (path / META).is_file():
        meta = check_fingerprint(path, fp, epochs=0)
        if meta["fingerprint"]["topk"] != fp["topk"] or meta["images"] != images or meta["epochs"] != epochs:
            raise UserError(f"--out {path}: holds a cache of another shape (topk {meta['fingerprint']['topk']}, "
                            f"{meta['epochs']} epochs); choose another --out")
        return meta
    meta = {"version": VERSION, "fingerprint": fp, "epochs": epochs, "images": images, "topk": fp["topk"],
            "num_classes": num_classes, "epochs_done": 0}
    for array in _arrays(path, meta, "w+"):
        array.flush()
    atomic_write_text(path / META, json.dumps(meta, indent=2))
    return meta


def fill_cache(path: str | Path, teacher: Callable[[torch.Tensor], torch.Tensor], source: Any, fp: dict, *,
               epochs: int, images: int, num_classes: int, device: torch.device | str = "cpu",
               autocast_dtype: torch.dtype | None = None, progress: Callable[[int, int, float], None] | None = None,
               rank: int = 0, barrier: Callable[[], None] | None = None) -> dict:
    """Run ``teacher`` over ``epochs`` epochs of ``source`` (a :class:`SeededSource` without dropped images)
    and store the top-K of each view. Resumes after the last finished epoch. Under torchrun each rank's
    source is its shard; the rows are disjoint, so ranks write the same files; rank 0 writes the meta.

    ``progress(epoch, images_done, images_per_s)`` is called after every batch.
    """
    path = Path(path)
    device = torch.device(device)
    meta = open_cache(path, fp, epochs=epochs, images=images, num_classes=num_classes) if rank == 0 else None
    if barrier is not None:
        barrier()
    meta = meta or read_meta(path)
    values, indices, lse = _arrays(path, meta, "r+")
    topk = meta["topk"]
    for epoch in range(meta["epochs_done"], epochs):
        source.set_epoch(epoch)
        done, start = 0, time.perf_counter()
        for batch, _, extras in source:
            with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                                                 enabled=autocast_dtype is not None):
                logits = teacher(batch.to(device, non_blocking=True)).float()
            top, norm = logits.topk(topk, dim=1), torch.logsumexp(logits, dim=1)
            rows = extras["key"][:, 1].numpy()
            values[epoch, rows] = (top.values - norm[:, None]).cpu().numpy().astype(np.float16)
            indices[epoch, rows] = top.indices.cpu().numpy().astype(indices.dtype)
            lse[epoch, rows] = norm.cpu().numpy()
            done += len(rows)
            if progress is not None:
                progress(epoch, done, done / max(time.perf_counter() - start, 1e-9))
        for array in (values, indices, lse):
            array.flush()
        if barrier is not None:
            barrier()
        meta["epochs_done"] = epoch + 1
        if rank == 0:
            atomic_write_text(path / META, json.dumps(meta, indent=2))
    return meta


def rebuild_logits(values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Full logits from the top-K log-probabilities ``values``: softmax gives the stored classes their own
    probability and spreads the mass left over uniformly over the other ``num_classes - K`` classes (TinyViT);
    adding ``lse`` puts them back on the teacher's logit scale."""
    log_p, lse = values.float(), lse.float()
    topk = log_p.shape[1]
    out = torch.empty(log_p.shape[0], num_classes, dtype=torch.float32, device=log_p.device)
    if topk < num_classes:
        kept = torch.exp(log_p).sum(1).clamp(max=1.0 - 1e-6)
        rest = ((1.0 - kept) / (num_classes - topk)).clamp_min(1e-12)
        out[:] = torch.log(rest)[:, None]
    return out.scatter_(1, indices.long(), log_p) + lse[:, None]


class CachedTeacher(nn.Module):
    """A teacher read from a logit cache: ``logits(images, extras)`` looks up ``extras["key"]``."""

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self.values, self.indices, self.lse = _arrays(self.path, self.meta, "r")

    @property
    def fingerprint(self) -> dict:
        return self.meta["fingerprint"]

    def logits(self, images: torch.Tensor, extras: Mapping[str, Any] | None = None) -> torch.Tensor:
        if extras is None or "key" not in extras:
            # e.g. uvc's official post-training feeds the teacher mixed images, which the cache never saw
            raise UserError(f"--logit-cache {self.path}: this recipe runs its teacher on images other than the "
                            f"cached training views; run it without --logit-cache")
        key = extras["key"].cpu().numpy()
        epoch, rows = key[:, 0], key[:, 1]
        if epoch.max(initial=0) >= self.meta["epochs_done"]:
            raise UserError(f"--logit-cache {self.path}: holds {self.meta['epochs_done']} epochs, "
                            f"the run reached epoch {int(epoch.max()) + 1}")
        as_tensor = lambda array: torch.from_numpy(np.ascontiguousarray(array[epoch, rows]))  # noqa: E731
        logits = rebuild_logits(as_tensor(self.values), as_tensor(self.indices), as_tensor(self.lse),
                                self.meta["num_classes"])
        return logits.to(images.device, non_blocking=True)

    def features(self, images: torch.Tensor, points: Any):
        raise UserError(f"--logit-cache {self.path}: this recipe needs teacher features; a logit cache holds "
                        f"logits only (run without --logit-cache)")


def replay_loader(split: Any, transform: Callable, *, seed: int, batch_size: int, rank: int = 0,
                  world_size: int = 1, workers: int = 0):
    """Every image of this rank's shard, epoch by epoch, in the views training sees (no batch dropped)."""
    from torch.utils.data import DataLoader

    from vitshrink.data.sources import EpochSampler, SeededAugmentation, collate_keyed, with_transform

    class _Source:
        def __init__(self):
            self.sampler = EpochSampler(len(split), seed=seed, rank=rank, world_size=world_size)
            self.loader = DataLoader(SeededAugmentation(with_transform(split, transform), seed), batch_size=batch_size,
                                     sampler=self.sampler, num_workers=workers, collate_fn=collate_keyed)

        def set_epoch(self, epoch: int) -> None:
            self.sampler.set_epoch(epoch)

        def __iter__(self):
            return iter(self.loader)

    return _Source()


def run_fingerprint(teacher: nn.Module, split: Any, model_data_config: Mapping[str, Any],
                    cfg: Mapping[str, Any], *, seed: int, topk: int) -> dict:
    """The fingerprint of a run that distils ``teacher`` on ``split`` with views for ``model_data_config``
    and ``cfg``."""
    return fingerprint(teacher_hash=teacher_hash(teacher), data_listing=listing_hash(split),
                       augmentation=augmentation_settings(cfg), seed=seed,
                       input_size=tuple(model_data_config["input_size"]), mean=tuple(model_data_config["mean"]),
                       std=tuple(model_data_config["std"]), topk=topk)


def cache_logits(teacher: nn.Module, split: Any, out: str | Path, *, cfg: Mapping[str, Any],
                 epochs: int, topk: int, seed: int, num_classes: int, device: str = "cpu",
                 progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Fill (or resume) the cache at ``out`` with ``teacher``'s top-``topk`` logits for ``epochs`` epochs of
    ``split``'s training views (settings ``cfg``). Returns the cache's meta."""
    from vitshrink.data.sources import train_transform
    from vitshrink.distill.teachers import LiveTeacher
    from vitshrink.io import data_config
    import os

    from vitshrink.validate import check_seed

    check_seed(seed)
    if not 1 <= topk <= num_classes:
        raise UserError(f"--topk must be between 1 and {num_classes} (the teacher's classes), got {topk}")
    if epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {epochs}")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    barrier = None
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device == "cuda" else "gloo")
        barrier = dist.barrier
    dcfg = data_config(teacher)
    fp = run_fingerprint(teacher, split, dcfg, cfg, seed=seed, topk=topk)
    teacher = teacher.to(device)
    live = LiveTeacher(teacher, dcfg)
    source = replay_loader(split, train_transform(teacher, dict(cfg)), seed=seed, batch_size=int(cfg["batch_size"]),
                           rank=rank, world_size=world)
    autocast = torch.bfloat16 if device == "cuda" else None
    return fill_cache(out, live.logits, source, fp, epochs=epochs, images=len(split), num_classes=num_classes,
                      device=device, autocast_dtype=autocast, progress=progress, rank=rank, barrier=barrier)
