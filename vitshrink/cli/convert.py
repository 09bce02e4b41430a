"""The convert command."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vitshrink.cli import (ArchOpt, AssumeOpt, ImgSizeOpt, InChansOpt, KeyMapOpt, MeanOpt, ModuleArgsOpt, ModuleOpt,
                           NormEpsOpt, NumClassesOpt, NumHeadsOpt, StdOpt, _floats, app, console, err_console,
                           parse_assume, print_resolution)


@app.command()
def convert(
    spec: Annotated[str, typer.Argument(help="checkpoint: .pt/.pth/.safetensors state dict or HF directory")],
    output: Annotated[Path, typer.Option("-o", "--output", help=".safetensors file to write")],
    data: Annotated[Optional[Path], typer.Option(
        "--data", help="labelled images: parity sample, top-1, and what the weights cannot tell decided by "
                       "behaviour (default: the bundled CIFAR-10 sample for 10-class RGB models)")] = None,
    arch: ArchOpt = None, num_heads: NumHeadsOpt = None, img_size: ImgSizeOpt = None, in_chans: InChansOpt = None,
    num_classes: NumClassesOpt = None, mean: MeanOpt = None, std: StdOpt = None,
    key_map: KeyMapOpt = None, norm_eps: NormEpsOpt = None, module: ModuleOpt = None,
    module_args: ModuleArgsOpt = None, assume: AssumeOpt = None,
) -> None:
    """Write SPEC as a vitshrink safetensors with its architecture record; later commands need no loading flags."""
    from vitshrink.guard import check_outputs_apart
    from vitshrink.io.convert import convert as run_convert

    check_outputs_apart(out_files={"--output": output}, inputs={"SPEC": spec, "--data": data})
    result = run_convert(spec, output, data=data, arch=arch, num_heads=num_heads, img_size=img_size,
                         in_chans=in_chans, num_classes=num_classes, mean=_floats(mean, "--mean"),
                         std=_floats(std, "--std"), key_map=key_map, norm_eps=norm_eps, module=module,
                         module_args=module_args, assume=parse_assume(assume))
    for note in result.notes:
        err_console.print(f"[yellow]note:[/yellow] {note}")
    print_resolution(result.resolution)
    if result.top1 is not None:
        console.print(f"top-1 {result.top1:.4f} on {result.n_eval_images} images of {data or 'the bundled set'}")
    console.print(f"wrote {result.path}: max |logit diff| {result.max_abs_diff:.2e} (limit 1e-4) against the "
                  f"loaded checkpoint on {result.n_parity_images} real images")
