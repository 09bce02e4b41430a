"""Labelled image data: ImageFolder directories or tars, the bundled CIFAR-10 subset, transforms, loaders.

Reading is timm's (its folder and tar readers); vitshrink adds split discovery, a seeded stratified
hold-out, and a loader that skips unreadable images and counts them instead of failing.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vitshrink.data.classes import match_classes
from vitshrink.data.images import IMAGE_EXTENSIONS, decode_image, safe_member_name
from vitshrink.errors import UserError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED_TRAIN = ASSETS / "cifar10_train_5k.tar"
BUNDLED_VAL = ASSETS / "cifar10_test_1k.tar"
SPLIT_NAMES_TRAIN = ("train",)
SPLIT_NAMES_VAL = ("val", "validation", "test")


def _open_reader(path: Path):
    """A timm reader over an ImageFolder directory or tar, or a UserError saying why not."""
    from timm.data.readers import create_reader
    from timm.data.readers.img_extensions import add_img_extensions, get_img_extensions

    missing = sorted(IMAGE_EXTENSIONS - set(get_img_extensions()))
    if missing:  # .tif/.gif/.webp... would be skipped without a count otherwise
        add_img_extensions(tuple(missing))
    if not path.exists():
        raise UserError(f"{path}: data path not found")
    if path.is_file() and not path.name.endswith(".tar"):
        raise UserError(f"{path}: expected an ImageFolder directory or a .tar in ImageFolder layout")
    try:
        reader = create_reader("", root=str(path))
    except ValueError as exc:  # timm's tar reader unpacks an empty sample list
        if "unpack" not in str(exc):
            raise UserError(f"{path}: cannot read as an image folder ({type(exc).__name__}: {exc})") from None
        raise UserError(f"{path}: no images found (expected <class>/<image> layout)") from None
    except Exception as exc:  # timm raises RuntimeError/AssertionError/TarError for bad roots
        raise UserError(f"{path}: cannot read as an image folder ({type(exc).__name__}: {exc})") from None
    reader.unsafe_members = _drop_unsafe_members(reader)
    reader.repeated_files = _drop_repeated_files(reader, path)
    if len(reader) == 0:
        raise UserError(f"{path}: no images found (expected <class>/<image> layout)")
    return reader


def _drop_repeated_files(reader, root: Path) -> int:
    """A folder reader follows symlinks: keep each real file once (a loop lists it many times) and only files
    inside ``root``; return how many entries were dropped (counted with the unreadable images)."""
    samples = getattr(reader, "samples", None)
    if not isinstance(samples, list) or not samples or not isinstance(samples[0][0], str):
        return 0
    base = os.path.realpath(root)
    seen: set[str] = set()
    kept = []
    # The shortest name of each real file wins (its own, not one through a loop or a second link).
    reals = [os.path.realpath(path) for path, _ in samples]
    order = sorted(range(len(samples)), key=lambda i: (reals[i] != os.path.abspath(samples[i][0]),
                                                       len(samples[i][0]), samples[i][0]))
    for index in order:
        real = reals[index]
        if real in seen or not real.startswith(base.rstrip(os.sep) + os.sep):
            continue
        seen.add(real)
        kept.append(index)
    keep = [samples[i] for i in sorted(kept)]
    if len(keep) < len(samples):
        from timm.utils.misc import natural_key  # timm's class order

        names = {index: name for name, index in reader.class_to_idx.items()}
        labels = [names[int(target)] for _, target in keep]
        reader.class_to_idx = {name: i for i, name in enumerate(sorted(set(labels), key=natural_key))}
        reader.samples = [(path, reader.class_to_idx[label]) for (path, _), label in zip(keep, labels)]
    return len(samples) - len(keep)


def _drop_unsafe_members(reader) -> int:
    """Remove tar members whose names leave the archive's tree ('../x/y.jpg', '/abs/y.jpg') or have no class
    folder, and renumber the classes of the rest; return how many were removed.

    timm names a class by the member's parent folder, so such members would otherwise become classes and
    shift every label index.
    """
    samples = getattr(reader, "samples", None)
    names = getattr(reader, "class_idx_to_name", None)
    if samples is None or names is None or not hasattr(reader, "class_name_to_idx") or len(samples) == 0:
        return 0  # not timm's tar reader: folder readers list real files only
    import numpy as np
    from timm.utils.misc import natural_key  # timm's class order

    def safe(sample) -> bool:
        member, _, child = sample
        if child is not None:  # a member of a per-class tar inside the tar: the child names the class
            return safe_member_name(f"{child.name}/{member.name}") and safe_member_name(f"x/{member.name}")
        return safe_member_name(member.name)

    keep = [i for i, sample in enumerate(samples) if safe(sample)]
    dropped = len(samples) - len(keep)
    if dropped == 0:
        return 0
    labels = [names[int(reader.targets[i])] for i in keep]
    new_names = sorted(set(labels), key=natural_key)
    reader.class_name_to_idx = {name: index for index, name in enumerate(new_names)}
    reader.class_idx_to_name = dict(enumerate(new_names))
    reader.samples = samples[keep] if keep else samples[:0]
    reader.targets = np.array([reader.class_name_to_idx[label] for label in labels], dtype=np.int64)
    return dropped


def unsafe_member_count(split: "ImageSplit") -> int:
    """Tar members of ``split``'s reader skipped for unsafe names (counted with the unreadable images)."""
    return int(getattr(split.reader, "unsafe_members", 0) or 0)


def _class_names(reader) -> list[str]:
    # timm's folder reader calls it class_to_idx, its tar reader class_name_to_idx.
    mapping = getattr(reader, "class_to_idx", None) or reader.class_name_to_idx
    return [name for name, _ in sorted(mapping.items(), key=lambda item: item[1])]


def reader_targets(reader) -> list[int]:
    """The class index of every sample of a timm reader, without decoding any image."""
    targets = getattr(reader, "targets", None)
    if targets is not None:
        return [int(t) for t in targets]
    return [int(t) for _, t in reader.samples]


def _forget_open_files(reader) -> None:
    """Drop tar handles inherited from a parent process (a shared file offset corrupts reads)."""
    state = getattr(reader, "tar_state", None)
    if state is None:
        return
    states = [state] if getattr(reader, "root_is_tar", False) else list(state.values())
    for item in states:
        item.tf = None
        for child in (getattr(item, "children", None) or {}).values():
            child.tf = None


class ImageSplit(Dataset):
    """A view of some samples of a timm reader with its own transform.

    ``__getitem__`` returns ``None`` for an unreadable image so that the loader can skip and count it.
    """

    def __init__(self, reader, indices: Sequence[int] | None = None, transform: Callable | None = None,
                 img_mode: str = "RGB", target_map: Sequence[int] | None = None):
        self.reader = reader
        # target_map[i]: the class index reported for the reader's class i (aligns a subset of classes
        # with a validation set that has them all).
        self.target_map = list(target_map) if target_map is not None else None
        self.indices = list(range(len(reader))) if indices is None else list(indices)
        self.transform = transform
        self.img_mode = img_mode
        self._pid = os.getpid()
        self._all_targets = reader_targets(reader)
        if self.target_map is not None:
            self._all_targets = [self.target_map[t] for t in self._all_targets]

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def class_names(self) -> list[str]:
        """The reader's class folders (before any ``target_map``)."""
        return _class_names(self.reader)

    def remapped(self, mapping: Sequence[int]) -> "ImageSplit":
        """The same images with each reported class ``c`` reported as ``mapping[c]``."""
        reader_classes = len(_class_names(self.reader))
        base = self.target_map if self.target_map is not None else list(range(reader_classes))
        return ImageSplit(self.reader, self.indices, self.transform, self.img_mode, [mapping[c] for c in base])

    @property
    def targets(self) -> list[int]:
        return [self._all_targets[i] for i in self.indices]

    def filename(self, index: int) -> str:
        return self.reader.filename(self.indices[index])

    def __getitem__(self, index: int):
        if os.getpid() != self._pid:
            _forget_open_files(self.reader)
            self._pid = os.getpid()
        try:
            fileobj, target = self.reader[self.indices[index]]
        except Exception:  # noqa: BLE001  (tarfile/OS errors on a damaged archive: skip the image)
            return None
        img, _ = decode_image(fileobj, self.img_mode)  # 16-bit scaled; bombs, corrupt data: None
        if img is None:
            return None
        if self.transform is not None:
            img = self.transform(img)
        if self.target_map is not None:
            target = self.target_map[int(target)]
        return img, int(target)


@dataclass
class LabelledData:
    """Train and validation splits of one labelled data set.

    ``val`` is None only for a data-free run without ``--val-data`` (nothing labelled to measure on);
    ``synthetic`` describes a synthesised training set (folder, images, prior), None for real images.
    """

    train: ImageSplit | None
    val: ImageSplit | None
    class_names: list[str]
    description: str
    note: str | None = None
    synthetic: dict | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def matched_to(self, model_names: Sequence[str] | None, what: str) -> "LabelledData":
        """Labels matched to a model's class names by name, so label i is the model's logit i."""
        mapping = match_classes(self.class_names, model_names, None, what)
        if mapping is None:
            return self
        names = [""] * len(model_names)
        for data_index, model_index in enumerate(mapping):
            names[model_index] = self.class_names[data_index]
        return dataclasses.replace(self, train=self.train.remapped(mapping) if self.train is not None else None,
                                   val=self.val.remapped(mapping) if self.val is not None else None,
                                   class_names=names)


def stratified_holdout(targets: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into (train, val) keeping each class's share; at least one val image per class."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"--val-split must be in (0, 1), got {fraction}")
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(int(target), []).append(index)
    rng = random.Random(seed)
    train, val = [], []
    for cls in sorted(by_class):
        members = by_class[cls][:]
        rng.shuffle(members)
        # Every class with 2+ images keeps a validation image and a training image.
        n_val = min(len(members) - 1, max(1, math.ceil(fraction * len(members)))) if len(members) > 1 else 0
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return sorted(train), sorted(val)


def _find_split_dirs(root: Path) -> tuple[Path | None, Path | None]:
    if not root.is_dir():
        return None, None
    train = next((root / n for n in SPLIT_NAMES_TRAIN if (root / n).is_dir()), None)
    val = next((root / n for n in SPLIT_NAMES_VAL if (root / n).is_dir()), None)
    return train, val


def resolve_data(
    data: str | os.PathLike | None = None,
    val_data: str | os.PathLike | None = None,
    *,
    val_split: float = 0.1,
    seed: int = 0,
    in_chans: int = 3,
) -> LabelledData:
    """Find the train/val splits of ``data`` (default: the bundled CIFAR-10 subset).

    A root with ``train/`` and ``val/`` (or ``validation/``, ``test/``) uses those; ``val_data`` names a
    separate validation set; otherwise a seeded stratified hold-out of ``val_split`` is taken.
    """
    img_mode = "L" if in_chans == 1 else "RGB"
    if data is None and val_data is None:
        train_reader, val_reader = _open_reader(BUNDLED_TRAIN), _open_reader(BUNDLED_VAL)
        return LabelledData(
            ImageSplit(train_reader, img_mode=img_mode), ImageSplit(val_reader, img_mode=img_mode),
            _class_names(train_reader), "bundled CIFAR-10 (train_5k / test_1k)")
    root = Path(data) if data is not None else BUNDLED_TRAIN  # --val-data alone: bundled training images
    train_dir, val_dir = _find_split_dirs(root)
    note = None
    if val_data is not None:
        train_reader = _open_reader(train_dir or root)
        val_reader = _open_reader(Path(val_data))
        train, val = ImageSplit(train_reader, img_mode=img_mode), ImageSplit(val_reader, img_mode=img_mode)
        description = f"{train_dir or root} (validation: {val_data})"
    elif train_dir is not None and val_dir is not None:
        train_reader, val_reader = _open_reader(train_dir), _open_reader(val_dir)
        train, val = ImageSplit(train_reader, img_mode=img_mode), ImageSplit(val_reader, img_mode=img_mode)
        description = f"{root} ({train_dir.name}/ and {val_dir.name}/)"
    else:
        train_reader = _open_reader(root)
        train_idx, val_idx = stratified_holdout(reader_targets(train_reader), val_split, seed)
        train = ImageSplit(train_reader, train_idx, img_mode=img_mode)
        val = ImageSplit(train_reader, val_idx, img_mode=img_mode)
        description = str(root)
        note = (f"{root} has no train/val split: held out {len(val_idx)} of {len(train_reader)} images "
                f"({val_split:.0%}, stratified, seed {seed}) for validation")
    readers = {id(train.reader): train.reader, id(val.reader): val.reader}.values()
    unsafe = sum(int(getattr(r, "unsafe_members", 0) or 0) for r in readers)
    repeated = sum(int(getattr(r, "repeated_files", 0) or 0) for r in readers)
    for count, what in ((unsafe, "tar member(s) with unsafe names (absolute, '..' or no class folder)"),
                        (repeated, "symlinked entries (a second name of a file, a loop, or outside the folder)")):
        if count:
            note = f"{note}; skipped {count} {what}" if note else f"skipped {count} {what}"
    names = _class_names(train_reader)
    val_names = _class_names(val.reader)
    if val_names != names:
        missing = [name for name in names if name not in val_names]
        if missing:
            raise UserError(f"{val_data or val_dir}: has no class folder for training classes {missing[:5]}")
        # Training data with a subset of the classes (e.g. a pseudo-labelled selection): use the
        # validation set's class indices for both.
        train.target_map = [val_names.index(name) for name in names]
        train._all_targets = [train.target_map[t] for t in reader_targets(train.reader)]
        names = val_names
    return LabelledData(train, val, names, description, note)


def resolve_eval_split(
    data: str | os.PathLike | None = None,
    val_data: str | os.PathLike | None = None,
    *,
    in_chans: int = 3,
) -> tuple[ImageSplit, str]:
    """The images to evaluate on: ``val_data``; else the validation split of a root with splits; else the
    whole of ``data`` (an evaluation set needs no hold-out); else the bundled CIFAR-10 test subset."""
    img_mode = "L" if in_chans == 1 else "RGB"
    if val_data is not None:
        return ImageSplit(_open_reader(Path(val_data)), img_mode=img_mode), str(val_data)
    if data is None:
        return ImageSplit(_open_reader(BUNDLED_VAL), img_mode=img_mode), "bundled CIFAR-10 test_1k"
    root = Path(data)
    _, val_dir = _find_split_dirs(root)
    path = val_dir or root
    return ImageSplit(_open_reader(path), img_mode=img_mode), str(path)


def sample_images(model_cfg: dict[str, Any], data: str | os.PathLike | None = None, n: int = 8) -> torch.Tensor:
    """``n`` real images (one per class first) from ``data`` or the bundled set, transformed for a model."""
    split, _ = resolve_eval_split(data, in_chans=int(model_cfg["input_size"][0]))
    return readable_images(split, build_transform(model_cfg, is_training=False), n, what=str(data or BUNDLED_VAL))


def readable_images(split: ImageSplit, transform: Callable, n: int = 8, *, what: str | None = None,
                    max_tries: int = 2048) -> torch.Tensor:
    """The first ``n`` readable images of ``split`` (one per class first) in ``transform``, at least 2.

    Unreadable images are passed over (up to ``max_tries`` looked at), so a validation set whose first
    images are broken still yields a sample; fewer than 2 readable images is a UserError.
    """
    view = ImageSplit(split.reader, split.indices, transform, split.img_mode, split.target_map)
    first_of_class: dict[int, int] = {}
    for index, target in enumerate(view.targets):
        first_of_class.setdefault(target, index)
    firsts = set(first_of_class.values())
    order = list(first_of_class.values()) + [i for i in range(len(view)) if i not in firsts]
    images = []
    for index in order[:max_tries]:
        item = view[index]
        if item is not None:
            images.append(item[0])
        if len(images) == n:
            break
    if len(images) < 2:
        raise UserError(f"{what or 'validation data'}: fewer than 2 readable images among the first "
                        f"{min(len(order), max_tries)} (need real images to check the ONNX export)")
    return torch.stack(images)


def build_transform(cfg: dict[str, Any], is_training: bool = False, **aug: Any) -> Callable:
    """timm's transform for a model's data config (input size, mean/std, interpolation, crop_pct)."""
    from timm.data import create_transform

    keys = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
    kwargs = {k: cfg[k] for k in keys if k in cfg}
    if not is_training:
        kwargs.pop("crop_mode", None) if kwargs.get("crop_mode") is None else None
    kwargs["input_size"] = tuple(kwargs["input_size"])
    in_chans = kwargs["input_size"][0]
    for key in ("mean", "std"):
        if key in kwargs and len(kwargs[key]) != in_chans:
            # A 1-channel model with a 3-value default (or the reverse): use the first value per channel.
            kwargs[key] = tuple(kwargs[key][:1]) * in_chans
    return create_transform(is_training=is_training, **kwargs, **aug)


class SkippingCollate:
    """Collate that drops unreadable samples (``None``) and reports how many were dropped."""

    def __call__(self, batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
        good = [item for item in batch if item is not None]
        skipped = len(batch) - len(good)
        if not good:
            return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
        images = torch.stack([item[0] for item in good])
        targets = torch.tensor([item[1] for item in good], dtype=torch.long)
        return images, targets, skipped


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    workers: int | None = None,
    sampler: Sampler | None = None,
    drop_last: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader yielding ``(images, targets, n_skipped)`` batches."""
    if workers is None:
        workers = min(4, max(0, (os.cpu_count() or 1) - 1))
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        collate_fn=SkippingCollate(),
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        generator=generator,
    )
