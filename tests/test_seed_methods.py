"""manifold, tat and crossarch: each loss against a transcription written here (the official ManifoldKD function;
the TaT and cross-architecture papers' equations, computed position by position), and one tiny run per recipe
whose student exports with ONNX parity."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill_support import TEACHER_ARCH, TEACHER_KWARGS, small_data
from vitshrink.distill import feature_losses
from vitshrink.distill.feature_tasks import GroupWiseLinear, multi_view
from vitshrink.errors import UserError
from vitshrink.io import create_model, load_model
from vitshrink.pipeline import resolve_run_settings

torch.set_num_threads(1)


# --- reference transcription of the official loss (huawei-noah/Efficient-Computing ManifoldKD losses.py) -----
def official_layer_mf_loss(F_s, F_t, K):
    F_s = F.normalize(F_s, dim=-1)
    F_t = F.normalize(F_t, dim=-1)
    M_s = F_s.bmm(F_s.transpose(-1, -2))
    M_t = F_t.bmm(F_t.transpose(-1, -2))
    M_diff = M_t - M_s
    loss_mf_patch = (M_diff * M_diff).mean()
    f_s = F_s.permute(1, 0, 2)
    f_t = F_t.permute(1, 0, 2)
    M_s = f_s.bmm(f_s.transpose(-1, -2))
    M_t = f_t.bmm(f_t.transpose(-1, -2))
    M_diff = M_t - M_s
    loss_mf_sample = (M_diff * M_diff).mean()
    bsz, patch_num, _ = F_s.shape
    sampler = torch.randperm(bsz * patch_num)[:K]
    f_s = F_s.reshape(bsz * patch_num, -1)[sampler]
    f_t = F_t.reshape(bsz * patch_num, -1)[sampler]
    M_s = f_s.mm(f_s.T)
    M_t = f_t.mm(f_t.T)
    M_diff = M_t - M_s
    loss_mf_rand = (M_diff * M_diff).mean()
    return loss_mf_patch, loss_mf_sample, loss_mf_rand


def official_mf_loss(block_outs_s, block_outs_t, layer_ids_s, layer_ids_t, K, w_sample, w_patch, w_rand):
    losses = [[], [], []]
    for id_s, id_t in zip(layer_ids_s, layer_ids_t):
        extra_tk_num = block_outs_s[0].shape[1] - block_outs_t[0].shape[1]
        F_s = block_outs_s[id_s][:, extra_tk_num:, :]
        F_t = block_outs_t[id_t]
        loss_mf_patch, loss_mf_sample, loss_mf_rand = official_layer_mf_loss(F_s, F_t, K)
        losses[0].append(w_sample * loss_mf_sample)
        losses[1].append(w_patch * loss_mf_patch)
        losses[2].append(w_rand * loss_mf_rand)
    return sum(losses[0]) / len(losses[0]), sum(losses[1]) / len(losses[1]), sum(losses[2]) / len(losses[2])


def test_manifold_loss_matches_the_official_function():
    g = torch.Generator().manual_seed(0)
    # Student: 3 blocks, width 24, a distillation token more than the teacher (2 + 16 tokens vs 1 + 16).
    student = [torch.randn(6, 18, 24, generator=g) for _ in range(3)]
    teacher = [torch.randn(6, 17, 40, generator=g) for _ in range(5)]
    torch.manual_seed(7)
    sample, patch, rand = official_mf_loss(student, teacher, [0, 2], [0, 4], 20, 0.1, 4.0, 0.2)
    torch.manual_seed(7)  # the same random patches: both draw torch.randperm(B * N) from the global generator
    ours = feature_losses.manifold_loss([student[0], student[2]], [teacher[0], teacher[4]], num_random=20,
                                        intra_weight=4.0, inter_weight=0.1, random_weight=0.2)
    for official, mine in ((patch, ours.intra), (sample, ours.inter), (rand, ours.random)):
        assert abs(float(official) - float(mine)) <= 1e-5 and float(mine) > 0
    with pytest.raises(ValueError, match="fewer than the teacher"):
        feature_losses.manifold_loss([teacher[0]], [student[0]], num_random=4, intra_weight=1, inter_weight=1,
                                     random_weight=1)


# --- the TaT paper's equations, one student position at a time ------------------------------------------------
def one_to_all_by_position(q, k, v, t):
    """out_i = sum_j softmax_j(q_i . k_j) v_j for every position i; mean squared error to t."""
    b, c, h, w = v.shape
    qs, ks, vs, ts = (x.reshape(b, x.shape[1], h * w) for x in (q, k, v, t))
    total = 0.0
    for n in range(b):
        for i in range(h * w):
            scores = torch.stack([qs[n, :, i] @ ks[n, :, j] for j in range(h * w)])
            weights = torch.exp(scores - scores.max()) / torch.exp(scores - scores.max()).sum()
            out = sum(weights[j] * vs[n, :, j] for j in range(h * w))
            total = total + ((out - ts[n, :, i]) ** 2).sum()
    return total / (b * c * h * w)


def regions(x, rows, cols):
    """The rows x cols regions of a map, row-major, each (B, C, h/rows, w/cols)."""
    kh, kw = x.shape[2] // rows, x.shape[3] // cols
    return [x[:, :, r * kh:(r + 1) * kh, s * kw:(s + 1) * kw] for r in range(rows) for s in range(cols)]


def test_target_aware_losses_match_the_papers_equations():
    g = torch.Generator().manual_seed(1)
    q, k, v, t = (torch.randn(2, 6, 4, 4, generator=g, dtype=torch.float64) for _ in range(4))
    expected = one_to_all_by_position(q, k, v, t)
    assert abs(float(feature_losses.target_aware_loss(q, k, v, t)) - float(expected)) <= 1e-5
    # Patch-group: 2x2 regions of 2x2 positions; 2 heads = groups of 2 regions whose features are concatenated.
    grouped = 0.0
    parts = [regions(x, 2, 2) for x in (q, k, v, t)]
    for group in ((0, 1), (2, 3)):
        q_g, k_g, v_g, t_g = (torch.cat([p[r] for r in group], dim=1) for p in parts)
        grouped = grouped + one_to_all_by_position(q_g, k_g, v_g, t_g) / 2
    ours = feature_losses.patch_group_loss(q, k, v, t, rows=2, cols=2, heads=2)
    assert abs(float(ours) - float(grouped)) <= 1e-5
    # Anchor points: each 2x2 block averaged into one anchor, then one-to-all among the 2x2 anchors.
    anchors = [torch.stack([r.mean(dim=(2, 3)) for r in regions(x, 2, 2)], dim=-1).reshape(2, 6, 2, 2)
               for x in (q, k, v, t)]
    ours = feature_losses.anchor_point_loss(q, k, v, t, anchor_rows=2, anchor_cols=2)
    assert abs(float(ours) - float(one_to_all_by_position(*anchors))) <= 1e-5


# --- the cross-architecture paper's projector losses -----------------------------------------------------------
def test_cross_attention_and_group_linear_match_the_papers_equations():
    g = torch.Generator().manual_seed(2)
    student = [torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    teacher = [torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    expected = 0.0
    for n in range(2):
        for h in range(3):
            (qs, ks, vs), (qt, kt, vt) = ([m[n, h] for m in student], [m[n, h] for m in teacher])
            attn_s, attn_t = (torch.softmax(a @ b.T / math.sqrt(4), dim=-1) for a, b in ((qs, ks), (qt, kt)))
            rel_s, rel_t = (torch.softmax(a @ a.T / math.sqrt(4), dim=-1) for a in (vs, vt))
            expected = expected + ((attn_s - attn_t) ** 2).sum() / (2 * 3 * 25) + ((rel_s - rel_t) ** 2).sum() / 150
    ours = feature_losses.cross_attention_loss(student, teacher)
    assert abs(float(ours) - float(expected)) <= 1e-5
    # Partial cross: p 0 keeps the student, p 1 takes the teacher, p 0.5 mixes element by element.
    assert torch.equal(feature_losses.partial_cross(student[0], teacher[0], 0.0), student[0])
    assert torch.equal(feature_losses.partial_cross(student[0], teacher[0], 1.0), teacher[0])
    torch.manual_seed(3)
    mixed = feature_losses.partial_cross(student[0], teacher[0], 0.5)
    from_teacher = (mixed == teacher[0]).double().mean()
    assert torch.all((mixed == teacher[0]) | (mixed == student[0])) and 0.3 < from_teacher < 0.7
    # Group-wise linear: position (i, j) of a 4x4 map goes through the linear map of its 2x2 tile.
    torch.manual_seed(4)
    gl = GroupWiseLinear(3, 5, (4, 4), group=2).double()
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    out = gl(x)
    for i in range(4):
        for j in range(4):
            tile = (i // 2) * 2 + j // 2
            want = x[:, :, i, j] @ gl.weight[tile] + gl.bias[tile]
            assert torch.allclose(out[:, i * 4 + j], want, atol=1e-12)
    assert len({float(gl.weight[t].detach().sum()) for t in range(4)}) == 4  # four tiles, four maps


def test_multi_view_erases_a_square_and_adds_noise_to_the_chosen_images():
    torch.manual_seed(5)
    images = torch.ones(64, 3, 8, 8)
    viewed = multi_view(images, probability=0.5, erase=0.25, noise=0.0)
    changed = (viewed != images).flatten(1).any(1)
    assert 16 < int(changed.sum()) < 48  # about half the images
    assert all(int((viewed[n] == 0).sum()) == 3 * 2 * 2 for n in range(64) if changed[n])  # one 2x2 square
    assert torch.equal(multi_view(images, 0.0, 0.25, 0.1), images)


def test_presets_cite_a_source_for_every_key_and_the_recipes_are_listed():
    import re

    from vitshrink.config import PRESETS
    from vitshrink.recipes import recipe_names

    assert {"manifold", "tat", "crossarch"} <= set(recipe_names())
    for preset in ("manifold", "tat", "crossarch"):
        lines = (PRESETS / f"{preset}.yaml").read_text().splitlines()
        for i in (i for i, line in enumerate(lines) if re.match(r"^[a-z_]+:", line)):
            j = i - 1
            while j >= 0 and re.match(r"^[a-z_]+:", lines[j]):
                j -= 1
            assert j >= 0 and lines[j].startswith("#"), f"{preset}.yaml: {lines[i]!r} has no comment above"


def test_settings_are_checked_before_any_work():
    with pytest.raises(UserError, match="--student-points and --teacher-points"):
        resolve_run_settings("manifold", flags={"student_points": ["blocks.0"]})
    with pytest.raises(UserError, match="--tat-form"):
        resolve_run_settings("tat", flags={"tat_form": "global"})
    with pytest.raises(UserError, match="--cross-probability"):
        resolve_run_settings("crossarch", flags={"cross_probability": 1.5})


# --- one tiny run per recipe ---------------------------------------------------------------------------------
FAST = {"steps_per_epoch": 2, "batch_size": 16, "eval_batch_size": 100, "bench_batch_sizes": [1],
        "checkpoint_steps": 0, "workers": 0, "mixup": 0.0, "cutmix": 0.0}


def _tiny_teacher():
    torch.manual_seed(0)
    return create_model(TEACHER_ARCH, **TEACHER_KWARGS).eval()


def _real_batch(model, n: int):
    from vitshrink.data import build_transform
    from vitshrink.io import data_config

    data = small_data(n, 8)
    data.train.transform = build_transform(data_config(model))
    images, targets = zip(*[data.train[i][:2] for i in range(n)])
    return torch.stack(images), torch.tensor(targets)


@pytest.mark.parametrize("recipe_name,options,term", [
    ("manifold", {}, "manifold_loss"),
    ("tat", {"tat_form": "hierarchical", "patch_grid": [2, 2], "patch_heads": 2, "anchors": [2, 2]}, "tat_loss"),
])
def test_vit_recipe_steps_and_exports_with_parity(tmp_path, recipe_name, options, term):
    """test_recipes' cheap pattern: the recipe's student and task, two optimiser steps on real images, then the
    finalised student through export_onnx's parity check (the full pipeline runs in the crossarch test and in
    benchmarks/seed_methods.py)."""
    from vitshrink.export import export_onnx
    from vitshrink.recipes import RecipeContext, get_recipe, load_preset

    teacher, recipe = _tiny_teacher(), get_recipe(recipe_name)
    cfg = recipe.configure({**load_preset(recipe_name), **FAST, **options})
    student = recipe.build_student(teacher, None, RecipeContext(cfg=cfg, device=torch.device("cpu"), data=None,
                                                                train_loader=lambda *a: None))
    task = recipe.task(teacher, student, cfg).train()
    trainable = task.get_trainable_module()
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=1e-3)
    images, targets = _real_batch(student, 16)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    for _ in range(2):
        out = task(images, targets)
        assert torch.isfinite(out["loss"]) and float(out[term]) > 0
        # The total is the preset's combination of the terms reported (manifold: kd_weight 1, beta folded in;
        # tat: 0.5 CE + 0.5 T^2 KL + 0.1 TaT).
        weights = {"manifold_loss": (0.0, 1.0, 1.0), "tat_loss": (0.5, 0.5, 0.1)}[term]
        total = weights[0] * out["task_loss"] + weights[1] * out["kd_loss"] + weights[2] * out[term]
        torch.testing.assert_close(out["loss"].detach(), total, rtol=1e-5, atol=1e-6)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is frozen
    final = recipe.finalize(student, cfg)
    parity = export_onnx(final, tmp_path / f"{recipe_name}.onnx", sample=images[:8])
    assert parity.passed and parity.max_abs_diff <= 1e-4


def test_crossarch_one_epoch_run_writes_a_cnn_student_that_exports_with_parity(tmp_path):
    import onnxruntime as ort

    from vitshrink.pipeline import distill

    result = distill(_tiny_teacher(), "crossarch", student="cifar_resnet20", data=small_data(32, 16),
                     out_dir=tmp_path / "run", epochs=1, device="cpu", progress=False, overrides=dict(FAST))
    assert result.report["onnx"]["passed"] and result.report["onnx"]["max_abs_diff"] <= 1e-4
    reloaded = load_model(tmp_path / "run" / "student.safetensors").eval()
    assert type(reloaded).__name__ == "CifarResNet"  # only the CNN is saved, not its projectors
    x = torch.randn(2, 3, 32, 32)
    session = ort.InferenceSession(str(tmp_path / "run" / "student.onnx"), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert abs(onnx_out - reloaded(x).detach().numpy()).max() < 1e-4
    # The projectors trained with the student and are checkpointed in last.pt, not in the model file.
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["trainable"]
    assert {"qkv.0.weight", "linear.weight", "discriminator.0.weight", "student.linear.weight"} <= set(state)


def test_crossarch_refuses_a_vit_student_and_a_cnn_teacher():
    from vitshrink.recipes import RecipeContext, get_recipe, load_preset

    recipe, teacher = get_recipe("crossarch"), _tiny_teacher()
    ctx = RecipeContext(cfg=load_preset("crossarch"), device=torch.device("cpu"), data=None,
                        train_loader=lambda *a: None)
    with pytest.raises(UserError, match="distils a ViT into a CNN"):
        recipe.build_student(teacher, f"{TEACHER_ARCH}:img_size=32,patch_size=8,embed_dim=48,depth=1", ctx)
    cnn = create_model("cifar_resnet20")
    with pytest.raises(UserError, match="not a ViT with blocks"):
        recipe.task(cnn, create_model("cifar_resnet20"), load_preset("crossarch"))
