"""Draw the Pareto front of the students recorded in benchmarks/RESULTS.md (reads JSON only, measures nothing).

    python benchmarks/pareto.py                       # -> benchmarks/results/pareto_cpu.png

Accuracy, params and GMACs come from the `benchmarks/uvc.py` JSON files (``--runs``: their ``teacher`` and
``rows``); latency from the uncontended `vitshrink benchmark --baseline TEACHER --json` measurements
(``--latency``: ``runs`` keyed by run folder name, matched to a row's ``out_dir``), as the student's p50 over
the teacher's p50 measured back to back, because the latencies inside the uvc.py files were taken on a busy
machine. A row without a latency measurement appears in the GMACs panel only. New students (e.g. the
latency-targeted ones) join by passing their JSON files to ``--runs`` and ``--latency``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vitshrink.compare import pareto_mask  # noqa: E402
from vitshrink.plots import draw_pareto, new_figure, save_png  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
# Labels that would sit on top of each other at the default offset (points, (dx, dy)).
LABEL_OFFSETS = {
    "gmacs": {"uvc@0.5 --no-skip": (-8, 6), "uvc@latency 0.5 (ort-cpu b1)": (-60, 8), "uniform@0.5": (6, -10), "uvc@0.5 --no-kd": (6, -10),
              "depth-halved (vanilla)": (6, -10)},
    "1": {"uvc@0.5 --no-skip": (-4, 9), "uvc@0.5": (-8, -11), "uniform@0.5": (6, -10), "uniform@0.7": (6, -10)},
    "32": {"uvc@0.5 --no-skip": (-4, 9), "uvc@0.5": (6, -11), "uniform@0.5": (6, -10),
           "depth-halved (vanilla)": (6, -10), "uniform@0.7": (6, -10)},
}


def load_students(run_files: list[Path], latency_files: list[Path]) -> tuple[dict, list[dict]]:
    """(teacher, rows): each row has name, top1 (%), gmacs and latency_ratio {batch: student p50 / teacher p50}."""
    latency: dict[str, dict] = {}
    for path in latency_files:
        for run, entry in json.loads(path.read_text())["runs"].items():
            per_batch = entry["ratios"]["runtimes"]["onnxruntime"]
            latency[run] = {batch: values["latency_p50_ratio"] for batch, values in per_batch.items()}
    teacher, rows = None, []
    for path in run_files:
        data = json.loads(path.read_text())
        teacher = teacher or data["teacher"]
        for row in data["rows"]:
            rows.append({"name": row["name"], "top1": row["top1"] * 100, "gmacs": row["gmacs"],
                         "latency_ratio": latency.get(Path(row["out_dir"]).name, {})})
    return teacher, rows


def panel_points(teacher: dict, rows: list[dict], axis: str) -> list[dict]:
    """Points of one panel (axis "gmacs" or a batch size): the teacher at cost 1.0 / its GMACs, then the rows."""
    def cost(row: dict) -> float | None:
        return row["gmacs"] if axis == "gmacs" else row["latency_ratio"].get(axis)

    points = [{"name": "teacher", "x": teacher["gmacs"] if axis == "gmacs" else 1.0, "y": teacher["top1"] * 100,
               "role": "teacher"}]
    points += [{"name": row["name"], "x": cost(row), "y": row["top1"], "role": "student",
                "label_offset": LABEL_OFFSETS.get(axis, {}).get(row["name"])} for row in rows if cost(row) is not None]
    for point, on_front in zip(points, pareto_mask([p["x"] for p in points], [p["y"] for p in points])):
        point["pareto"] = on_front
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+",
                        default=[RESULTS / "uvc_cpu.json", RESULTS / "uvc_ablations_cpu.json",
                                 RESULTS / "uvc_latency_target_cpu.json"])
    parser.add_argument("--latency", type=Path, nargs="+", default=[RESULTS / "uvc_latency_cpu.json"])
    parser.add_argument("--out", type=Path, default=RESULTS / "pareto_cpu.png")
    args = parser.parse_args()

    teacher, rows = load_students(args.runs, args.latency)
    figure = new_figure(15, 5.8)
    panels = figure.subplots(1, 3, sharey=True)
    axes_spec = [("gmacs", "GMACs (batch 1)", "top-1 vs GMACs"),
                 ("1", "ORT p50 latency / teacher's, batch 1", "top-1 vs latency, batch 1"),
                 ("32", "ORT p50 latency / teacher's, batch 32", "top-1 vs latency, batch 32")]
    for axes, (axis, x_label, title) in zip(panels, axes_spec):
        points = panel_points(teacher, rows, axis)
        draw_pareto(axes, points, x_label=x_label, title=title, label_size=7)
        front = [p["name"] for p in sorted(points, key=lambda p: p["x"]) if p["pareto"]]
        print(f"{title}: front = {', '.join(front)}")
    for axes in panels[1:]:
        axes.set_ylabel("")
        axes.get_legend().remove()
    figure.suptitle("Students of the bundled CIFAR-10 ViT teacher (benchmarks/RESULTS.md, `uvc` section): top-1 on "
                    "cifar10/test.tar; latency: onnxruntime CPU, 2 threads", fontsize=10)
    save_png(figure, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
