"""DeiT soft distillation vs a reference transcription of the official loss (facebookresearch/deit)."""
import pytest
import torch
import torch.nn.functional as F

from vitshrink.distill import losses
from vitshrink.distill.tasks import token_distillation_loss


# --- Reference transcription (facebookresearch/deit, losses.py, DistillationLoss.forward, soft branch) ---
def official_deit_soft(outputs, outputs_kd, labels, teacher_outputs, alpha, tau, base_criterion):
    base_loss = base_criterion(outputs, labels)
    T = tau
    distillation_loss = F.kl_div(
        F.log_softmax(outputs_kd / T, dim=1),
        F.log_softmax(teacher_outputs / T, dim=1),
        reduction='sum',
        log_target=True
    ) * (T * T) / outputs_kd.numel()
    return base_loss * (1 - alpha) + distillation_loss * alpha, distillation_loss
# --- end of reference transcription ---


def _fixed(b=6, k=10):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, k, generator=g, dtype=torch.float64) * 3,
            torch.randn(b, k, generator=g, dtype=torch.float64) * 3,
            torch.randn(b, k, generator=g, dtype=torch.float64) * 3,
            torch.randint(0, k, (b,), generator=g))


def test_deit_soft_loss_matches_official_numel_reduction():
    cls, dist, teacher, labels = _fixed()
    alpha, tau = 0.1, 3.0
    ref_total, ref_kd = official_deit_soft(cls, dist, labels, teacher, alpha, tau,
                                           torch.nn.CrossEntropyLoss(label_smoothing=0.1))
    ours_kd = token_distillation_loss(dist, teacher, "soft", tau, "numel")
    ours_total = (1 - alpha) * losses.cross_entropy(cls, labels, 0.1) + alpha * ours_kd
    assert (ours_kd - ref_kd).abs().item() < 1e-12
    assert (ours_total - ref_total).abs().item() < 1e-12
    # batchmean is the same sum divided by B instead of B*K: K (=10) times larger.
    assert torch.allclose(token_distillation_loss(dist, teacher, "soft", tau, "batchmean"), ref_kd * 10)


def test_kd_kl_rejects_unknown_reduction():
    cls, dist, teacher, _ = _fixed()
    with pytest.raises(ValueError, match="batchmean or numel"):
        losses.kd_kl(dist, teacher, 3.0, "mean")


def test_cross_entropy_accepts_soft_targets():
    cls, _, _, labels = _fixed()
    one_hot = F.one_hot(labels, 10).to(cls.dtype)
    assert torch.allclose(losses.cross_entropy(cls, one_hot), losses.cross_entropy(cls, labels))
    mixed = 0.7 * one_hot + 0.3 * one_hot.roll(1, 0)
    expected = -(mixed * F.log_softmax(cls, -1)).sum(-1).mean()
    assert torch.allclose(losses.cross_entropy(cls, mixed), expected)


def test_cnn_teacher_gets_derived_deit_tiny_student_with_note():
    from vitshrink.io import create_model, set_data_config
    from vitshrink.recipes.base import RecipeContext
    from vitshrink.recipes.deit import DeiT

    # resnet18 at 224 px (1.8 GMACs) costs more than DeiT-Tiny (1.3): a cheaper CNN is refused (test_families.py).
    teacher = create_model("resnet18", num_classes=10)
    set_data_config(teacher, input_size=(3, 224, 224))
    notes: list[str] = []
    ctx = RecipeContext(cfg={"init_from_teacher": True}, device=torch.device("cpu"), data=None,
                        train_loader=lambda *a, **k: None, log=notes.append)
    student = DeiT().build_student(teacher, None, ctx)
    assert student.embed_dim == 192 and len(student.blocks) == 12
    assert student.blocks[0].attn.num_heads == 3
    assert student.blocks[0].mlp.fc1.out_features == 4 * 192
    assert tuple(student.patch_embed.patch_size) == (16, 16) and tuple(student.patch_embed.grid_size) == (14, 14)
    assert student.num_classes == 10 and hasattr(student, "dist_token")
    assert len(notes) == 1 and "DeiT-Tiny" in notes[0] and "patch 16" in notes[0] and "GMACs" in notes[0]
    student.set_distilled_training(True)
    cls_logits, dist_logits = student(torch.randn(2, 3, 224, 224))
    assert cls_logits.shape == dist_logits.shape == (2, 10)
