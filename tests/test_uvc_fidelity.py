"""UVC against its official code (VITA-Group/UVC): the search loss, a search that stays near its target,
the teacher's weights restored in the kept groups, and the one-shot magnitude plan."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from distill_support import small_data
from vitshrink.data import build_transform, make_loader
from vitshrink.io import data_config, load_model
from vitshrink.prune.decisions import magnitude_plan
from vitshrink.prune.importance import head_norms, mlp_unit_norms
from vitshrink.prune.resource import ResourceModel
from vitshrink.prune.uvc_objective import OfficialLoss, official_loss
from vitshrink.prune.uvc_search import UVCConfig, search_uvc, sliced_student

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------
# Reference transcription (not vitshrink code): VITA-Group/UVC utils/losses.py ``DistillationLoss``
# (DeiT's, with UVC's teacher returning ``(logits, flops_list)``), soft branch, as run by joint_train.py
# with ``SoftTargetCrossEntropy`` as the base criterion (mixup > 0). Kept verbatim in its arithmetic.


class _ReferenceDistillationLoss(torch.nn.Module):
    def __init__(self, base_criterion, teacher_model, distillation_type, alpha, tau):
        super().__init__()
        self.base_criterion = base_criterion
        self.teacher_model = teacher_model
        assert distillation_type in ['none', 'soft', 'hard']
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau

    def forward(self, inputs, outputs, labels):
        outputs_kd = None
        if not isinstance(outputs, torch.Tensor):
            outputs, outputs_kd = outputs
        base_loss = self.base_criterion(outputs, labels)
        if self.distillation_type == 'none':
            return base_loss
        with torch.no_grad():
            teacher_outputs, flops_list = self.teacher_model(inputs)
        if self.distillation_type == 'soft':
            T = self.tau
            distillation_loss = F.kl_div(
                F.log_softmax(outputs_kd / T, dim=1),
                F.log_softmax(teacher_outputs / T, dim=1),
                reduction='sum',
                log_target=True
            ) * (T * T) / outputs_kd.numel()
        elif self.distillation_type == 'hard':
            distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
        loss = base_loss * (1 - self.alpha) + distillation_loss * self.alpha
        return loss

# End of the reference transcription.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_official_search_loss_matches_the_official_code_and_its_formula(tau):
    gen = torch.Generator().manual_seed(0)
    batch, classes = 6, 10
    student = torch.randn(batch, classes, generator=gen, dtype=torch.float64) * 3
    teacher = torch.randn(batch, classes, generator=gen, dtype=torch.float64) * 3
    soft_targets = torch.softmax(torch.randn(batch, classes, generator=gen, dtype=torch.float64), dim=1)
    ours = official_loss(student, teacher, soft_targets, alpha=0.1, tau=tau)
    # UVC's model returns (cls logits, dist logits); a ViT without a distillation token returns the same twice.
    reference = _ReferenceDistillationLoss(SoftTargetCrossEntropy(), lambda x: (teacher, []), "soft", 0.1, tau)
    official = reference(None, (student, student), soft_targets)
    assert float((ours["loss"] - official).abs()) <= 1e-12  # measured: 0 (float64)
    # The formula: (1 - a) * mean_b CE(soft y_b, p_s) + a * T^2 * sum_b KL(p_t || p_s) / (B * K).
    ce = -(soft_targets * torch.log_softmax(student, 1)).sum(1).mean()
    p_t = torch.softmax(teacher / tau, 1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(student / tau, 1))).sum()
    formula = 0.9 * ce + 0.1 * tau ** 2 * kl / (batch * classes)
    torch.testing.assert_close(ours["loss"], formula, rtol=0, atol=1e-12)
    # The KD term is 1/K of DeiT-with-batchmean's: the label term dominates (about 99% on CIFAR-10 shapes).
    torch.testing.assert_close(ours["kd_loss"] * classes, tau ** 2 * kl / batch, rtol=0, atol=1e-12)


def test_official_mixup_gives_label_smoothed_soft_targets():
    loss = OfficialLoss(num_classes=10)
    images = torch.randn(7, 3, 8, 8)
    targets = torch.arange(7) % 10
    mixed, soft = loss.mix(images.clone(), targets)  # timm's Mixup mixes in place
    assert mixed.shape[0] == 6 and soft.shape == (6, 10)  # odd batch: the last image is dropped, as UVC does
    torch.testing.assert_close(soft.sum(1), torch.ones(6))
    assert float(soft.min()) >= 0.1 / 10 - 1e-6  # smoothing 0.1 spreads at least 0.01 on every class
    assert not torch.equal(mixed, images[:6])


# --------------------------------------------------------------------------------------------------
# The search on a small real teacher (4 blocks, trained on real CIFAR-10 images by distill_support)


@pytest.fixture(scope="module")
def teacher(tiny_teacher_path):
    return load_model(tiny_teacher_path)


@pytest.fixture(scope="module")
def loader(teacher):
    data = small_data(n_train=320, n_val=16)
    data.train.transform = build_transform(data_config(teacher), is_training=False)
    return make_loader(data.train, 32, shuffle=True, workers=0, drop_last=True)


@pytest.fixture(scope="module")
def official_search(teacher, loader):
    torch.manual_seed(0)
    config = UVCConfig.for_objective("official", flops_target=0.5, steps=90, log_every=0)
    return search_uvc(teacher, loader, config)


def test_official_mode_settings_follow_the_official_code():
    config = UVCConfig.for_objective("official", steps=300)
    assert (config.weight_decay, config.warmup_steps, config.warmup_keep) == (0.05, 50, 0.5)
    assert (config.gate_interval, config.gate_weight_decay, config.gates_in_weight_optimizer) == (100, 1e-4, True)
    # UVC's block_skip_gating starts at [-1, 1]: keep probability softmax([-1, 1] / 0.5)[1].
    keep = torch.softmax(torch.tensor([-config.gate_init / 2, config.gate_init / 2]) / config.gumbel_tau, 0)[1]
    torch.testing.assert_close(keep, torch.softmax(torch.tensor([-1.0, 1.0]) / 0.5, 0)[1])
    assert UVCConfig.for_objective("official", steps=300, weight_decay=None).weight_decay == 0.05
    assert UVCConfig.for_objective("official", steps=300, weight_decay=0.0).weight_decay == 0.0


@pytest.mark.parametrize("objective", ["official", "kd"])
def test_search_stays_near_its_target(objective, official_search, teacher, loader):
    if objective == "official":
        result, steps = official_search, 90
    else:
        torch.manual_seed(0)
        steps = 90
        result = search_uvc(teacher, loader, UVCConfig.for_objective("kd", flops_target=0.5, steps=steps,
                                                                     log_every=0))
    resource = [h["resource"] for h in result.history]
    # official runs every step; kd may stop early, once its decisions have sat in the band (search_patience).
    assert len(resource) == steps if objective == "official" else len(resource) <= steps
    if len(resource) < steps:
        assert result.health["stopped_at"] == len(resource) - 1 and result.health["decisions_in_band"]
    last_half = resource[len(resource) // 2:]
    assert 0.5 - 0.1 <= min(last_half) and max(last_half) <= 1.0, (min(last_half), max(last_half))
    assert abs(result.search_resource - 0.5) <= 0.1


def test_restored_student_keeps_the_teachers_weights(official_search, teacher):
    result = official_search
    restored = sliced_student(teacher, result, restore=True)
    searched = sliced_student(teacher, result, restore=False)
    kept = [i for i, k in enumerate(result.plan) if k is not None]
    assert kept, "the search removed every block"
    moved = 0.0
    for new_i, i in enumerate(kept):
        keep, src = result.plan[i], teacher.blocks[i]
        mlp = torch.tensor(keep.mlp)
        for model, must_equal in ((restored, True), (searched, False)):
            blk = model.blocks[new_i]
            if blk.mlp is None:
                continue
            same = (torch.equal(blk.mlp.fc1.weight, src.mlp.fc1.weight[mlp])
                    and torch.equal(blk.mlp.fc2.weight, src.mlp.fc2.weight[:, mlp])
                    and torch.equal(blk.mlp.fc1.bias, src.mlp.fc1.bias[mlp]))
            if must_equal:
                assert same, f"block {i}: kept MLP units differ from the teacher's"
            else:
                moved = max(moved, float((blk.mlp.fc1.weight - src.mlp.fc1.weight[mlp]).detach().abs().max()))
        blk = restored.blocks[new_i]
        if blk.attn is not None:
            hd, width = src.attn.head_dim, src.attn.num_heads * src.attn.head_dim
            dims = keep.head_dims or [list(range(hd))] * len(keep.heads)
            idx = torch.tensor([h * hd + d for h, dl in zip(keep.heads, dims) for d in dl])
            # k and v rows and the proj columns are copied as they are (q rows carry the head-width rescale).
            n = len(idx)
            assert torch.equal(blk.attn.qkv.weight[n:2 * n], src.attn.qkv.weight[idx + width])
            assert torch.equal(blk.attn.qkv.weight[2 * n:], src.attn.qkv.weight[idx + 2 * width])
            assert torch.equal(blk.attn.proj.weight, src.attn.proj.weight[:, idx])
    assert moved > 0, "without restore the searched weights should differ from the teacher's"


def test_magnitude_plan_hits_the_band_and_drops_the_weakest_units(teacher):
    resource = ResourceModel(teacher)
    plan = magnitude_plan(teacher, 0.5, 0.02, resource)
    assert 0.48 <= resource.plan_ratio(plan) <= 0.5
    assert all(k is not None for k in plan)  # one-shot magnitude keeps every block
    for blk, keep in zip(teacher.blocks, plan):
        norms = mlp_unit_norms(blk)
        dropped = [j for j in range(len(norms)) if j not in keep.mlp]
        if dropped and keep.mlp:
            assert float(norms[dropped].max()) <= float(norms[keep.mlp].min()) + 1e-7
        heads = head_norms(blk)
        gone = [h for h in range(len(heads)) if h not in keep.heads]
        if gone:
            assert float(heads[gone].max()) <= float(heads[keep.heads].min()) + 1e-7


def _context(tmp_path, loader, **overrides):
    from vitshrink.config import load_preset
    from vitshrink.recipes.base import RecipeContext

    messages: list[str] = []
    cfg = {**load_preset("uvc"), **overrides}
    ctx = RecipeContext(cfg=cfg, device=torch.device("cpu"), data=None, train_loader=lambda model, batch_size=None:
                        loader, out_dir=tmp_path, log=messages.append)
    return ctx, messages


def test_a_search_that_ends_far_from_its_target_says_so_in_the_report(teacher, loader, tmp_path):
    from vitshrink.recipes.uvc import UVC
    from vitshrink.report import render_markdown

    ctx, messages = _context(tmp_path, loader, search_steps=2, search_objective="kd")
    recipe = UVC()
    torch.manual_seed(0)
    student = recipe.prepare(teacher, recipe.build_student(teacher, None, ctx), ctx)
    assert 0.48 <= count_ratio(student, teacher) <= 0.5  # the greedy still lands in the band
    notes = recipe.report_notes(tmp_path)
    assert len(notes) == 1 and "far from the target" in notes[0] and any("warning" in m for m in messages)
    report = {"recipe": "uvc", "data": "d", "epochs": 1, "best_epoch": 1, "distill_seconds": 1.0, "onnx": None,
              "teacher": {"top1": 0.5, "params": 2, "gmacs": 1.0, "ort_p50_ms": {}},
              "student": {"top1": 0.4, "params": 1, "gmacs": 0.5, "ort_p50_ms": {}},
              "ratios": {"params": 0.5, "gmacs": 0.5, "ort_speedup": {}, "top1_delta": -0.1}, "warnings": notes}
    assert "## Warnings" in render_markdown(report) and notes[0] in render_markdown(report)


def test_magnitude_plan_through_the_recipe(teacher, loader, tmp_path):
    import json

    from vitshrink.recipes.uvc import UVC

    ctx, _ = _context(tmp_path, loader, pruning_plan="magnitude")
    recipe = UVC()
    student = recipe.prepare(teacher, recipe.build_student(teacher, None, ctx), ctx)
    assert 0.48 <= count_ratio(student, teacher) <= 0.5
    summary = json.loads((tmp_path / "uvc_plan.json").read_text())
    assert summary["pruning_plan"] == "magnitude" and "warning" not in summary
    assert recipe.report_notes(tmp_path) == []


def count_ratio(model, teacher) -> float:
    from vitshrink.measure import count_flops

    return count_flops(model).macs / count_flops(teacher).macs


@pytest.mark.parametrize("key,value", [("search_objective", "deit"), ("pruning_plan", "random"),
                                       ("posttrain_objective", "mse")])
def test_unknown_uvc_choices_are_refused_with_one_line(key, value, teacher, loader, tmp_path):
    from vitshrink.errors import UserError
    from vitshrink.recipes.uvc import UVC

    ctx, _ = _context(tmp_path, loader, **{key: value})
    with pytest.raises(UserError, match=f"{key} must be one of") as info:
        UVC().build_student(teacher, None, ctx)
    assert "\n" not in str(info.value)
