"""The select-wild command."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from vitshrink.cli import (ArchOpt, ImgSizeOpt, InChansOpt, MeanOpt, NumClassesOpt, NumHeadsOpt,
                           KeyMapOpt, NormEpsOpt, PretrainedOpt, StdOpt, _device, app, console, err_console, load_spec)
from vitshrink.errors import UserError


@app.command("select-wild")
def select_wild(
    teacher: Annotated[str, typer.Option("--teacher", help="teacher SPEC (timm name, .safetensors, .pt, HF dir)")],
    pool: Annotated[Path, typer.Option("--pool", help="folder tree of unlabelled images")],
    num: Annotated[Optional[int], typer.Option("--num", help="how many images to select")] = None,
    fraction: Annotated[Optional[float], typer.Option("--fraction", help="share of the readable images to select")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="output dir (default: <pool>-selected)")] = None,
    mode: Annotated[str, typer.Option("--mode", help="copy|link the selected images into OUT/<class>/, or list")] = "copy",
    criterion: Annotated[str, typer.Option("--criterion", help="combined|probe|confidence|energy")] = "combined",
    balanced: Annotated[bool, typer.Option(
        "--balanced", help="best N/C of each predicted class first, then global rank (not in the paper)")] = False,
    blocks: Annotated[Optional[str], typer.Option("--blocks", help="0-based blocks to probe, e.g. 3,7 (default: 1/3 and 2/3 of the depth)")] = None,
    batch_size: Annotated[int, typer.Option("-b", "--batch-size")] = 256,
    workers: Annotated[Optional[int], typer.Option("-j", "--workers")] = None,
    device: Annotated[str, typer.Option("--device", help="auto|cpu|cuda")] = "auto",
    arch: ArchOpt = None, num_heads: NumHeadsOpt = None, img_size: ImgSizeOpt = None, in_chans: InChansOpt = None,
    num_classes: NumClassesOpt = None, mean: MeanOpt = None, std: StdOpt = None, pretrained: PretrainedOpt = False,
    key_map: KeyMapOpt = None, norm_eps: NormEpsOpt = None,
) -> None:
    """Select the pool images the teacher finds meaningful (Attention Probe); resumable; writes scores.csv."""
    from vitshrink.data.wild import select_wild as run_select_wild
    from vitshrink.guard import check_outputs_apart, run_lock

    try:
        block_list = [int(b) for b in blocks.split(",")] if blocks else None
    except ValueError:
        raise UserError(f"--blocks must be comma-separated block indices, got {blocks!r}") from None
    model = load_spec(teacher, arch, num_heads, img_size, in_chans, num_classes, mean, std, pretrained,
                          key_map=key_map, norm_eps=norm_eps)
    out_dir = out if out is not None else pool.parent / f"{pool.name}-selected"
    check_outputs_apart(out_dirs={"--out": out_dir}, inputs={"--teacher": teacher})
    with run_lock(out_dir):
        summary = run_select_wild(model, pool, out_dir, num=num, fraction=fraction, mode=mode, criterion=criterion,
                                  balanced=balanced, blocks=block_list, batch_size=batch_size, workers=workers,
                                  device=_device(device))
    table = Table(title=f"select-wild: {pool} -> {out_dir}", show_header=False)
    table.add_row("criterion", f"{summary.criterion} (probe blocks {summary.blocks or 'none'})")
    table.add_row("scored", f"{summary.scored} ({summary.resumed} from an earlier run)")
    for reason, count in summary.skipped.items():
        table.add_row(f"skipped: {reason}", str(count))
    if summary.other_files:
        table.add_row("ignored (not an image extension)", str(summary.other_files))
    table.add_row("selected", str(summary.selected))
    console.print(table)
    histogram = Table(title="selected per predicted class")
    histogram.add_column("class")
    histogram.add_column("images", justify="right")
    for name, count in summary.class_histogram.items():
        histogram.add_row(name, str(count))
    console.print(histogram)
    for note in summary.notes:
        err_console.print(f"[yellow]note:[/yellow] {note}")
    where = f"images in {out_dir}/<class>/" if summary.mode != "list" else f"list in {out_dir / 'selected.txt'}"
    console.print(f"wrote {summary.scores_csv} and the {where}")
