"""The `vitshrink` command line: parse, call the library, print. No logic lives here."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from vitshrink.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Shrink a Vision Transformer by knowledge distillation, then prove it.")
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}

# Loading options shared by every command that takes a SPEC.
ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="timm architecture for a foreign checkpoint")]
NumHeadsOpt = Annotated[Optional[int], typer.Option("--num-heads", help="heads per block (cannot be inferred from weights)")]
ImgSizeOpt = Annotated[Optional[int], typer.Option("--img-size", help="input size; position embeddings are resampled")]
InChansOpt = Annotated[Optional[int], typer.Option("--in-chans", help="input channels (default: inferred)")]
NumClassesOpt = Annotated[Optional[int], typer.Option("--num-classes", help="classifier classes (default: inferred)")]
MeanOpt = Annotated[Optional[str], typer.Option("--mean", help="normalisation mean, comma-separated, e.g. 0.1307")]
StdOpt = Annotated[Optional[str], typer.Option("--std", help="normalisation std, comma-separated, e.g. 0.3081")]
PretrainedOpt = Annotated[bool, typer.Option("--pretrained", help="timm names: load pretrained weights (needs them offline)")]
DataOpt = Annotated[Optional[Path], typer.Option("--data", help="ImageFolder dir or .tar (default: bundled CIFAR-10)")]


def _floats(text: Optional[str], flag: str) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def load_spec(spec: str, arch: Optional[str], num_heads: Optional[int], img_size: Optional[int],
              in_chans: Optional[int], num_classes: Optional[int], mean: Optional[str], std: Optional[str],
              pretrained: bool = False):
    """Load a SPEC with the shared loading options and print any assumption the loader made."""
    from vitshrink.io import load_model

    model = load_model(spec, arch=arch, num_heads=num_heads, img_size=img_size, in_chans=in_chans,
                       num_classes=num_classes, mean=_floats(mean, "--mean"), std=_floats(std, "--std"),
                       pretrained=pretrained)
    for note in getattr(model, "vitshrink_notes", []) or []:
        err_console.print(f"[yellow]note:[/yellow] {note}")
    return model


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks for errors")] = False) -> None:
    _state["debug"] = debug


@app.command()
def inspect(
    spec: Annotated[str, typer.Argument(help="timm name, .safetensors, .pt/.pth, or HF directory")],
    arch: ArchOpt = None, num_heads: NumHeadsOpt = None, img_size: ImgSizeOpt = None, in_chans: InChansOpt = None,
    num_classes: NumClassesOpt = None, mean: MeanOpt = None, std: StdOpt = None, pretrained: PretrainedOpt = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the summary as JSON")] = None,
) -> None:
    """Architecture summary: family, input, patch size, width, depth, heads, MLP, params, GMACs/GFLOPs."""
    from vitshrink.inspection import describe

    model = load_spec(spec, arch, num_heads, img_size, in_chans, num_classes, mean, std, pretrained)
    info = describe(model)
    table = Table(title=f"{spec}", show_header=False)
    for key, value in info["summary"].items():
        table.add_row(key, str(value))
    console.print(table)
    if info.get("blocks"):
        blocks = Table(title="per block")
        for column in info["blocks"][0]:
            blocks.add_column(column)
        for row in info["blocks"]:
            blocks.add_row(*(str(v) for v in row.values()))
        console.print(blocks)
    if json_out:
        from vitshrink._atomic import atomic_write_text

        atomic_write_text(json_out, json.dumps(info, indent=2))


@app.command()
def evaluate(
    spec: Annotated[str, typer.Argument(help="model SPEC")],
    data: DataOpt = None,
    val_data: Annotated[Optional[Path], typer.Option("--val-data", help="separate validation set")] = None,
    batch_size: Annotated[int, typer.Option("-b", "--batch-size")] = 256,
    workers: Annotated[Optional[int], typer.Option("-j", "--workers")] = None,
    device: Annotated[str, typer.Option("--device", help="auto|cpu|cuda")] = "auto",
    arch: ArchOpt = None, num_heads: NumHeadsOpt = None, img_size: ImgSizeOpt = None, in_chans: InChansOpt = None,
    num_classes: NumClassesOpt = None, mean: MeanOpt = None, std: StdOpt = None, pretrained: PretrainedOpt = False,
) -> None:
    """Top-1/top-5 on the validation split (whole set when it has no split and --val-data is not given)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from vitshrink.data import resolve_eval_split
    from vitshrink.evaluation import evaluate as run_evaluation
    from vitshrink.io import data_config

    model = load_spec(spec, arch, num_heads, img_size, in_chans, num_classes, mean, std, pretrained)
    split, description = resolve_eval_split(data, val_data, in_chans=data_config(model)["input_size"][0])
    with Progress(*Progress.get_default_columns()[:-1], MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err_console) as progress:
        result = run_evaluation(model, split, batch_size=batch_size, workers=workers,
                                device=_device(device), progress=progress)
    console.print(f"{description}: top-1 {result.top1:.4f}  top-5 {result.top5:.4f}  "
                  f"({result.n_images} images, {result.n_skipped} unreadable skipped)")


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return name


@app.command()
def export(
    spec: Annotated[str, typer.Argument(help="model SPEC")],
    output: Annotated[Path, typer.Option("-o", "--output", help="ONNX file to write")],
    data: DataOpt = None,
    arch: ArchOpt = None, num_heads: NumHeadsOpt = None, img_size: ImgSizeOpt = None, in_chans: InChansOpt = None,
    num_classes: NumClassesOpt = None, mean: MeanOpt = None, std: StdOpt = None, pretrained: PretrainedOpt = False,
) -> None:
    """Export to ONNX (dynamic batch) and check it against PyTorch on real images."""
    from vitshrink.data import sample_images
    from vitshrink.export import export_onnx
    from vitshrink.io import data_config

    model = load_spec(spec, arch, num_heads, img_size, in_chans, num_classes, mean, std, pretrained)
    sample = sample_images(data_config(model), data)
    result = export_onnx(model, output, sample=sample)
    console.print(f"wrote {output}: max |logit diff| {result.max_abs_diff:.2e} (limit 1e-4), top-1 agreement "
                  f"{result.top1_agree:.0%} on {result.n_images} real images, batch sizes {result.batch_sizes_checked}")


@app.command()
def benchmark(
    model: Annotated[str, typer.Argument(help=".onnx file or model SPEC")],
    baseline: Annotated[Optional[str], typer.Option("--baseline", help="another .onnx or SPEC to compare with")] = None,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes")] = "1,32",
    threads: Annotated[Optional[int], typer.Option("--threads")] = None,
    min_time: Annotated[float, typer.Option("--min-time", help="seconds of timed calls per batch size")] = 2.0,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the results as JSON")] = None,
    arch: ArchOpt = None, num_heads: NumHeadsOpt = None, img_size: ImgSizeOpt = None, in_chans: InChansOpt = None,
    num_classes: NumClassesOpt = None, mean: MeanOpt = None, std: StdOpt = None, pretrained: PretrainedOpt = False,
) -> None:
    """Params, FLOPs (attention counted), latency p50/p90/p99 and throughput on onnxruntime and PyTorch."""
    from vitshrink.measure import benchmark as run_benchmark
    from vitshrink.measure import compare

    try:
        sizes = tuple(int(v) for v in batch_sizes.split(","))
    except ValueError:
        raise UserError(f"--batch-sizes must be comma-separated integers, got {batch_sizes!r}") from None

    def target(spec: str):
        if spec.endswith(".onnx"):
            if not Path(spec).exists():
                raise UserError(f"{spec}: file not found")
            return spec
        return load_spec(spec, arch, num_heads, img_size, in_chans, num_classes, mean, std, pretrained)

    result = run_benchmark(target(model), batch_sizes=sizes, threads=threads, min_time_s=min_time, name=model)
    output: dict[str, Any] = {"model": result}
    if baseline is not None:
        base = run_benchmark(target(baseline), batch_sizes=sizes, threads=threads, min_time_s=min_time, name=baseline)
        output["baseline"] = base
        output["ratios"] = compare(result, base)
    _print_benchmark(output)
    if json_out:
        from vitshrink._atomic import atomic_write_text

        atomic_write_text(json_out, json.dumps(output, indent=2))
        console.print(f"wrote {json_out}")


def _print_benchmark(output: dict[str, Any]) -> None:
    for role in ("model", "baseline"):
        result = output.get(role)
        if result is None:
            continue
        gmacs = result.get("gmacs")
        flops = f"{gmacs:.4f} GMACs / {2 * gmacs:.4f} GFLOPs" if gmacs is not None else "FLOPs n/a"
        table = Table(title=f"{role}: {result['name']} — {result['params']:,} params, {flops}, "
                            f"{result.get('threads')} threads")
        for column in ("runtime", "batch", "p50 ms", "p90 ms", "p99 ms", "img/s"):
            table.add_column(column, justify="right")
        for runtime, entry in result["runtimes"].items():
            if "skipped" in entry:
                table.add_row(runtime, "-", "-", "-", "-", entry["skipped"])
                continue
            where = entry.get("provider") or entry.get("device")
            for row in entry["batches"]:
                table.add_row(f"{runtime} ({where})", str(row["batch_size"]), f"{row['p50_ms']:.3f}",
                              f"{row['p90_ms']:.3f}", f"{row['p99_ms']:.3f}", f"{row['throughput_ips']:.1f}")
        console.print(table)
    ratios = output.get("ratios")
    if ratios:
        table = Table(title="model / baseline")
        table.add_column("metric")
        table.add_column("ratio", justify="right")
        for key in ("params_ratio", "macs_ratio"):
            if ratios.get(key) is not None:
                table.add_row(key.replace("_", " "), f"{ratios[key]:.3f}")
        for runtime, per_batch in ratios.get("runtimes", {}).items():
            for batch, values in per_batch.items():
                for key, value in values.items():
                    if value is not None:
                        table.add_row(f"{runtime} batch {batch} {key.replace('_', ' ')}", f"{value:.3f}")
        console.print(table)


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
    result = run_distill(model, recipe, student=student, data=data, val_data=val_data, out_dir=out, epochs=epochs,
                         batch_size=batch_size, lr=lr, device=device, amp=amp, resume=resume, seed=seed,
                         config=config, overrides=overrides, workers=workers, compile=compile_model,
                         progress=progress, flops_target=flops_target, val_split=val_split)
    if result.report:
        console.print((result.out_dir / "report.md").read_text())
        console.print(f"wrote {result.out_dir}: " + ", ".join(sorted(p.name for p in result.paths.values())))


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
) -> None:
    """Select the pool images the teacher finds meaningful (Attention Probe); resumable; writes scores.csv."""
    from vitshrink.data.wild import select_wild as run_select_wild

    try:
        block_list = [int(b) for b in blocks.split(",")] if blocks else None
    except ValueError:
        raise UserError(f"--blocks must be comma-separated block indices, got {blocks!r}") from None
    model = load_spec(teacher, arch, num_heads, img_size, in_chans, num_classes, mean, std, pretrained)
    out_dir = out if out is not None else pool.parent / f"{pool.name}-selected"
    summary = run_select_wild(model, pool, out_dir, num=num, fraction=fraction, mode=mode, criterion=criterion,
                              balanced=balanced,
                              blocks=block_list, batch_size=batch_size, workers=workers, device=_device(device))
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


def main() -> None:
    """Entry point: run the app; bad input becomes one stderr line and exit code 2."""
    try:
        # Standalone mode: click handles usage errors itself (message + exit 2) and --help.
        app()
    except UserError as exc:
        if _state["debug"]:
            raise
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(UserError.exit_code)
