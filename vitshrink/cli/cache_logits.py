"""The cache-logits command: a TinyViT-style cache of the teacher's top-K logits for every training view."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vitshrink.cli import (ArchOpt, DataOpt, ImgSizeOpt, InChansOpt, KeyMapOpt, MeanOpt, NormEpsOpt, NumClassesOpt,
                           NumHeadsOpt, PretrainedOpt, StdOpt, _device, app, console, load_spec)


@app.command("cache-logits")
def cache_logits_command(
    teacher: Annotated[str, typer.Argument(help="teacher SPEC (timm name, .safetensors, .pt/.pth/.th, HF dir)")],
    epochs: Annotated[int, typer.Option("--epochs", help="epochs of augmented views to cache")],
    out: Annotated[Path, typer.Option("--out", help="cache folder (resumed when it holds the same cache)")],
    topk: Annotated[int, typer.Option("--topk", help="logits kept per image-epoch")] = 10,
    data: DataOpt = None,
    recipe: Annotated[str, typer.Option("--recipe", help="preset whose augmentation settings the views use")] = "vanilla",
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML settings (as for distill)")] = None,
    batch_size: Annotated[Optional[int], typer.Option("-b", "--batch-size")] = None,
    val_split: Annotated[float, typer.Option("--val-split")] = 0.1,
    seed: Annotated[int, typer.Option("--seed", help="the distill run's --seed (views are seeded by it)")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto|cpu|cuda (bf16 autocast on CUDA)")] = "auto",
    arch: ArchOpt = None, num_heads: NumHeadsOpt = None, img_size: ImgSizeOpt = None, in_chans: InChansOpt = None,
    num_classes: NumClassesOpt = None, mean: MeanOpt = None, std: StdOpt = None, pretrained: PretrainedOpt = False,
    key_map: KeyMapOpt = None, norm_eps: NormEpsOpt = None,
) -> None:
    """Run TEACHER over EPOCHS epochs of the exact training views and store its top-K logits (resumable)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from vitshrink.data import resolve_data
    from vitshrink.data.logit_cache import bytes_per_image_epoch, cache_logits
    from vitshrink.io import data_config
    from vitshrink.guard import check_outputs_apart, run_lock
    from vitshrink.pipeline import resolve_run_settings

    from vitshrink.validate import check_float, check_int, check_seed

    check_outputs_apart(out_dirs={"--out": out}, inputs={"TEACHER": teacher, "--data": data, "--config": config})
    check_seed(seed)  # before the teacher loads: the inputs decide these
    check_int(epochs, "--epochs", low=1, high=100_000)
    check_int(topk, "--topk", low=1, high=1_000_000)
    check_float(val_split, "--val-split", low=0.0, high=1.0, low_open=True, high_open=True)
    model = load_spec(teacher, arch, num_heads, img_size, in_chans, num_classes, mean, std, pretrained,
                      key_map=key_map, norm_eps=norm_eps)
    flags = {"batch_size": batch_size} if batch_size is not None else {}
    _, settings = resolve_run_settings(recipe, config=config, flags=flags)
    labelled = resolve_data(data, val_split=val_split, seed=seed, in_chans=int(data_config(model)["input_size"][0]))
    n_images = len(labelled.train)
    with run_lock(out), Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[rate]:.1f} images/s"), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("cache", total=epochs * n_images, epoch=0, rate=0.0)

        def progress(epoch: int, done: int, rate: float) -> None:
            bar.update(task, completed=epoch * n_images + done, epoch=epoch + 1, rate=rate)

        meta = cache_logits(model, labelled.train, out, cfg=dict(settings.values), epochs=epochs, topk=topk,
                            seed=seed, num_classes=labelled.num_classes, device=_device(device), progress=progress)
    per = bytes_per_image_epoch(meta["topk"], meta["num_classes"])
    console.print(f"wrote {out}: {meta['epochs_done']} epochs x {meta['images']} images, top-{meta['topk']}, "
                  f"{per} bytes per image-epoch ({per * meta['epochs'] * meta['images'] / 2**20:.1f} MiB)")
