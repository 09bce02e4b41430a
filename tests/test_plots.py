"""Pictures and `compare` on real run folders: the PNGs written, what they plot, report.md's links, failures."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from cli_support import assert_one_line_error, run_cli
from distill_support import small_data
from vitshrink.compare import compare_runs, plot_comparison
from vitshrink.pipeline import distill
from vitshrink.errors import UserError
from vitshrink.io import load_model
from vitshrink.report import render_markdown, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
@pytest.fixture(scope="module")
def two_runs(vanilla_run, tiny_teacher_path, tmp_path_factory) -> tuple[Path, Path]:
    """Two real, finished runs of the tiny teacher: `vanilla` (KD; the session's shared run) and `ce` (no KD), 1
    short epoch each on the same data, latency at the same two small batch sizes (1 and 4): the tests check the
    plumbing, not the speed."""
    out = tmp_path_factory.mktemp("runs") / "ce"
    distill(load_model(tiny_teacher_path), "ce", data=small_data(384, 100), out_dir=out, epochs=1, batch_size=32,
            workers=0, progress=False, overrides={"bench_batch_sizes": [1, 4]})
    return vanilla_run.out_dir, out


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_every_run_writes_its_pictures_and_report_md_links_them(two_runs):
    run = two_runs[0]
    report = json.loads((run / "report.json").read_text())
    assert report["pictures"] == {"teacher_vs_student": "teacher_vs_student.png",
                                  "training_curves": "training_curves.png"}
    assert "warnings" not in report
    markdown = (run / "report.md").read_text()
    for name in report["pictures"].values():
        width, height = _png_size(run / name)
        assert width >= 600 and height >= 300 and (run / name).stat().st_size > 10_000
        assert f"]({name})" in markdown
    assert not list(run.glob(".*.tmp"))  # atomic writes leave no temp file behind


def test_report_md_links_only_pictures_that_exist(two_runs, tmp_path):
    report = json.loads((two_runs[0] / "report.json").read_text())
    (tmp_path / "teacher_vs_student.png").write_bytes((two_runs[0] / "teacher_vs_student.png").read_bytes())
    markdown = render_markdown(report, tmp_path)  # training_curves.png is not in tmp_path
    assert "](teacher_vs_student.png)" in markdown and "training_curves.png" not in markdown


def test_a_drawing_failure_keeps_report_json_and_md(two_runs, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    run = tmp_path / "run"
    shutil.copytree(two_runs[0], run, ignore=shutil.ignore_patterns("*.png", "report.*"))
    report = json.loads((two_runs[0] / "report.json").read_text())
    report.pop("pictures")

    def broken_savefig(self, *args, **kwargs):
        raise RuntimeError("renderer exploded")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.warns(RuntimeWarning, match="renderer exploded"):
        paths = write_report(report, run)
    written = json.loads((run / "report.json").read_text())
    assert written["student"]["top1"] == report["student"]["top1"] and written["pictures"] == {}
    assert len(written["warnings"]) == 2 and all("not drawn: RuntimeError" in w for w in written["warnings"])
    markdown = (run / "report.md").read_text()
    assert "![" not in markdown and "renderer exploded" in markdown and "speed-up" in markdown
    assert set(paths) == {"report_json", "report_md"} and not list(run.glob("*.png")) and not list(run.glob(".*"))


def test_training_curves_plot_the_summary(two_runs, tmp_path):
    from vitshrink.plots import plot_training_curves

    summary = tmp_path / "summary.csv"  # three epochs, written the way the engine writes it
    rows = [{"epoch": e, "train_loss": 3.0 - e, "eval_loss": 2.0 - e / 2, "eval_top1": 40.0 + 5 * e,
             "eval_top5": 90.0, "lr": 1e-4, "time": 10.0 * e} for e in range(3)]
    with summary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    drawn = plot_training_curves(summary, tmp_path / "curves.png", teacher_top1=0.6)
    assert drawn["epoch"] == [1, 2, 3] and drawn["train_loss"] == [3.0, 2.0, 1.0]
    assert drawn["eval_top1"] == [40.0, 45.0, 50.0] and drawn["eval_loss"] == [2.0, 1.5, 1.0]
    assert _png_size(tmp_path / "curves.png")[0] >= 600


def test_compare_two_runs_table_front_and_plot(two_runs, tmp_path):
    reports = [json.loads((run / "report.json").read_text()) for run in two_runs]
    comparison = compare_runs(two_runs, x="gmacs")
    teacher, *students = comparison.rows
    # Both runs distilled the same teacher: one teacher row, latency = median of the two runs' timings.
    assert teacher.role == "teacher" and [s.name for s in students] == ["vanilla", "ce"]
    assert teacher.top1 == reports[0]["teacher"]["top1"] and teacher.params == reports[0]["teacher"]["params"]
    assert teacher.ort_p50_ms["4"] == pytest.approx(sum(r["teacher"]["ort_p50_ms"]["4"] for r in reports) / 2)
    assert comparison.batch == "4"  # the largest batch size both runs timed
    for student, report in zip(students, reports):
        assert (student.top1, student.gmacs, student.x) == (report["student"]["top1"], report["student"]["gmacs"],
                                                            report["student"]["gmacs"])
        assert student.speedup["4"] == report["ratios"]["ort_speedup"]["4"]
        assert student.distill_seconds == report["distill_seconds"] and student.recipe == report["recipe"]
    # The front by its definition: no other point at lower-or-equal cost with higher-or-equal top-1.
    points = [(row.x, row.top1) for row in comparison.rows]
    for row in comparison.rows:
        dominated = any(x <= row.x and t >= row.top1 and (x, t) != (row.x, row.top1) for x, t in points)
        assert row.pareto == (not dominated)

    drawn = plot_comparison(comparison, tmp_path / "pareto.png")
    assert drawn["x_label"] == "GMACs (batch 1)" and drawn["y_label"] == "top-1 (%)"
    assert drawn["x"] == [row.gmacs for row in comparison.rows]
    assert drawn["y"] == pytest.approx([row.top1 * 100 for row in comparison.rows])
    assert drawn["front_x"] == sorted(row.x for row in comparison.rows if row.pareto)
    width, height = _png_size(tmp_path / "pareto.png")
    assert (width, height) == (900, 576) and (tmp_path / "pareto.png").stat().st_size > 15_000


def test_compare_latency_axis_and_a_benchmark_file(two_runs, tmp_path):
    from vitshrink.measure import benchmark

    bench = {"model": benchmark(two_runs[1] / "student.onnx", batch_sizes=(1, 4), min_time_s=0.05, name="ce.onnx",
                                input_size=(3, 32, 32))}
    (tmp_path / "ce_bench.json").write_text(json.dumps(bench))
    comparison = compare_runs([*two_runs, str(tmp_path / "ce_bench.json")], x="latency", batch=1)
    bench_row = comparison.rows[-1]
    assert bench_row.role == "benchmark" and bench_row.top1 is None and not bench_row.pareto
    assert bench_row.x == bench["model"]["runtimes"]["onnxruntime"]["batches"][0]["p50_ms"]
    assert comparison.x_label == "ORT latency p50, batch 1 (ms)"
    drawn = plot_comparison(comparison, tmp_path / "latency.png")
    assert drawn["unscored"] == ["ce_bench"] and "ce_bench" not in drawn["names"]
    assert drawn["x"] == [row.ort_p50_ms["1"] for row in comparison.rows[:-1]]
    # With a top-1 given, the benchmark file is a point like the others.
    scored = compare_runs([*two_runs, f"{tmp_path / 'ce_bench.json'}=0.5"], x="params")
    assert scored.rows[-1].top1 == 0.5 and scored.rows[-1].x == bench["model"]["params"] / 1e6


def test_compare_cli_prints_the_table_and_writes_the_plot(capsys, two_runs, tmp_path):
    png = tmp_path / "out" / "pareto.png"
    code, out, err = run_cli(capsys, "compare", *two_runs, "--plot", png, "--x", "params")
    assert code == 0, err
    assert "vanilla" in out and "Pareto front" in out and f"wrote {png}" in out
    assert _png_size(png) == (900, 576)


@pytest.mark.parametrize("bad, message", [
    (["{empty}"], "no report.json"),
    (["{run}", "--x", "speed"], "--x must be one of latency, gmacs, params"),
    (["{run}", "--batch", "7"], "--batch 7: no ORT latency at that batch size"),
    (["{run}", "{empty}/b.json=2"], "TOP1 a fraction in [0, 1]"),
])
def test_compare_bad_input_is_one_line_exit_2(capsys, two_runs, tmp_path, bad, message):
    (tmp_path / "empty").mkdir()
    args = [a.format(run=two_runs[0], empty=tmp_path / "empty") for a in bad]
    code, _, err = run_cli(capsys, "compare", *args)
    assert_one_line_error(code, err, message)


def test_compare_library_rejects_unknown_axis_before_reading():
    with pytest.raises(UserError, match="--x must be one of"):
        compare_runs(["nowhere"], x="flops")
