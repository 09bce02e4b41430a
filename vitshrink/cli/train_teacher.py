"""The train-teacher command: supervised training of a light teacher (e.g. the involution teacher of co-advise)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vitshrink.cli import DataOpt, _device, app, console


@app.command("train-teacher")
def train_teacher(
    arch: Annotated[str, typer.Argument(help="timm architecture, e.g. rednet_cifar26, resnet18")],
    data: DataOpt = None,
    val_data: Annotated[Optional[Path], typer.Option("--val-data", help="separate validation set")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs")] = None,
    batch_size: Annotated[Optional[int], typer.Option("-b", "--batch-size")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr")] = None,
    img_size: Annotated[Optional[int], typer.Option("--img-size", help="input size (default: the model's)")] = None,
    out: Annotated[Path, typer.Option("--out", "--output", help="run folder")] = Path("output/teacher"),
    device: Annotated[str, typer.Option("--device", help="auto|cpu|cuda")] = "auto",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out from last.pt")] = False,
    workers: Annotated[Optional[int], typer.Option("-j", "--workers")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="any ce setting: KEY=VALUE (repeatable)")] = None,
) -> None:
    """Train ARCH from scratch on --data's labels; writes model.safetensors, model.onnx and a report in --out."""
    from vitshrink.config import parse_overrides
    from vitshrink.guard import check_outputs_apart, run_lock
    from vitshrink.supervised import train_teacher as run_train_teacher

    check_outputs_apart(out_dirs={"--out": out}, inputs={"--data": data, "--val-data": val_data})
    overrides = parse_overrides(set_)

    with run_lock(out):
        result = run_train_teacher(arch, data=data, val_data=val_data, out_dir=out, epochs=epochs,
                                   batch_size=batch_size, lr=lr, img_size=img_size, device=_device(device), seed=seed,
                                   resume=resume, workers=workers, progress=progress, overrides=overrides)
    if result.report:
        console.print((result.out_dir / "report.md").read_text())
