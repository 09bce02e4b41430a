"""Commands on one model: inspect, evaluate, export, benchmark."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from vitshrink.cli import (ArchOpt, AssumeOpt, DataOpt, ImgSizeOpt, InChansOpt, MeanOpt, NumClassesOpt, NumHeadsOpt,
                           KeyMapOpt, ModuleArgsOpt, ModuleOpt, NormEpsOpt, ResolveOpt, PretrainedOpt,
                           StdOpt, _device, app, console, err_console, load_spec)
from vitshrink.errors import UserError


@app.command()
def inspect(
    spec: Annotated[str, typer.Argument(help="timm name, .safetensors, .pt/.pth, or HF directory")],
    arch: ArchOpt = None, num_heads: NumHeadsOpt = None, img_size: ImgSizeOpt = None, in_chans: InChansOpt = None,
    num_classes: NumClassesOpt = None, mean: MeanOpt = None, std: StdOpt = None, pretrained: PretrainedOpt = False,
    key_map: KeyMapOpt = None, norm_eps: NormEpsOpt = None, resolve: ResolveOpt = False,
    module: ModuleOpt = None, module_args: ModuleArgsOpt = None, assume: AssumeOpt = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the summary as JSON")] = None,
) -> None:
    """Architecture summary: family, input, patch size, width, depth, heads, MLP, params, GMACs/GFLOPs."""
    from vitshrink.guard import check_outputs_apart
    from vitshrink.inspection import describe
    from vitshrink.validate import check_output_file

    check_outputs_apart(out_files={"--json": json_out}, inputs={"SPEC": spec})
    if json_out:
        check_output_file(json_out, "--json")
    model = load_spec(spec, arch, num_heads, img_size, in_chans, num_classes, mean, std, pretrained,
                      key_map=key_map, norm_eps=norm_eps, resolve=resolve,
                      module=module, module_args=module_args, assume=assume)
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
    key_map: KeyMapOpt = None, norm_eps: NormEpsOpt = None, resolve: ResolveOpt = False,
    module: ModuleOpt = None, module_args: ModuleArgsOpt = None, assume: AssumeOpt = None,
) -> None:
    """Top-1/top-5 on the validation split (whole set when it has no split and --val-data is not given)."""
    from rich.progress import MofNCompleteColumn, Progress, TimeRemainingColumn

    from vitshrink.data import resolve_eval_split
    from vitshrink.evaluation import evaluate as run_evaluation
    from vitshrink.io import data_config

    model = load_spec(spec, arch, num_heads, img_size, in_chans, num_classes, mean, std, pretrained,
                          key_map=key_map, norm_eps=norm_eps, resolve=resolve, data=data,
                          module=module, module_args=module_args, assume=assume)
    split, description = resolve_eval_split(data, val_data, in_chans=data_config(model)["input_size"][0])
    with Progress(*Progress.get_default_columns()[:-1], MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err_console) as progress:
        result = run_evaluation(model, split, batch_size=batch_size, workers=workers,
                                device=_device(device), progress=progress)
    console.print(f"{description}: top-1 {result.top1:.4f}  top-5 {result.top5:.4f}  "
                  f"({result.n_images} images, {result.n_skipped} unreadable skipped)")


@app.command()
def export(
    spec: Annotated[str, typer.Argument(help="model SPEC")],
    output: Annotated[Path, typer.Option("-o", "--output", help="ONNX file to write")],
    data: DataOpt = None,
    arch: ArchOpt = None, num_heads: NumHeadsOpt = None, img_size: ImgSizeOpt = None, in_chans: InChansOpt = None,
    num_classes: NumClassesOpt = None, mean: MeanOpt = None, std: StdOpt = None, pretrained: PretrainedOpt = False,
    key_map: KeyMapOpt = None, norm_eps: NormEpsOpt = None, resolve: ResolveOpt = False,
    module: ModuleOpt = None, module_args: ModuleArgsOpt = None, assume: AssumeOpt = None,
) -> None:
    """Export to ONNX (dynamic batch) and check it against PyTorch on real images."""
    from vitshrink.data import sample_images
    from vitshrink.export import export_onnx
    from vitshrink.io import data_config
    from vitshrink.guard import check_outputs_apart
    from vitshrink.validate import check_output_file

    check_outputs_apart(out_files={"--output": output}, inputs={"SPEC": spec, "--data": data})
    check_output_file(output, "--output")
    model = load_spec(spec, arch, num_heads, img_size, in_chans, num_classes, mean, std, pretrained,
                      key_map=key_map, norm_eps=norm_eps, resolve=resolve, data=data,
                      module=module, module_args=module_args, assume=assume)
    sample = sample_images(data_config(model), data)
    result = export_onnx(model, output, sample=sample)
    console.print(f"wrote {output}: max |logit diff| {result.max_abs_diff:.2e} (limit 1e-4), top-1 agreement "
                  f"{result.top1_agree:.0%} on {result.n_images} real images, batch sizes {result.batch_sizes_checked}")
    if result.outputs == "probabilities":
        console.print("note: the model's head ends in softmax: the ONNX output 'logits' holds probabilities")


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
    key_map: KeyMapOpt = None, norm_eps: NormEpsOpt = None,
) -> None:
    """Params, FLOPs (attention counted), latency p50/p90/p99 and throughput on onnxruntime and PyTorch."""
    from vitshrink.measure import benchmark as run_benchmark
    from vitshrink.measure import compare

    from vitshrink.validate import check_output_file, parse_ints

    from vitshrink.guard import check_outputs_apart

    sizes = parse_ints(batch_sizes, "--batch-sizes", low=1)
    check_outputs_apart(out_files={"--json": json_out}, inputs={"MODEL": model, "--baseline": baseline})
    if json_out:
        check_output_file(json_out, "--json")

    def target(spec: str):
        if spec.endswith(".onnx"):
            if not Path(spec).exists():
                raise UserError(f"{spec}: file not found")
            return spec
        return load_spec(spec, arch, num_heads, img_size, in_chans, num_classes, mean, std, pretrained,
                          key_map=key_map, norm_eps=norm_eps)

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
