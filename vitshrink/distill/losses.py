"""Distillation losses (the seed's section 3.1) as small pure functions of logits.

Conventions, stated once:

* ``kd_kl(s, t, T)`` is ``T**2 * KL(p_t(T) || p_s(T))`` averaged over the batch (Hinton et al. 2015, sec. 2:
  multiplying by T^2 keeps the soft term's gradient magnitude independent of T). Per sample, its gradient
  with respect to student logit ``j`` is ``T * (p_s_j(T) - p_t_j(T))``; the batch mean divides that by B.
  For large T and zero-mean logits this tends to ``(z_s_j - z_t_j) / K`` (K classes): logit matching, i.e.
  the gradient of ``sum_j (z_s_j - z_t_j)^2 / (2K)``, the MSE limit.
* Every loss computes in at least float32 (logits may arrive in bf16 from autocast) and returns a scalar.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _wide(x: torch.Tensor) -> torch.Tensor:
    # Half-precision logits from autocast are widened; float64 stays float64.
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
          reduction: str = "batchmean") -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, summed and divided by the batch size (``batchmean``) or by
    the number of logits, batch x classes (``numel``: DeiT's official reduction, ``K`` times smaller)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in ("batchmean", "numel"):
        raise ValueError(f"KL reduction must be batchmean or numel, got {reduction!r}")
    log_p_s = F.log_softmax(_wide(student_logits) / temperature, dim=-1)
    log_p_t = F.log_softmax(_wide(teacher_logits) / temperature, dim=-1)
    kl_sum = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
    count = student_logits.numel() if reduction == "numel" else student_logits.shape[0]
    return kl_sum / count * temperature**2


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy to class indices [B] or to soft targets [B, K] (probabilities, e.g. from mixup), with
    optional label smoothing (batch mean)."""
    return F.cross_entropy(_wide(logits), target, label_smoothing=smoothing)


def logit_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared error between logits (mean over batch and classes)."""
    return F.mse_loss(_wide(student_logits), _wide(teacher_logits))


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``1 - cos(student, teacher)`` along the last dimension, mean over every other dimension."""
    return (1.0 - F.cosine_similarity(_wide(student), _wide(teacher), dim=-1)).mean()


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None,
    *,
    kd_weight: float,
    temperature: float,
    smoothing: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The convex combination ``(1 - kd_weight) * CE(p_s(1), y) + kd_weight * kd_kl(s, t, T)``.

    ``l1 = 1 - kd_weight`` and ``l2 = kd_weight`` sum to one. With ``kd_weight == 1`` the labels are not
    used at all (``target`` may be None), which is what label-free distillation needs.
    Returns ``{"loss", "task_loss", "kd_loss"}`` (``task_loss`` is zero when it is not computed).
    """
    if not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"kd_weight must be in [0, 1], got {kd_weight}")
    soft = kd_kl(student_logits, teacher_logits, temperature)
    if kd_weight < 1.0:
        if target is None:
            raise ValueError("kd_weight < 1 needs ground-truth targets")
        hard = cross_entropy(student_logits, target, smoothing)
    else:
        hard = soft.new_zeros(())
    return {"loss": (1.0 - kd_weight) * hard + kd_weight * soft, "task_loss": hard.detach(), "kd_loss": soft.detach()}
