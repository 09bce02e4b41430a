"""`vitshrink compare`: several runs (and benchmark files) in one table and one Pareto plot."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.table import Table

from vitshrink.cli import app, console
from vitshrink.errors import UserError


@app.command()
def compare(
    runs: Annotated[list[str], typer.Argument(
        help="run folders (with report.json) and `benchmark --json` files; FILE.json=TOP1 gives a file its top-1")],
    plot: Annotated[Optional[Path], typer.Option("--plot", help="write the Pareto plot to this PNG")] = None,
    x: Annotated[str, typer.Option("--x", help="cost axis: latency|gmacs|params")] = "latency",
    batch: Annotated[Optional[int], typer.Option("--batch", help="batch size of the latency column "
                                                 "(default: the largest every model was timed at)")] = None,
) -> None:
    """Top-1, params, GMACs, ORT latency, speed-up and distillation time of several models; the Pareto front."""
    from vitshrink.compare import compare_runs, plot_comparison
    from vitshrink.guard import check_outputs_apart
    from vitshrink.validate import check_output_file

    read = {f"RUN {run}": Path(run) / "report.json" if Path(run).is_dir() else run.rsplit("=", 1)[0]
            for run in runs}
    check_outputs_apart(out_files={"--plot": plot}, inputs=read)
    if plot is not None:
        check_output_file(plot, "--plot")
    comparison = compare_runs(runs, x=x, batch=batch)
    table = Table(title=f"{len(comparison.rows)} models; * = Pareto front on top-1 vs {comparison.x_label}",
                  box=box.SIMPLE_HEAD, pad_edge=False,
                  caption=f"ms b{comparison.batch}: onnxruntime p50 latency at batch {comparison.batch}; speed-up: p50 of "
                          "the run's own teacher (a benchmark file: its baseline) / p50; KD s: distillation wall time")
    table.add_column("model", overflow="fold", min_width=12)
    table.add_column("recipe")
    for column in ("top-1", "params", "GMACs", f"ms b{comparison.batch}", "speed-up", "KD s"):
        table.add_column(column, justify="right")

    def fmt(value, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    for row in comparison.rows:
        table.add_row(("* " if row.pareto else "  ") + row.name, row.recipe or ("" if row.role == "teacher" else row.role), fmt(row.top1, ".2%"), fmt(row.params and row.params / 1e6, ".2f") + "M",
                      fmt(row.gmacs, ".4f"), fmt(row.ort_p50_ms.get(comparison.batch), ".4g"),
                      "" if row.role == "teacher" else fmt(row.speedup.get(comparison.batch), ".2f") + "x",
                      fmt(row.distill_seconds, ".1f"), style="bold" if row.pareto else None)
    console.print(table)
    if plot is not None:
        try:
            plot_comparison(comparison, plot)
        except OSError as exc:
            raise UserError(f"--plot {plot}: cannot write the picture ({exc.strerror or exc})") from None
        console.print(f"wrote {plot}", soft_wrap=True)
