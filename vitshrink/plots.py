"""Pictures: a run's training curves, teacher vs student bars, and the Pareto front of several models.

Drawing only: the numbers come from files other modules wrote (``summary.csv``, ``report.json``) or from
``vitshrink.compare``. Figures are built with matplotlib's object API (``matplotlib.figure.Figure``), so no
display and no global pyplot state are needed (the Agg renderer draws the PNG), and each PNG is written
atomically. Every ``plot_*`` function returns the arrays it drew, so callers and tests can check them.
"""
from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

from vitshrink._atomic import atomic_path

PNG_DPI = 120
TEACHER_COLOR, STUDENT_COLOR, OTHER_COLOR = "#4c72b0", "#dd8452", "#8c8c8c"
REPORT_PICTURES = {"teacher_vs_student": "teacher_vs_student.png", "training_curves": "training_curves.png"}


def new_figure(width: float, height: float):
    """A matplotlib Figure (constrained layout) not registered with pyplot: no display, no global state."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save_png(figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG at ``path`` atomically (temp file + rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=PNG_DPI)
    return path


# ------------------------------------------------------------------------------------------ training curves
def read_summary(summary_csv: str | Path) -> dict[str, list[float]]:
    """``summary.csv`` as columns of floats (NaN where a cell is empty), epochs numbered from 1."""
    with Path(summary_csv).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{summary_csv}: no epochs recorded")

    def number(text: str | None) -> float:
        try:
            return float(text) if text not in (None, "") else math.nan
        except ValueError:
            return math.nan

    columns = {key: [number(row.get(key)) for row in rows] for key in rows[0]}
    columns["epoch"] = [e + 1 for e in columns["epoch"]]  # the engine counts epochs from 0; people from 1
    return columns


def plot_training_curves(summary_csv: str | Path, path: str | Path, *,
                         teacher_top1: float | None = None) -> dict[str, list[float]]:
    """Loss (train, validation) and validation top-1 per epoch, side by side; returns the drawn columns.

    ``teacher_top1`` (a fraction, as in report.json) draws the teacher's top-1 as a dashed line."""
    from matplotlib.ticker import MaxNLocator

    columns = read_summary(summary_csv)
    epochs = columns["epoch"]
    figure = new_figure(9, 3.4)
    loss_axes, top1_axes = figure.subplots(1, 2)
    loss_axes.plot(epochs, columns["train_loss"], "o-", color=STUDENT_COLOR, label="train loss (recipe objective)")
    if any(not math.isnan(v) for v in columns.get("eval_loss", [])):
        loss_axes.plot(epochs, columns["eval_loss"], "s--", color=TEACHER_COLOR, label="validation loss (CE)")
    loss_axes.set(title="Loss per epoch", xlabel="epoch", ylabel="loss")
    loss_axes.legend()
    top1_axes.plot(epochs, columns["eval_top1"], "o-", color=STUDENT_COLOR, label="student")
    if teacher_top1 is not None:
        top1_axes.axhline(teacher_top1 * 100, color=TEACHER_COLOR, linestyle="--",
                          label=f"teacher ({teacher_top1:.2%})")
    top1_axes.set(title="Validation top-1 per epoch", xlabel="epoch", ylabel="top-1 (%)")
    top1_axes.legend()
    for axes in (loss_axes, top1_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    save_png(figure, path)
    return {key: columns[key] for key in ("epoch", "train_loss", "eval_loss", "eval_top1") if key in columns}


# ---------------------------------------------------------------------------------------- uvc search health
def plot_search_traces(health: dict[str, Any], path: str | Path) -> dict[str, list[float]]:
    """UVC's search (``vitshrink.prune.uvc_health.search_health``): R (expected, and of the hard decisions) against
    the band, and the scale-free loss and the dual z per step, with restarts and the stop marked."""
    trace = health["trace"]
    steps = trace["step"]
    figure = new_figure(9, 3.4)
    r_axes, loss_axes = figure.subplots(1, 2)
    low, high = health["band"]
    r_axes.axhspan(low, high, color=TEACHER_COLOR, alpha=0.15, label=f"band [{low:.2f}, {high:.2f}]")
    r_axes.plot(steps, trace["resource"], "-", color=STUDENT_COLOR, label="R (expected)")
    if "decided" in trace:
        r_axes.plot(steps, trace["decided"], "-", color=OTHER_COLOR, lw=0.8, label="R of the hard decisions")
    r_axes.set(title="Budget R per search step", xlabel="step", ylabel="R (pruned / teacher)")
    loss_axes.plot(steps, trace["loss"], "-", color=STUDENT_COLOR, label="search loss")
    loss_axes.set(title="Search loss and dual z", xlabel="step", ylabel="loss")
    z_axes = loss_axes.twinx()
    z_axes.plot(steps, trace["z"], "-", color=TEACHER_COLOR, lw=0.8, label="z")
    z_axes.set_ylabel("z")
    for axes in (r_axes, loss_axes):
        for restart in health.get("restarts", []):
            axes.axvline(restart["step"], color="red", linestyle=":", lw=1)
        if health.get("stopped_at") is not None:
            axes.axvline(health["stopped_at"], color="black", linestyle="--", lw=1)
        axes.grid(alpha=0.3)
    r_axes.legend(fontsize=8)
    loss_axes.legend(fontsize=8, loc="upper left")
    z_axes.legend(fontsize=8, loc="upper right")
    save_png(figure, path)
    return {key: list(trace[key]) for key in ("step", "resource", "loss", "z") if key in trace}


# ----------------------------------------------------------------------------------- teacher vs student bars
def teacher_student_metrics(report: dict[str, Any]) -> list[tuple[str, float | None, float | None]]:
    """(label, teacher value, student value) per bar panel: top-1 %, params M, GMACs, ORT p50 ms per batch."""
    teacher, student = report["teacher"], report["student"]

    def scaled(value: float | None, factor: float) -> float | None:
        return None if value is None else value * factor

    metrics = [("top-1 (%)", scaled(teacher.get("top1"), 100), scaled(student.get("top1"), 100)),
               ("params (M)", scaled(teacher.get("params"), 1e-6), scaled(student.get("params"), 1e-6)),
               ("GMACs (batch 1)", teacher.get("gmacs"), student.get("gmacs"))]
    for batch, student_ms in (student.get("ort_p50_ms") or {}).items():
        metrics.append((f"ORT p50, batch {batch} (ms)", (teacher.get("ort_p50_ms") or {}).get(batch), student_ms))
    return metrics


def plot_teacher_vs_student(report: dict[str, Any], path: str | Path) -> dict[str, tuple[float | None, float | None]]:
    """One small bar panel per metric (teacher, student), the student / teacher ratio in each title."""
    metrics = teacher_student_metrics(report)
    figure = new_figure(2.4 * len(metrics), 3.2)
    panels = figure.subplots(1, len(metrics), squeeze=False)[0]
    for axes, (label, teacher_value, student_value) in zip(panels, metrics):
        values = [v if v is not None else 0.0 for v in (teacher_value, student_value)]
        bars = axes.bar(["teacher", "student"], values, color=[TEACHER_COLOR, STUDENT_COLOR], width=0.6)
        texts = ["n/a" if v is None else f"{v:.3g}" for v in (teacher_value, student_value)]
        axes.bar_label(bars, labels=texts, padding=2, fontsize=8)
        if None in (teacher_value, student_value) or not teacher_value:
            ratio = ""
        elif label.startswith("top-1"):
            ratio = f"{student_value - teacher_value:+.2f} pt"
        else:
            ratio = f"{student_value / teacher_value:.2f}x teacher"
        axes.set_title(f"{label}\n{ratio}", fontsize=9)
        axes.set_ylim(0, max(values + [1e-9]) * 1.18)
        axes.tick_params(labelsize=8)
    figure.suptitle(f"{report.get('recipe', '')}: teacher vs student", fontsize=10)
    save_png(figure, path)
    return {label: (t, s) for label, t, s in metrics}


# ---------------------------------------------------------------------------------------------- Pareto front
def plot_pareto(points: Sequence[dict[str, Any]], path: str | Path, *, x_label: str, title: str,
                y_label: str = "top-1 (%)") -> dict[str, list]:
    """Accuracy against cost as a PNG (see ``draw_pareto``); returns the drawn data."""
    figure = new_figure(7.5, 4.8)
    drawn = draw_pareto(figure.subplots(), points, x_label=x_label, title=title, y_label=y_label)
    save_png(figure, path)
    return drawn


def draw_pareto(axes, points: Sequence[dict[str, Any]], *, x_label: str, title: str,
                y_label: str = "top-1 (%)", label_size: float = 8) -> dict[str, list]:
    """Accuracy against cost on ``axes``: one marker per point, the Pareto front as a step line, teachers as stars.

    Each point is a dict with ``name``, ``x``, ``y`` (None: no accuracy known, drawn as a dotted vertical
    line at its cost), ``role`` ("teacher" or anything else) and ``pareto`` (bool); optional ``label_offset``
    (points, (dx, dy)) moves its label where the default would collide.
    Returns the drawn data: names, x, y of the scattered points, the front's x/y, the axes labels.
    """
    scattered = [p for p in points if p["y"] is not None and p["x"] is not None]
    front = sorted((p for p in scattered if p.get("pareto")), key=lambda p: p["x"])
    if front:
        axes.step([p["x"] for p in front], [p["y"] for p in front], where="post", color=STUDENT_COLOR, alpha=0.5,
                  linewidth=1.5, label="Pareto front", zorder=1)
    xs = [p["x"] for p in scattered] + [p["x"] for p in points if p["y"] is None and p["x"] is not None]
    label_left_of = min(xs) + 0.75 * (max(xs) - min(xs)) if xs else 0.0  # labels of the right quarter go left
    for point in scattered:
        is_teacher = point.get("role") == "teacher"
        axes.scatter(point["x"], point["y"], marker="*" if is_teacher else "o", s=220 if is_teacher else 55,
                     color=TEACHER_COLOR if is_teacher else (STUDENT_COLOR if point.get("pareto") else OTHER_COLOR),
                     edgecolors="black", linewidths=0.6, zorder=3)
        left = point["x"] > label_left_of
        offset = point.get("label_offset") or ((-8, 6) if left else (6, 5))
        axes.annotate(point["name"], (point["x"], point["y"]), textcoords="offset points", fontsize=label_size,
                      xytext=offset, ha="right" if offset[0] < 0 else "left")
    unscored = [p for p in points if p["y"] is None and p["x"] is not None]
    for point in unscored:
        axes.axvline(point["x"], color=OTHER_COLOR, linestyle=":", linewidth=1.2, zorder=0)
        axes.annotate(f"{point['name']} (no top-1)", (point["x"], 0.98), xycoords=("data", "axes fraction"),
                      rotation=90, va="top", fontsize=7, color="dimgray", xytext=(3, 0), textcoords="offset points")
    # Legend proxies: the teacher star and the front/off-front markers, once each.
    axes.scatter([], [], marker="*", s=160, color=TEACHER_COLOR, edgecolors="black", label="teacher")
    axes.scatter([], [], marker="o", color=STUDENT_COLOR, edgecolors="black", label="on the front")
    axes.scatter([], [], marker="o", color=OTHER_COLOR, edgecolors="black", label="dominated")
    axes.legend(loc="lower right", fontsize=8)
    axes.set(xlabel=x_label, ylabel=y_label, title=title)
    axes.grid(alpha=0.3)
    if xs:  # a margin for the markers and labels
        span = (max(xs) - min(xs)) or abs(max(xs)) or 1.0
        axes.set_xlim(min(xs) - 0.08 * span, max(xs) + 0.08 * span)
    return {"names": [p["name"] for p in scattered], "x": [p["x"] for p in scattered],
            "y": [p["y"] for p in scattered], "front_x": [p["x"] for p in front], "front_y": [p["y"] for p in front],
            "unscored": [p["name"] for p in unscored], "x_label": axes.get_xlabel(), "y_label": axes.get_ylabel()}


# ----------------------------------------------------------------------------------------- a run's pictures
def write_report_pictures(out_dir: str | Path, report: dict[str, Any]) -> tuple[dict[str, Path], list[str]]:
    """Draw a run's pictures into ``out_dir``: training curves (from summary.csv) and teacher vs student bars.

    A picture that cannot be drawn is skipped with a warning, never an exception: the run's results matter
    more than its pictures. Returns (name -> PNG path of each picture drawn, one line per picture that failed).
    """
    out_dir = Path(out_dir)
    drawn: dict[str, Path] = {}
    failures: list[str] = []
    jobs = {"teacher_vs_student": lambda path: plot_teacher_vs_student(report, path)}
    if (out_dir / "summary.csv").is_file():
        jobs["training_curves"] = lambda path: plot_training_curves(
            out_dir / "summary.csv", path, teacher_top1=report.get("teacher", {}).get("top1"))
    for name in REPORT_PICTURES:
        if name not in jobs:
            continue
        path = out_dir / REPORT_PICTURES[name]
        try:
            jobs[name](path)
            drawn[name] = path
        except Exception as exc:  # noqa: BLE001 - any drawing failure must leave the run intact
            failures.append(f"{path.name} not drawn: {type(exc).__name__}: {exc}")
            warnings.warn(failures[-1], RuntimeWarning, stacklevel=2)
    return drawn, failures
