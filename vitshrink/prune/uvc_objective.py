"""UVC's training objectives: the official search/post-training loss and vitshrink's pure-KD alternative.

``official`` (VITA-Group/UVC ``joint_train.py`` + ``utils/losses.py``, the DeiT ``DistillationLoss``):
``(1 - alpha) * SoftTargetCE(student(x~), y~) + alpha * T^2 * sum KL(p_t(x~) || p_s(x~)) / numel`` where
``x~, y~`` are mixup/cutmix images and label-smoothed soft targets (timm ``Mixup``, 0.8 / 1.0, smoothing 0.1),
the teacher also sees ``x~``, ``alpha = 0.1`` (``run_uvc_train.sh --distillation-alpha 0.1``) and ``T = 1``
(``--distillation-tau`` default). ``numel = B * K``, so the KD term is ``1/K`` of a batch-mean KL: the loss is
about 99% label loss on CIFAR-10.

``kd``: ``T^2 KL`` batch-mean at ``T = 4`` on the clean images, no labels (``vitshrink.distill.losses.kd_loss``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitshrink.distill import losses

__all__ = ["OFFICIAL_MIXUP", "OfficialLoss", "official_loss", "make_mixup", "SEARCH_OBJECTIVES"]

# joint_train.py argparse defaults: --mixup 0.8 --cutmix 1.0 --mixup-prob 1.0 --mixup-switch-prob 0.5
# --mixup-mode batch --smoothing 0.1.
OFFICIAL_MIXUP = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                      label_smoothing=0.1)

# Search settings each objective implies where the preset leaves them ``null`` (sources in recipes/uvc.yaml).
SEARCH_OBJECTIVES = {
    "official": dict(weight_decay=0.05, warmup_fraction=5 / 30, warmup_keep=0.5, gate_interval=100,
                     gate_weight_decay=1e-4, gate_init=2.0, gates_in_weight_optimizer=True),
    "kd": dict(weight_decay=0.0, warmup_fraction=0.0, warmup_keep=0.5, gate_interval=1, gate_weight_decay=0.0,
               gate_init=3.0, gates_in_weight_optimizer=False),
}


def official_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, soft_targets: torch.Tensor, *,
                  alpha: float = 0.1, tau: float = 1.0) -> dict[str, torch.Tensor]:
    """DeiT's soft ``DistillationLoss`` as UVC runs it: label term on soft (mixup) targets, KL summed / numel."""
    base = torch.sum(-soft_targets * F.log_softmax(student_logits, dim=-1), dim=-1).mean()
    kl = F.kl_div(F.log_softmax(student_logits / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                  reduction="sum", log_target=True) * (tau * tau) / student_logits.numel()
    return {"loss": base * (1 - alpha) + kl * alpha, "task_loss": base.detach(), "kd_loss": kl.detach()}


def make_mixup(num_classes: int):
    """timm's ``Mixup`` with the official settings."""
    from timm.data import Mixup

    return Mixup(num_classes=int(num_classes), **OFFICIAL_MIXUP)


@dataclass
class OfficialLoss:
    """Mixup the batch, run the teacher on the mixed images, and apply ``official_loss``."""

    num_classes: int
    alpha: float = 0.1
    tau: float = 1.0

    def __post_init__(self):
        self.mixup = make_mixup(self.num_classes)

    def mix(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed images and soft targets; an odd batch loses its last image (timm's batch mixup pairs images)."""
        if len(images) % 2:
            images, targets = images[:-1], targets[:-1]
        return self.mixup(images, targets)

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 soft_targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return official_loss(student_logits, teacher_logits, soft_targets, alpha=self.alpha, tau=self.tau)


def kd_search_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, *,
                   kd_weight: float, temperature: float) -> dict[str, torch.Tensor]:
    """vitshrink's search loss: ``losses.kd_loss`` (pure ``T^2 KL`` at ``kd_weight = 1``)."""
    return losses.kd_loss(student_logits, teacher_logits, targets, kd_weight=kd_weight, temperature=temperature)
