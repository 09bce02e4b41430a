"""``--latency-target``: the latency fit against a hand computation, the search on a latency model, the run's
latency_table.json and target vs predicted vs measured in report.json, accuracy right after pruning, and the
one-line refusals (with --flops-target; torch-cuda without CUDA)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli_support import assert_one_line_error, run_cli
from distill_support import small_data
from vitshrink.io import create_model, load_model, set_data_config
from vitshrink.prune.latency_fit import LatencyFit, LatencyModel, fit_latency
from vitshrink.prune.latency_table import check_latency_runtime, plan_for_shapes, probe_grid
from vitshrink.prune.plan import block_dims, plan_from_json
from vitshrink.prune.surgery import slice_vit
from vitshrink.prune.uvc_search import UVCConfig, search_uvc

torch.set_num_threads(1)

ATTN_UNIT, MLP_UNIT = 50_000.0, 20_000.0  # MACs per (head x dim) and per MLP unit of a made-up model
# A fixed table: (blocks, measured ms). Rows 0..6 are noisy, made up by hand.
TABLE = [([], 1.0), ([(4, 16, 128)], 3.9), ([(2, 16, 128)], 3.1), ([(4, 8, 128)], 3.3), ([(4, 16, 64)], 2.9),
         ([(2, 8, 32)], 1.9), ([(4, 16, 128)] * 3, 9.6)]


def _rows(table=TABLE):
    return [{"blocks": [list(b) for b in blocks], "ms": ms} for blocks, ms in table]


def _by_hand(table=TABLE, keep=(0, 1, 2, 3, 4)):
    """Weighted least squares written out: features (1, blocks, attn MMACs, MLP MMACs, heads), weights 1/ms,
    normal equations solved for the kept columns."""
    x = np.array([[1.0, len(blocks), sum(h * d for h, d, _ in blocks) * ATTN_UNIT / 1e6,
                   sum(m for *_, m in blocks) * MLP_UNIT / 1e6, sum(h for h, *_ in blocks)] for blocks, _ in table])
    y = np.array([ms for _, ms in table])
    xw, yw = x[:, keep] / y[:, None], y / y
    beta = np.linalg.solve(xw.T @ xw, xw.T @ yw)
    coef = np.zeros(5)
    coef[list(keep)] = beta
    return coef, x @ coef, y


def test_fit_equals_the_hand_computation():
    coef, predicted, measured = _by_hand()
    assert (coef[1:] >= 0).all(), "the fixed table must need no active-set step for this check"
    fit = fit_latency(_rows(), ATTN_UNIT, MLP_UNIT)
    np.testing.assert_allclose(fit.coef, coef, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose([fit.predict(blocks) for blocks, _ in TABLE], predicted, rtol=1e-9)
    rel = np.abs(predicted - measured) / measured
    assert fit.errors["max_rel_error"] == pytest.approx(rel.max()) and fit.errors["mean_rel_error"] == pytest.approx(
        rel.mean())


def test_fit_drops_a_negative_cost_and_refits():
    # More heads at the same MACs is faster here: a negative per-head cost, which the fit must not keep.
    table = [([], 1.0), ([(4, 8, 64)], 2.0), ([(2, 16, 64)], 2.6), ([(1, 32, 64)], 3.0), ([(4, 16, 96)], 3.5),
             ([(2, 8, 32)], 1.7)]
    assert _by_hand(table)[0][4] < 0
    fit = fit_latency(_rows(table), ATTN_UNIT, MLP_UNIT)
    assert fit.coef[4] == 0.0 and (fit.coef[1:] >= 0).all()
    np.testing.assert_allclose(fit.coef, _by_hand(table, keep=(0, 1, 2, 3))[0], rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2,
                         mlp_ratio=2.0, num_classes=10)
    set_data_config(model, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    return model.eval()


def test_latency_model_is_a_resource_model(vit):
    fit = LatencyFit([0.4, 0.3, 0.05, 0.02, 0.01], 1.0, 1.0)  # replaced below by the model's own units
    resource = LatencyModel(vit, fit)
    fit.attn_unit, fit.mlp_unit = resource.attn_unit, resource.mlp_unit
    full = [(d.num_heads, d.head_dim, d.mlp_hidden) for d in block_dims(vit)]
    assert resource.ratio_of(full) == pytest.approx(1.0)
    assert resource.total == pytest.approx(fit.predict(full))
    assert resource.fixed + resource.block(2, 16, 64) == pytest.approx(fit.predict([(2, 16, 64)]))
    # Skipping a block saves its per-block cost too, not only its MACs.
    assert resource.ratio_of([full[0], full[1], None]) == pytest.approx(1 - fit.predict([full[2]]) / resource.total
                                                                        + fit.coef[0] / resource.total)


def test_search_targets_the_predicted_latency(vit):
    # ms: fixed 0.05, per block 0.02, 1 per attention MMAC and per MLP MMAC, 0.01 per head (MACs dominate, so
    # the band is reachable within blocks).
    resource = LatencyModel(vit, LatencyFit([0.05, 0.02, 1.0, 1.0, 0.01], 1.0, 1.0))
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen), 0)] * 3
    result = search_uvc(vit, batches, UVCConfig(latency_target=0.6, steps=3, log_every=0, dim_multiple=8),
                        resource=resource)
    assert 0.58 <= resource.plan_ratio(result.plan) <= 0.6 + 1e-9
    assert result.resource == pytest.approx(resource.plan_ratio(result.plan))
    for d in block_dims(slice_vit(vit, result.plan)):
        assert d.head_dim % 8 == 0 and d.mlp_hidden % 8 == 0


def test_probe_grid_separates_heads_from_macs():
    grid = probe_grid(block_dims(create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64,
                                              depth=1, num_heads=2, mlp_ratio=2.0))[0], 8)
    assert len(grid) == 12 and (2, 16, 128) in grid and (1, 32, 128) in grid  # same attention MACs, other heads


def test_plan_for_shapes_keeps_the_first_blocks_at_those_widths(vit):
    plan = plan_for_shapes(vit, [(1, 16, 32), (2, 8, 64)])
    assert plan[2] is None
    sliced = slice_vit(vit, plan)
    assert [(d.num_heads, d.head_dim, d.mlp_hidden) for d in block_dims(sliced)] == [(1, 16, 32), (2, 8, 64)]
    # The first units are kept: block 0's sliced fc1 is the teacher's first 32 rows.
    torch.testing.assert_close(sliced.blocks[0].mlp.fc1.weight, vit.blocks[0].mlp.fc1.weight[:32])


def test_latency_target_run_writes_table_and_report(tiny_teacher_path, tmp_path):
    from vitshrink.evaluation import evaluate
    from vitshrink.pipeline import distill

    from vitshrink.prune.resource import ResourceModel

    teacher_flops = ResourceModel(load_model(tiny_teacher_path))
    resource_units = (teacher_flops.attn_unit, teacher_flops.mlp_unit)
    out = tmp_path / "run"
    data = small_data(n_train=64, n_val=48)
    result = distill(load_model(tiny_teacher_path), "uvc", data=data, out_dir=out, epochs=1, batch_size=32,
                     progress=False, workers=0,
                     options={"latency_target": 0.6, "latency_batch": 4, "search_steps": 3, "search_batch_size": 32,
                              "bench_batch_sizes": [1], "steps_per_epoch": 1, "latency_corrections": 1})
    table = json.loads((out / "latency_table.json").read_text())
    assert table["runtime"] == "ort-cpu" and table["batch_size"] == 4
    rows = {row["name"]: row for row in table["rows"]}
    assert len(rows) == 14 and rows["fixed"]["blocks"] == [] and len(rows["half_depth"]["blocks"]) == 2
    assert rows["all_h3_d16_m96"]["blocks"] == [[3, 16, 96]] * 4  # the teacher itself
    assert all(row["ms"] > 0 and len(row["rounds_ms"]) == table["rounds"] for row in table["rows"])
    for row in table["rows"]:  # predictions of the fit as written equal a recomputation from its coefficients
        features = [1, len(row["blocks"]), sum(h * d for h, d, _ in row["blocks"]) * resource_units[0] / 1e6,
                    sum(m for *_, m in row["blocks"]) * resource_units[1] / 1e6, sum(h for h, *_ in row["blocks"])]
        coef = table["fit"]["coef_ms"]
        assert row["predicted_ms"] == pytest.approx(sum(c * f for c, f in zip(coef.values(), features)))
    assert 0 <= table["fit"]["mean_rel_error"] <= table["fit"]["max_rel_error"]
    report = json.loads((out / "report.json").read_text())
    latency = report["pruning"]["latency"]
    assert latency["target"] == 0.6 and latency["runtime"] == "ort-cpu" and latency["batch_size"] == 4
    # The first plan is predicted in the band; a measured correction (at most 1 here) may move the greedy's goal, by
    # at most 0.1, and the plan measured closest to the target is kept.
    tries = latency["corrections"]
    assert tries[0]["goal"] == 0.6 and 0.58 <= tries[0]["predicted_ratio"] <= 0.6 + 1e-9 and 1 <= len(tries) <= 2
    assert all(abs(b["goal"] - a["goal"]) <= 0.1 + 1e-9 for a, b in zip(tries, tries[1:]))
    kept = [t for t in tries if t.get("kept")]
    assert len(kept) == 1 and abs(kept[0]["measured_ratio"] - 0.6) == min(abs(t["measured_ratio"] - 0.6) for t in tries)
    assert kept[0]["goal"] == latency["predicted_goal"]
    assert latency["predicted_ratio"] == pytest.approx(kept[0]["predicted_ratio"])
    assert latency["measured_ratio"] == pytest.approx(np.median(
        np.array(latency["student_rounds_ms"]) / np.array(latency["teacher_rounds_ms"])))
    assert report["pruning"]["flops_target"] is None
    markdown = (out / "report.md").read_text()
    assert "Top-1 right after pruning" in markdown and f"{latency['measured_ratio']:.3f}" in markdown
    assert f"{report['pruning']['top1_after_pruning']:.2%}" in markdown
    # Accuracy right after pruning = an independent evaluation of the same slice of the teacher's weights.
    plan = json.loads((out / "uvc_plan.json").read_text())
    sliced = slice_vit(load_model(tiny_teacher_path), plan_from_json(plan["plan"])).eval()
    assert report["pruning"]["top1_after_pruning"] == pytest.approx(evaluate(sliced, data.val, workers=0).top1)
    assert result.report["student"]["top1"] is not None


def test_latency_and_flops_targets_together_are_refused(capsys, tiny_teacher_path, tmp_path):
    code, _, err = run_cli(capsys, "distill", tiny_teacher_path, "--recipe", "uvc", "--latency-target", "0.5",
                           "--flops-target", "0.5", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "--latency-target", "--flops-target")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_torch_cuda_without_cuda_is_refused(capsys, tiny_teacher_path, tmp_path):
    with pytest.raises(Exception, match="torch-cuda"):
        check_latency_runtime("torch-cuda")
    code, _, err = run_cli(capsys, "distill", tiny_teacher_path, "--recipe", "uvc", "--latency-target", "0.5",
                           "--latency-runtime", "torch-cuda", "--device", "cpu", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "torch-cuda", "CUDA")
