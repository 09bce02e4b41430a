"""report.json / report.md of a distillation run, from numbers measured elsewhere (``vitshrink.measure``,
``vitshrink.evaluation``). This module formats; it measures nothing."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vitshrink._atomic import atomic_write_text


def _ort_p50(bench: dict[str, Any], batch_size: int) -> float | None:
    rows = (bench.get("runtimes", {}).get("onnxruntime") or {}).get("batches", [])
    return next((row["p50_ms"] for row in rows if row["batch_size"] == batch_size), None)


def model_entry(top1: float | None, bench: dict[str, Any], batch_sizes: tuple[int, ...]) -> dict[str, Any]:
    """One model's row: top-1, params, MACs/FLOPs and ORT latency p50 per batch size (from ``measure.benchmark``)."""
    return {
        "top1": top1,
        "params": bench.get("params"),
        "gmacs": bench.get("gmacs"),
        "gflops": bench.get("gflops"),
        "ort_p50_ms": {str(b): _ort_p50(bench, b) for b in batch_sizes},
        "benchmark": bench,
    }


# What report.json / report.md say about the epoch the student comes from (setting select_epoch).
SELECTIONS = {"last": "last epoch (no epoch was chosen on the validation set the top-1 is measured on)",
              "best": "best epoch by top-1 on the validation set, the same set the top-1 is measured on "
                      "(an optimistic estimate)"}


def build_report(*, recipe: str, teacher: dict[str, Any], student: dict[str, Any], distill_seconds: float,
                 epochs: int, best_epoch: int | None, onnx: dict[str, Any] | None, data: str,
                 warnings: list[str] | None = None, notes: list[str] | None = None,
                 selection: str = "last") -> dict[str, Any]:
    """The report dict: teacher vs student and the ratios between them (speed-up = teacher p50 / student p50).

    ``warnings``: what the recipe wants the reader to see (e.g. a pruning search that ended far from its target);
    report.md lists them under "Warnings". ``notes``: facts about the run the numbers depend on (a data-free
    run saw no real training image; no accuracy was measured), shown right under the table.
    """

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    speedup = {b: ratio(teacher["ort_p50_ms"].get(b), student["ort_p50_ms"].get(b)) for b in student["ort_p50_ms"]}
    return {
        "recipe": recipe,
        "data": data,
        "epochs": epochs,
        "best_epoch": best_epoch,
        "model_selection": SELECTIONS.get(selection, selection),
        "distill_seconds": distill_seconds,
        "teacher": teacher,
        "student": student,
        "ratios": {
            "params": ratio(student["params"], teacher["params"]),
            "gmacs": ratio(student["gmacs"], teacher["gmacs"]),
            "ort_speedup": speedup,
            "top1_delta": (student["top1"] - teacher["top1"]) if None not in (student["top1"], teacher["top1"]) else None,
        },
        "onnx": onnx,
        **({"warnings": list(warnings)} if warnings else {}),
        **({"notes": list(notes)} if notes else {}),
    }


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def render_markdown(report: dict[str, Any], out_dir: str | Path | None = None) -> str:
    """report.md's text. Pictures named in ``report["pictures"]`` are embedded when they exist in ``out_dir``
    (or, without ``out_dir``, taken on trust); ``report["warnings"]`` are listed at the end."""
    teacher, student, ratios = report["teacher"], report["student"], report["ratios"]
    lines = [
        f"# vitshrink distill report: `{report['recipe']}`",
        "",
        f"Data: {report['data']}. {report['epochs']} epochs; student from epoch {report['best_epoch']}: "
        f"{report.get('model_selection', 'best epoch by validation top-1')}; "
        f"distillation wall time {report['distill_seconds']:.1f} s.",
        "",
        "| | teacher | student | student / teacher |",
        "|---|---:|---:|---:|",
        f"| top-1 | {_fmt(teacher['top1'], '.2%')} | {_fmt(student['top1'], '.2%')} | "
        f"{_fmt(ratios['top1_delta'] * 100 if ratios['top1_delta'] is not None else None, '+.2f')} pt |",
        f"| params | {_fmt(teacher['params'], ',')} | {_fmt(student['params'], ',')} | {_fmt(ratios['params'], '.3f')} |",
        f"| GMACs (batch 1) | {_fmt(teacher['gmacs'], '.4f')} | {_fmt(student['gmacs'], '.4f')} | "
        f"{_fmt(ratios['gmacs'], '.3f')} |",
    ]
    for batch, speedup in ratios["ort_speedup"].items():
        lines.append(f"| ORT latency p50, batch {batch} (ms) | {_fmt(teacher['ort_p50_ms'].get(batch), '.3f')} | "
                     f"{_fmt(student['ort_p50_ms'].get(batch), '.3f')} | speed-up {_fmt(speedup, '.2f')}x |")
    lines += _pruning_lines(report.get("pruning"), student.get("top1"))
    if report.get("notes"):
        lines += [""] + [f"**{note}**" for note in report["notes"]]
    lines += ["", "GFLOPs = 2 x GMACs. Latency: onnxruntime, CPU provider unless stated in report.json."]
    if report.get("onnx"):
        onnx = report["onnx"]
        lines.append(f"ONNX parity: max |logit diff| {_fmt(onnx.get('max_abs_diff'), '.2e')}, top-1 agreement "
                     f"{_fmt(onnx.get('top1_agree'), '.0%')} on {onnx.get('n_images')} images.")
    lines += _picture_lines(report.get("pictures") or {}, out_dir)
    if report.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {warning}" for warning in report["warnings"]]
    return "\n".join(lines) + "\n"


def _pruning_lines(pruning: dict[str, Any] | None, final_top1: float | None) -> list[str]:
    """A pruning recipe's extras: top-1 of the sliced student before fine-tuning beside the final one, and the
    latency target vs the fitted model's prediction vs the measured student."""
    if not pruning:
        return []
    lines: list[str] = []
    if "top1_after_pruning" in pruning:
        after = pruning["top1_after_pruning"]
        gain = (final_top1 - after) * 100 if None not in (after, final_top1) else None
        lines += ["", f"Top-1 right after pruning, before fine-tuning: {_fmt(after, '.2%')}; after fine-tuning: "
                      f"{_fmt(final_top1, '.2%')} (recovered {_fmt(gain, '+.2f')} pt)."]
    search = pruning.get("search")
    if search:
        stop = (f", stopped in the band at step {search['stopped_at']}" if search.get("stopped_at") is not None
                else "")
        lines += ["", f"Pruning search: {search['steps_run']} steps{stop}, {len(search['restarts'])} restart(s); its own "
                      f"decisions {'reached' if search['decisions_in_band'] else 'missed'} the band "
                      f"[{search['band'][0]:g}, {search['band'][1]:g}] (R {search['search_resource']:.4f}), and the "
                      f"greedy adjustment made {search['greedy_moves']} move(s) (R changed by "
                      f"{search['greedy_change']:.4f}). Traces: uvc_search.png, report.json `pruning.search.trace`."]
    latency = pruning.get("latency")
    if latency:
        lines += ["", f"| latency ratio ({latency['runtime']}, batch {latency['batch_size']}) | target | predicted | "
                      "measured |", "|---|---:|---:|---:|",
                  f"| student / teacher | {latency['target']:g} | {_fmt(latency['predicted_ratio'], '.3f')} | "
                  f"{_fmt(latency['measured_ratio'], '.3f')} |",
                  "", f"Measured: student {_fmt(latency['student_ms'], '.3f')} ms, teacher "
                      f"{_fmt(latency['teacher_ms'], '.3f')} ms (medians of interleaved rounds; the ratio is the median "
                      f"of per-round ratios). Latency model fitted "
                      f"to latency_table.json: max relative error {_fmt(latency.get('fit_max_rel_error'), '.1%')}, "
                      f"mean {_fmt(latency.get('fit_mean_rel_error'), '.1%')}."]
    return lines


_PICTURE_TITLES = {"teacher_vs_student": "Teacher vs student", "training_curves": "Training curves"}


def _picture_lines(pictures: dict[str, str], out_dir: str | Path | None) -> list[str]:
    lines: list[str] = []
    for name, filename in pictures.items():
        if out_dir is not None and not (Path(out_dir) / filename).is_file():
            continue  # never link a picture that is not there
        title = _PICTURE_TITLES.get(name, name.replace("_", " "))
        lines += ["", f"## {title}", "", f"![{title}]({filename})"]
    return lines


def write_report(report: dict[str, Any], out_dir: str | Path, *, pictures: bool = True) -> dict[str, Path]:
    """Write report.json, the run's pictures (``vitshrink.plots``) and report.md, each atomically; return the paths.

    report.json is written first, so a failure while drawing (caught and listed under ``warnings``) or
    anything worse never loses the numbers; it is rewritten with the names of the pictures drawn.
    """
    from vitshrink.plots import write_report_pictures

    out_dir = Path(out_dir)
    paths = {"report_json": out_dir / "report.json", "report_md": out_dir / "report.md"}
    atomic_write_text(paths["report_json"], json.dumps(report, indent=2))
    if pictures:
        drawn, failures = write_report_pictures(out_dir, report)
        report["pictures"] = {name: path.name for name, path in drawn.items()}
        if failures:
            report["warnings"] = [*report.get("warnings", []), *failures]
        atomic_write_text(paths["report_json"], json.dumps(report, indent=2))
        paths.update(drawn)
    atomic_write_text(paths["report_md"], render_markdown(report, out_dir))
    return paths
