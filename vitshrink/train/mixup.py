"""Mixup / cutmix of training batches through timm's ``Mixup``, drawn per batch so that training stays resumable.

timm's ``Mixup`` (1.0.x) draws ``lam``, the mixup-or-cutmix switch and the cutmix box from numpy's *global*
RNG (``np.random.rand`` / ``beta`` / ``randint``; no python ``random``, no torch RNG). :class:`SeededMixup` seeds
that RNG for each batch from the run seed and the batch's ``extras["key"]`` (each image's ``(epoch, index)``,
:mod:`vitshrink.data.sources`) and puts the global state back afterwards, so a batch is mixed the same way
whenever and on whichever rank it is drawn, and a resumed run mixes exactly as an uninterrupted one.

Label smoothing is not given to ``Mixup`` (``label_smoothing=0``): the tasks apply their own ``smoothing`` to the
mixed targets (``F.cross_entropy`` smooths probability targets as ``(1 - e) y + e / K``). Smoothing is linear,
so this equals the official ``Mixup(label_smoothing=e)`` + ``SoftTargetCrossEntropy`` (DeiT main.py,
co-advise main.py) up to float rounding, and each recipe keeps one smoothing key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from vitshrink.errors import UserError

# The shared preset keys (recipes/base.yaml), named as DeiT's main.py flags.
MIXUP_KEYS = ("mixup", "cutmix", "mixup_prob", "mixup_switch_prob", "mixup_mode")


@dataclass
class SeededMixup:
    """timm ``Mixup`` whose random draw comes from ``(seed, batch keys)``; ``__call__`` mixes one batch."""

    mixup_alpha: float
    cutmix_alpha: float
    prob: float
    switch_prob: float
    mode: str
    num_classes: int
    seed: int
    mixup: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from timm.data import Mixup

        self.mixup = Mixup(mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha, prob=self.prob,
                           switch_prob=self.switch_prob, mode=self.mode, label_smoothing=0.0,
                           num_classes=self.num_classes)

    def describe(self) -> str:
        return (f"mixup {self.mixup_alpha:g} / cutmix {self.cutmix_alpha:g} (prob {self.prob:g}, switch "
                f"{self.switch_prob:g}, mode {self.mode})")

    def batch_seed(self, keys: torch.Tensor) -> np.ndarray:
        """The numpy seed of a batch: the run seed and every image's (epoch, index), hashed by SeedSequence."""
        entropy = [int(self.seed), *(int(v) for v in keys.reshape(-1).tolist())]
        return np.random.SeedSequence(entropy).generate_state(4)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, extras: Mapping[str, Any]
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Mixed images, soft targets [B, K] (rows sum to 1) and the extras of the images kept.

        timm pairs image i with image B-1-i, so an odd batch (an unreadable image was skipped) loses its last
        image, as the official UVC code does. ``images`` is mixed in place (timm does so).
        """
        extras = dict(extras)
        keys = extras["key"]
        if len(images) % 2:
            images, targets, keys = images[:-1], targets[:-1], keys[:-1]
            extras["key"] = keys
        if len(images) == 0:
            raise UserError("mixup: a batch with fewer than two readable images cannot be mixed")
        saved = np.random.get_state()
        try:
            np.random.seed(self.batch_seed(keys))
            mixed, soft = self.mixup(images, targets)
        finally:
            np.random.set_state(saved)
        return mixed, soft, extras


def mixup_from_settings(cfg: Mapping[str, Any], *, num_classes: int, seed: int) -> SeededMixup | None:
    """The run's mixer, or None when ``mixup`` and ``cutmix`` are both 0 (off, as DeiT's ``mixup_active``)."""
    mixup_alpha, cutmix_alpha = float(cfg.get("mixup") or 0.0), float(cfg.get("cutmix") or 0.0)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    return SeededMixup(mixup_alpha, cutmix_alpha, float(cfg["mixup_prob"]), float(cfg["mixup_switch_prob"]),
                       str(cfg["mixup_mode"]), int(num_classes), int(seed))


def takes_soft_targets(task: Any) -> bool:
    """Whether ``task`` accepts probability targets [B, K]: declared by ``task.soft_targets`` (vitshrink's
    distillation tasks), else a timm ``ClassificationTask`` whose criterion is a cross-entropy that takes them."""
    declared = getattr(task, "soft_targets", None)
    if declared is not None:
        return bool(declared)
    from timm.loss import SoftTargetCrossEntropy

    return isinstance(getattr(task, "criterion", None), (nn.CrossEntropyLoss, SoftTargetCrossEntropy))


def check_mixup_allowed(task: Any, cfg: Mapping[str, Any], *, recipe: str, uses_labels: bool) -> None:
    """Refuse mixup where it cannot work, in one line naming the key. (Mixup with --logit-cache is refused
    earlier, before any teacher is loaded: ``vitshrink.data.logit_cache.check_replayable``.)"""
    key = "mixup" if float(cfg.get("mixup") or 0.0) > 0 else "cutmix"
    flag = f"--{key} {cfg.get(key)}"
    if not uses_labels:
        raise UserError(f"{flag}: recipe {recipe} trains without labels, and mixup/cutmix mixes labels; "
                        "set --mixup 0 --cutmix 0")
    if not takes_soft_targets(task):
        reason = getattr(task, "soft_targets_reason", "its loss takes class indices, not mixed [B, K] targets")
        raise UserError(f"{flag}: the {recipe} recipe's training task cannot take mixup/cutmix ({reason}); "
                        "set --mixup 0 --cutmix 0")
