"""The synthesize command: data-free images from a teacher (DeepInversion / PSAQ-ViT priors)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from vitshrink.cli import (ArchOpt, ImgSizeOpt, InChansOpt, KeyMapOpt, MeanOpt, NormEpsOpt, NumClassesOpt, NumHeadsOpt,
                           PretrainedOpt, StdOpt, _device, app, console, load_spec)
from vitshrink.data.synthesis_settings import SETTINGS_HELP


@app.command()
def synthesize(
    teacher: Annotated[str, typer.Argument(help="teacher SPEC (timm name, .safetensors, .pt/.pth/.th, HF dir)")],
    num: Annotated[int, typer.Option("--num", help="how many images to synthesise (balanced over classes)")],
    out: Annotated[Path, typer.Option("--out", help="output folder: OUT/<class>/*.png + manifest.csv")],
    prior: Annotated[str, typer.Option("--prior", help="auto|bn|patch-sim (auto: bn for BatchNorm teachers, "
                                                       "patch-sim for ViTs)")] = "auto",
    settings: Annotated[str, typer.Option("--settings", help=f"official settings set: {SETTINGS_HELP}")] = "auto",
    iterations: Annotated[Optional[int], typer.Option(
        "--iterations", help="optimisation steps per batch (default: the settings set's)")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        "-b", "--batch-size", help="images optimised together (default: the settings set's)")] = None,
    divergence_weight: Annotated[Optional[float], typer.Option(
        "--divergence-weight", help="weight of DearKD's intra-divergence term (default: the set's, 0)")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto|cpu|cuda")] = "auto",
    arch: ArchOpt = None, num_heads: NumHeadsOpt = None, img_size: ImgSizeOpt = None, in_chans: InChansOpt = None,
    num_classes: NumClassesOpt = None, mean: MeanOpt = None, std: StdOpt = None, pretrained: PretrainedOpt = False,
    key_map: KeyMapOpt = None, norm_eps: NormEpsOpt = None,
) -> None:
    """Synthesise labelled images from TEACHER alone (no real data); resumable; usable as --data."""
    from vitshrink.data.synthetic import synthesize as run_synthesize
    from vitshrink.guard import check_outputs_apart, run_lock

    check_outputs_apart(out_dirs={"--out": out}, inputs={"TEACHER": teacher})
    model = load_spec(teacher, arch, num_heads, img_size, in_chans, num_classes, mean, std, pretrained,
                      key_map=key_map, norm_eps=norm_eps)
    with run_lock(out):
        result = run_synthesize(model, num, out, prior=prior, iterations=iterations, batch_size=batch_size,
                                device=_device(device), seed=seed, progress=True, settings=settings,
                                divergence_weight=divergence_weight)
    table = Table(title=f"synthesize: {teacher} -> {out}", show_header=False)
    table.add_row("prior", result.prior)
    table.add_row("settings", f"{result.settings.name} (batch {result.settings.batch_size}, divergence weight "
                              f"{result.settings.divergence_weight:g})")
    table.add_row("images", f"{result.num} ({result.batches_made} batches made, "
                            f"{result.batches_skipped} finished earlier)")
    if result.images_per_s is not None:
        table.add_row("speed", f"{result.images_per_s:.2f} images/s ({result.settings.iterations} iterations each)")
    table.add_row("teacher top-1 = target", f"{result.target_agreement:.1%}")
    console.print(table)
    console.print(f"wrote {out}/<class>/*.png and {out / 'manifest.csv'}")
