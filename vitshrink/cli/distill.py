"""The distill command.

Besides the options below, every setting of the chosen recipe is a flag: ``--kebab-name VALUE`` (e.g. uvc's
``--flops-target 0.3``, ``--search-steps 50``; a true/false option given without a value, like ``--no-skip``,
means true). ``--set KEY=VALUE`` and ``-c FILE`` reach the same settings (``vitshrink recipes show NAME``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from vitshrink.cli import (ArchOpt, AssumeOpt, DataOpt, ImgSizeOpt, InChansOpt, MeanOpt, NumClassesOpt, NumHeadsOpt,
                           KeyMapOpt, ModuleArgsOpt, ModuleOpt, NormEpsOpt, ResolveOpt, PretrainedOpt,
                           StdOpt, app, console, load_spec)
from vitshrink.errors import UserError


def parse_setting_flags(args: list[str], recipe: str) -> tuple[dict[str, Any], list[str]]:
    """``--kebab-name VALUE`` / ``--kebab-name=VALUE`` -> ``{snake_name: value}`` (values read as YAML), and the
    arguments that are not flags (click hands a TEACHER written after such flags over with them).

    A setting whose default is true/false may stand alone (``--no-skip``: true). Unknown names are left for the
    settings merge, which names the known ones.
    """
    from vitshrink.config import load_preset, parse_yaml

    defaults = load_preset(recipe)
    options: dict[str, Any] = {}
    positionals: list[str] = []
    i = 0
    while i < len(args):
        item = args[i]
        i += 1
        if not item.startswith("--") or len(item) < 3:
            positionals.append(item)
            continue
        name, sep, value = item[2:].partition("=")
        key = name.replace("-", "_")
        following = args[i] if i < len(args) and not args[i].startswith("--") else None
        if not sep and isinstance(defaults.get(key), bool):
            value = "true"
            if following is not None and _is_bool(following):
                value, i = following, i + 1
        elif not sep:
            if following is None:
                raise UserError(f"--{name}: expected a value")
            value, i = following, i + 1
        options[key] = parse_yaml(value, f"--{name} {value!r:.60}")
    return options, positionals


def _is_bool(text: str) -> bool:
    from vitshrink.config import parse_yaml

    try:
        return isinstance(parse_yaml(text, "value"), bool)
    except UserError:  # not YAML at all: a positional argument (the TEACHER), not this flag's value
        return False


def parse_logit_caches(items: Optional[list[str]]) -> dict[str, str]:
    """``--logit-cache PATH`` (the main teacher) or ``ROLE=PATH``, repeatable -> role -> path."""
    caches: dict[str, str] = {}
    for item in items or []:
        role, sep, path = item.partition("=")
        role, path = (role.strip(), path) if sep else ("teacher", item)
        if role in caches:
            raise UserError(f"--logit-cache: two caches for the {role} teacher")
        caches[role] = path
    return caches


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def distill(
    ctx: typer.Context,
    teacher: Annotated[Optional[str], typer.Argument(help="teacher SPEC (default: the bundled CIFAR-10 ViT)")] = None,
    recipe: Annotated[str, typer.Option("--recipe", help="vanilla | deit | ce | ... (vitshrink recipes)")] = "vanilla",
    student: Annotated[Optional[str], typer.Option(
        "--student", help="file or NAME:key=value,... (default: the teacher at half depth)")] = None,
    data: DataOpt = None,
    val_data: Annotated[Optional[Path], typer.Option("--val-data", help="separate validation set")] = None,
    val_split: Annotated[float, typer.Option("--val-split", help="hold-out share when --data has no val split")] = 0.1,
    epochs: Annotated[Optional[int], typer.Option("--epochs")] = None,
    batch_size: Annotated[Optional[int], typer.Option("-b", "--batch-size")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr")] = None,
    device: Annotated[str, typer.Option("--device", help="auto|cpu|cuda")] = "auto",
    amp: Annotated[Optional[bool], typer.Option("--amp/--no-amp", help="bf16 autocast (default: on CUDA)")] = None,
    out: Annotated[Path, typer.Option("--out", "--output", help="run folder")] = Path("output/distill"),
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out from last.pt")] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    config: Annotated[Optional[Path], typer.Option("-c", "--config", help="YAML of settings")] = None,
    workers: Annotated[Optional[int], typer.Option("-j", "--workers")] = None,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile student and teacher")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="any setting: KEY=VALUE (repeatable)")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    logit_cache: Annotated[Optional[list[str]], typer.Option(
        "--logit-cache", help="read the teacher's logits from a cache-logits folder: PATH, or ROLE=PATH per "
                              "teacher role (repeatable)")] = None,
    data_free: Annotated[Optional[bool], typer.Option(
        "--data-free", help="train on images synthesised from the teacher into OUT/synthetic (no real image); "
                            "validate with --val-data")] = None,
    synth_num: Annotated[Optional[int], typer.Option("--synth-num", help="images to synthesise (--data-free)")] = None,
    arch: ArchOpt = None, num_heads: NumHeadsOpt = None, img_size: ImgSizeOpt = None, in_chans: InChansOpt = None,
    num_classes: NumClassesOpt = None, mean: MeanOpt = None, std: StdOpt = None, pretrained: PretrainedOpt = False,
    key_map: KeyMapOpt = None, norm_eps: NormEpsOpt = None, resolve: ResolveOpt = False,
    module: ModuleOpt = None, module_args: ModuleArgsOpt = None, assume: AssumeOpt = None,
) -> None:
    """Distil TEACHER into a smaller student with a recipe; writes the run folder and prints the report.

    Any setting of the recipe is also a flag, --kebab-name VALUE (see `vitshrink recipes show NAME`).
    """
    from vitshrink.config import parse_overrides
    from vitshrink.guard import check_outputs_apart, run_lock
    from vitshrink.validate import check_run_options

    check_outputs_apart(out_dirs={"--out": out}, inputs={
        "TEACHER": teacher, "--student": student, "--data": data, "--val-data": val_data, "--config": config,
        **{f"--logit-cache {role}": path for role, path in parse_logit_caches(logit_cache).items()}})
    # Before the teacher loads (seconds); the pipeline checks them again for Python callers.
    check_run_options(seed=seed, val_split=val_split, workers=workers, epochs=epochs, batch_size=batch_size, lr=lr,
                      out_dir=out)
    from vitshrink.pipeline import distill as run_distill
    from vitshrink.pipeline import load_bundled_teacher
    from vitshrink.recipes import get_recipe

    from vitshrink.students import check_student_spec

    get_recipe(recipe)  # an unknown recipe is named before its flags are read
    check_student_spec(student)  # before the teacher and the data load
    extra = list(ctx.args)
    if teacher is not None and teacher.startswith("--"):  # click filled TEACHER with a setting flag
        extra, teacher = [teacher, *extra], None
    options, positionals = parse_setting_flags(extra, recipe)
    if positionals and teacher is None:
        teacher, positionals = positionals[0], positionals[1:]
    if positionals:
        raise UserError(f"unexpected argument {positionals[0]!r} (settings are flags: --name VALUE)")
    overrides = parse_overrides(set_)
    if teacher is None:
        model = load_bundled_teacher()
    else:
        model = load_spec(teacher, arch, num_heads, img_size, in_chans, num_classes, mean, std, pretrained,
                          key_map=key_map, norm_eps=norm_eps, resolve=resolve, data=data,
                          module=module, module_args=module_args, assume=assume)
    with run_lock(out):
        result = run_distill(model, recipe, student=student, data=data, val_data=val_data, out_dir=out,
                             epochs=epochs, batch_size=batch_size, lr=lr, device=device, amp=amp, resume=resume,
                             seed=seed, config=config, overrides=overrides, workers=workers, compile=compile_model,
                             progress=progress, val_split=val_split, options=options,
                             logit_cache=parse_logit_caches(logit_cache), data_free=data_free, synth_num=synth_num)
    if result.report:
        console.print((result.out_dir / "report.md").read_text())
        console.print(f"wrote {result.out_dir}: " + ", ".join(sorted(p.name for p in result.paths.values())))
