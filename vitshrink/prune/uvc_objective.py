"""UVC's training objectives: the official search/post-training loss and vitshrink's pure-KD alternative.

``official`` (VITA-Group/UVC ``joint_train.py`` + ``utils/losses.py``, the DeiT ``DistillationLoss``):
``(1 - alpha) * SoftTargetCE(student(x~), y~) + alpha * T^2 * sum KL(p_t(x~) || p_s(x~)) / numel`` where
``x~, y~`` are mixup/cutmix images and label-smoothed soft targets (timm ``Mixup``, 0.8 / 1.0, smoothing 0.1),
the teacher also sees ``x~``, ``alpha = 0.1`` (``run_uvc_train.sh --distillation-alpha 0.1``) and ``T = 1``
(``--distillation-tau`` default). ``numel = B * K``, so the KD term is ``1/K`` of a batch-mean KL: the loss is
about 99% label loss on CIFAR-10.

``kd``: KL from the teacher on the clean images, no labels, made scale-free (``TeacherScale``): both logits are
divided by the teacher's own logit spread (the standard deviation of its per-image centred logits on the first search
batch) times a relative temperature, and the KL is divided by the teacher's KL to the uniform prediction at that
temperature, so 0 is the teacher and 1 is "as far from it as a constant guess" on every teacher (vitshrink's; the
official loss is not normalised).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["OFFICIAL_MIXUP", "OfficialLoss", "official_loss", "make_mixup", "SEARCH_OBJECTIVES", "TeacherScale",
           "relative_kd_loss"]

# joint_train.py argparse defaults: --mixup 0.8 --cutmix 1.0 --mixup-prob 1.0 --mixup-switch-prob 0.5
# --mixup-mode batch --smoothing 0.1.
OFFICIAL_MIXUP = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                      label_smoothing=0.1)

# Search settings each objective implies where the preset leaves them ``null`` (sources in recipes/uvc.yaml).
# ``official`` also keeps UVC's unbounded dual, no stop and no restart (the official loss is not scale-free, so a
# loss limit would mean nothing); ``kd`` gets vitshrink's safeguards (vitshrink/prune/uvc_health.py).
SEARCH_OBJECTIVES = {
    "official": dict(weight_decay=0.05, warmup_fraction=5 / 30, warmup_keep=0.5, gate_interval=100,
                     gate_weight_decay=1e-4, gate_init=2.0, gates_in_weight_optimizer=True, z_bound=math.inf,
                     z_reset=False, patience=0, loss_limit=math.inf, runaway=math.inf, max_restarts=0, relative_duals=False,
                     z_penalty=0.0),
    "kd": dict(weight_decay=0.0, warmup_fraction=0.0, warmup_keep=0.5, gate_interval=1, gate_weight_decay=0.0,
               gate_init=3.0, gates_in_weight_optimizer=False, z_bound=10.0, z_reset=True, patience=20,
               loss_limit=1.0, runaway=0.2, max_restarts=3, relative_duals=True,
               z_penalty=20.0),
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


@dataclass(frozen=True)
class TeacherScale:
    """The teacher's own logit statistics that make the ``kd`` search loss scale-free.

    ``spread``: standard deviation of the teacher's logits after centring each image's logits (softmax ignores a
    per-image shift); ``chance``: the teacher's mean ``KL(p_t || uniform)`` at ``spread * temperature``, i.e. the
    loss of a student that predicts nothing.
    """

    spread: float
    chance: float
    temperature: float

    @classmethod
    def of(cls, teacher_logits: torch.Tensor, temperature: float = 1.0) -> "TeacherScale":
        logits = teacher_logits.detach().double()
        centred = logits - logits.mean(dim=1, keepdim=True)
        spread = max(float(centred.pow(2).mean().sqrt()), 1e-6)
        log_p = F.log_softmax(logits / (spread * temperature), dim=1)
        # KL(p || uniform) = log K - H(p)
        chance = float((log_p.exp() * log_p).sum(1).mean()) + math.log(logits.shape[1])
        return cls(spread=spread, chance=max(chance, 1e-6), temperature=float(temperature))


def relative_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     scale: TeacherScale) -> dict[str, torch.Tensor]:
    """``KL(p_t || p_s) / chance`` with both logits divided by ``spread * temperature`` (batch mean)."""
    t = scale.spread * scale.temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                  reduction="batchmean", log_target=True)
    loss = kl / scale.chance
    return {"loss": loss, "task_loss": loss.new_zeros(()), "kd_loss": loss.detach()}


def kd_search_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, *,
                   kd_weight: float, scale: TeacherScale) -> dict[str, torch.Tensor]:
    """vitshrink's search loss: ``relative_kd_loss``; with ``kd_weight < 1`` plus ``(1 - kd_weight)`` times the
    label cross-entropy divided by ``log K`` (a uniform guess's), so both terms are on the same scale."""
    out = relative_kd_loss(student_logits, teacher_logits, scale)
    if kd_weight >= 1.0:
        return out
    ce = F.cross_entropy(student_logits, targets) / math.log(student_logits.shape[1])
    return {"loss": kd_weight * out["loss"] + (1 - kd_weight) * ce, "task_loss": ce.detach(),
            "kd_loss": out["kd_loss"]}
