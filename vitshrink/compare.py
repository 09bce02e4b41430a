"""Several models side by side: run folders (their report.json) and ``benchmark --json`` files.

``compare_runs`` reads them into rows (one per student, one per distinct teacher) and marks the Pareto front:
the models that no other model beats on both accuracy (higher top-1) and cost (lower x: ORT latency at one
batch size, GMACs or params). ``plot_comparison`` draws it (``vitshrink.plots.plot_pareto``).

Teachers: every run measured its teacher; runs whose teachers have the same params, GMACs and top-1 share one
teacher row, whose latency is the median of those runs' measurements (so a teacher timed on a busier machine
in one run does not move the star much). Speed-ups in the table are each run's own (teacher and student timed
back to back in the same run), not ratios across runs.

Benchmark files (``vitshrink benchmark --json``) hold cost but no accuracy: their ``model`` joins the table and
is drawn as a dotted vertical line at its cost, outside the front. Written ``FILE.json=TOP1`` (a fraction, e.g.
``student.json=0.713``), it becomes a point with that top-1 and can be on the front. The ``baseline`` of a
benchmark file is not added (compare the runs' teachers instead); its speed-up over the baseline is shown.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from vitshrink.errors import UserError
from vitshrink.io.fields import read_json

X_AXES = {"latency": "ORT latency p50, batch {batch} (ms)", "gmacs": "GMACs (batch 1)", "params": "params (M)"}


@dataclass
class ModelRow:
    """One model in a comparison. ``top1`` is a fraction (None: not known); latency p50 in ms per batch size."""

    name: str
    role: str  # "teacher", "student" or "benchmark"
    source: str
    top1: float | None
    params: int | None
    gmacs: float | None
    ort_p50_ms: dict[str, float | None] = field(default_factory=dict)
    speedup: dict[str, float | None] = field(default_factory=dict)  # own teacher (or baseline) p50 / this p50
    recipe: str | None = None
    distill_seconds: float | None = None
    x: float | None = None
    pareto: bool = False


@dataclass
class Comparison:
    rows: list[ModelRow]
    x_axis: str  # "latency", "gmacs" or "params"
    x_label: str
    batch: str | None  # the batch size of the latency column

    @property
    def pareto(self) -> list[ModelRow]:
        """The Pareto front, cheapest first."""
        return sorted((row for row in self.rows if row.pareto), key=lambda row: row.x)

    def as_dict(self) -> dict[str, Any]:
        return {"x_axis": self.x_axis, "x_label": self.x_label, "batch": self.batch,
                "rows": [asdict(row) for row in self.rows], "pareto": [row.name for row in self.pareto]}


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path, "JSON report", kind=None)


def _run_rows(run_dir: Path) -> tuple[ModelRow, ModelRow]:
    report_path = run_dir / "report.json"
    if not report_path.is_file():
        raise UserError(f"{run_dir}: no report.json (not a finished vitshrink distill run folder)")
    report = _read_json(report_path)
    try:
        teacher, student = report["teacher"], report["student"]
        speedup = (report.get("ratios") or {}).get("ort_speedup") or {}
        student_row = ModelRow(run_dir.name, "student", str(run_dir), student["top1"], student["params"],
                               student["gmacs"], dict(student.get("ort_p50_ms") or {}), dict(speedup),
                               report.get("recipe"), report.get("distill_seconds"))
        teacher_name = ((teacher.get("benchmark") or {}).get("name")) or "teacher"
        teacher_row = ModelRow(teacher_name, "teacher", str(run_dir), teacher["top1"], teacher["params"],
                               teacher["gmacs"], dict(teacher.get("ort_p50_ms") or {}))
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise UserError(f"{report_path}: not a vitshrink report ({type(exc).__name__}: {exc})") from None
    return _checked(student_row, report_path), _checked(teacher_row, report_path)


def _checked(row: ModelRow, path: Path) -> ModelRow:
    """Every number of a row read from a file the user can edit: finite and in range (else a one-line error)."""
    from vitshrink.validate import check_float

    check_float(row.top1, f"{path}: top1", low=0.0, high=1.0, optional=True)
    check_float(row.params, f"{path}: params", low=0.0, optional=True)
    check_float(row.gmacs, f"{path}: gmacs", low=0.0, optional=True)
    check_float(row.distill_seconds, f"{path}: distill_seconds", low=0.0, optional=True)
    for what, values in (("ort_p50_ms", row.ort_p50_ms), ("speedup", row.speedup)):
        for batch, value in values.items():
            if not str(batch).isdigit() or int(batch) < 1:
                raise UserError(f"{path}: {what} has a batch size {batch!r} that is not a positive integer")
            check_float(value, f"{path}: {what}[{batch}]", low=0.0, low_open=True, optional=True)
    if row.recipe is not None and not isinstance(row.recipe, str):
        raise UserError(f"{path}: recipe must be a name, got {row.recipe!r}")
    return row


def _benchmark_row(path: Path, top1: float | None) -> ModelRow:
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("runtimes"), dict):
        raise UserError(f"{path}: not a `vitshrink benchmark --json` file (no 'model' entry)")
    try:
        batches = ((model["runtimes"].get("onnxruntime") or {}).get("batches")) or []
        latency = {str(b["batch_size"]): b["p50_ms"] for b in batches}
        ratios = ((data.get("ratios") or {}).get("runtimes") or {}).get("onnxruntime") or {}
        speedup = {batch: values.get("speedup_p50") for batch, values in ratios.items()}
    except (KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{path}: not a `vitshrink benchmark --json` file ({type(exc).__name__}: {exc})") from None
    return ModelRow(path.stem, "benchmark", str(path), top1, model.get("params"), model.get("gmacs"), latency, speedup)


def _split_top1(argument: str) -> tuple[Path, float | None]:
    """``FILE.json=0.713`` -> (FILE.json, 0.713); a path that exists as written is never split."""
    if Path(argument).exists() or "=" not in argument:
        return Path(argument), None
    path, _, value = argument.rpartition("=")
    try:
        top1 = float(value)
    except ValueError:
        raise UserError(f"{argument}: the top-1 after '=' must be a number, got {value!r}") from None
    if not path.endswith(".json") or not 0.0 <= top1 <= 1.0:
        raise UserError(f"{argument}: write BENCHMARK.json=TOP1 with TOP1 a fraction in [0, 1], e.g. b.json=0.713")
    return Path(path), top1


def _merge_teachers(teachers: list[ModelRow]) -> list[ModelRow]:
    """One row per distinct teacher (same params, GMACs, top-1); latency = median over the runs that timed it."""
    groups: dict[tuple, list[ModelRow]] = {}
    for row in teachers:
        groups.setdefault((row.params, round(row.gmacs or 0.0, 9), round(row.top1 or 0.0, 6)), []).append(row)
    merged = []
    for index, group in enumerate(groups.values()):
        batches = {b for row in group for b in row.ort_p50_ms}
        latency = {b: statistics.median(v) if (v := [r.ort_p50_ms[b] for r in group if r.ort_p50_ms.get(b)])
                   else None for b in sorted(batches, key=int)}
        name = group[0].name if len(groups) == 1 else f"{group[0].name} #{index + 1}"
        merged.append(ModelRow(f"teacher: {name}", "teacher", ", ".join(r.source for r in group), group[0].top1,
                               group[0].params, group[0].gmacs, latency))
    return merged


def _common_batch(rows: list[ModelRow]) -> str | None:
    timed = [row for row in rows if row.ort_p50_ms]
    common = set.intersection(*(set(b for b, v in row.ort_p50_ms.items() if v) for row in timed)) if timed else set()
    return max(common, key=int) if common else None


def pareto_mask(costs: Sequence[float | None], scores: Sequence[float | None]) -> list[bool]:
    """True where no other point has a lower-or-equal cost and a higher-or-equal score, one of them strictly.

    Points with an unknown cost or score are never on the front."""
    known = [(c, s) for c, s in zip(costs, scores) if c is not None and s is not None]
    return [c is not None and s is not None
            and not any(oc <= c and os_ >= s and (oc < c or os_ > s) for oc, os_ in known)
            for c, s in zip(costs, scores)]


def compare_runs(paths: Sequence[str | Path], *, x: str = "latency", batch: int | str | None = None) -> Comparison:
    """Read run folders and benchmark JSON files (``FILE.json=TOP1`` gives one a top-1) into a ``Comparison``.

    ``x``: the cost axis, "latency" (ORT p50 at ``batch``; default: the largest batch size every model was
    timed at), "gmacs" or "params" (millions). Bad input raises ``UserError`` naming the path or option.
    """
    if x not in X_AXES:
        raise UserError(f"--x must be one of {', '.join(X_AXES)}, got {x!r}")
    if not paths:
        raise UserError("compare: give at least one run folder or benchmark JSON file")
    if isinstance(batch, int):
        from vitshrink.validate import check_int

        check_int(batch, "--batch", low=1)
    students: list[ModelRow] = []
    teachers: list[ModelRow] = []
    for argument in paths:
        path, top1 = _split_top1(str(argument))
        if path.is_dir():
            student, teacher = _run_rows(path)
            students.append(student)
            teachers.append(teacher)
        elif path.suffix == ".json" and path.is_file():
            students.append(_checked(_benchmark_row(path, top1), path))
        else:
            raise UserError(f"{path}: neither a run folder (with report.json) nor a benchmark .json file")
    rows = _merge_teachers(teachers) + students
    batch_key = str(batch) if batch is not None else _common_batch(rows)
    if x == "latency":
        if batch_key is None:
            raise UserError("--x latency: these models share no batch size with an ORT latency; use --x gmacs")
        missing = [row.source for row in rows if row.ort_p50_ms.get(batch_key) is None]
        if missing:
            raise UserError(f"--batch {batch_key}: no ORT latency at that batch size in {missing[0]}")
    for row in rows:
        row.x = {"latency": row.ort_p50_ms.get(batch_key) if batch_key else None, "gmacs": row.gmacs,
                 "params": row.params / 1e6 if row.params is not None else None}[x]
    for row, on_front in zip(rows, pareto_mask([row.x for row in rows], [row.top1 for row in rows])):
        row.pareto = on_front
    return Comparison(rows, x, X_AXES[x].format(batch=batch_key), batch_key)


def plot_comparison(comparison: Comparison, path: str | Path, *, title: str | None = None) -> dict[str, list]:
    """Draw the comparison's Pareto plot (top-1 % against its cost axis) as a PNG; return the drawn data."""
    from vitshrink.plots import plot_pareto

    points = [{"name": row.name, "x": row.x, "y": None if row.top1 is None else row.top1 * 100, "role": row.role,
               "pareto": row.pareto} for row in comparison.rows]
    return plot_pareto(points, path, x_label=comparison.x_label,
                       title=title or f"Accuracy vs {comparison.x_label.split(' (')[0]}: Pareto front")
