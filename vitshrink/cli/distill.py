"""The distill command."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from vitshrink.cli import (ArchOpt, DataOpt, ImgSizeOpt, InChansOpt, MeanOpt, NumClassesOpt, NumHeadsOpt,
                           PretrainedOpt, StdOpt, app, console, load_spec)
from vitshrink.errors import UserError


@app.command()
def distill(
    teacher: Annotated[Optional[str], typer.Argument(help="teacher SPEC (default: the bundled CIFAR-10 ViT)")] = None,
    recipe: Annotated[str, typer.Option("--recipe", help="vanilla | deit | ce | ... (recipes/NAME.yaml)")] = "vanilla",
    student: Annotated[Optional[str], typer.Option(
        "--student", help="file or NAME:key=value,... (default: the teacher at half depth)")] = None,
    data: DataOpt = None,
    val_data: Annotated[Optional[Path], typer.Option("--val-data", help="separate validation set")] = None,
    val_split: Annotated[float, typer.Option("--val-split", help="hold-out share when --data has no val split")] = 0.1,
    epochs: Annotated[Optional[int], typer.Option("--epochs")] = None,
    batch_size: Annotated[Optional[int], typer.Option("-b", "--batch-size")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr")] = None,
    warmup_epochs: Annotated[Optional[int], typer.Option("--warmup-epochs")] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay")] = None,
    clip_grad: Annotated[Optional[float], typer.Option("--clip-grad")] = None,
    smoothing: Annotated[Optional[float], typer.Option("--smoothing")] = None,
    device: Annotated[str, typer.Option("--device", help="auto|cpu|cuda")] = "auto",
    amp: Annotated[Optional[bool], typer.Option("--amp/--no-amp", help="bf16 autocast (default: on CUDA)")] = None,
    out: Annotated[Path, typer.Option("--out", "--output", help="run folder")] = Path("output/distill"),
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out from last.pt")] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    config: Annotated[Optional[Path], typer.Option("-c", "--config", help="YAML with preset keys")] = None,
    workers: Annotated[Optional[int], typer.Option("-j", "--workers")] = None,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile student and teacher")] = False,
    flops_target: Annotated[Optional[float], typer.Option(
        "--flops-target", help="target share of the teacher's FLOPs (recipes that search)")] = None,
    checkpoint_steps: Annotated[Optional[int], typer.Option(
        "--checkpoint-steps", help="write last.pt every N steps (0: epoch ends only)")] = None,
    steps_per_epoch: Annotated[Optional[int], typer.Option(
        "--steps-per-epoch", help="cap the optimizer steps of each epoch")] = None,
    no_skip: Annotated[bool, typer.Option("--no-skip", help="uvc ablation: prune within blocks only")] = False,
    skip_only: Annotated[bool, typer.Option("--skip-only", help="uvc ablation: only skip whole blocks")] = False,
    no_kd: Annotated[bool, typer.Option("--no-kd", help="uvc ablation: post-train on labels, no KD")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="any preset key: KEY=VALUE (repeatable)")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    arch: ArchOpt = None, num_heads: NumHeadsOpt = None, img_size: ImgSizeOpt = None, in_chans: InChansOpt = None,
    num_classes: NumClassesOpt = None, mean: MeanOpt = None, std: StdOpt = None, pretrained: PretrainedOpt = False,
) -> None:
    """Distil TEACHER into a smaller student with a recipe; writes the run folder and prints the report."""
    import yaml

    from vitshrink.validate import check_run_options

    check_run_options(seed=seed, val_split=val_split, flops_target=flops_target, workers=workers, epochs=epochs,
                      batch_size=batch_size, lr=lr, out_dir=out)
    from vitshrink.engine import distill as run_distill
    from vitshrink.engine import load_bundled_teacher

    overrides: dict[str, Any] = {}
    for key, value in (("warmup_epochs", warmup_epochs), ("weight_decay", weight_decay), ("clip_grad", clip_grad),
                       ("smoothing", smoothing), ("checkpoint_steps", checkpoint_steps),
                       ("steps_per_epoch", steps_per_epoch)):
        if value is not None:
            overrides[key] = value
    for key, flag in (("no_skip", no_skip), ("skip_only", skip_only), ("no_kd", no_kd)):
        if flag:
            overrides[key] = True
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = yaml.safe_load(value)
    if teacher is None:
        model = load_bundled_teacher()
    else:
        model = load_spec(teacher, arch, num_heads, img_size, in_chans, num_classes, mean, std, pretrained)
        model.vitshrink_spec = teacher
    check_run_options(teacher=model)
    result = run_distill(model, recipe, student=student, data=data, val_data=val_data, out_dir=out, epochs=epochs,
                         batch_size=batch_size, lr=lr, device=device, amp=amp, resume=resume, seed=seed,
                         config=config, overrides=overrides, workers=workers, compile=compile_model,
                         progress=progress, flops_target=flops_target, val_split=val_split)
    if result.report:
        console.print((result.out_dir / "report.md").read_text())
        console.print(f"wrote {result.out_dir}: " + ", ".join(sorted(p.name for p in result.paths.values())))
