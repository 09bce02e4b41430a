"""The `vitshrink` command line: parse, call the library, print. No logic lives here.

This module holds the Typer app, the options shared by every command that takes a SPEC, and `main`; each
command group is a module of this package that registers its commands on `app` (imported at the end).
"""
from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

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
KeyMapOpt = Annotated[Optional[list[str]], typer.Option(
    "--key-map", help="rename checkpoint tensors before loading: 'REGEX=REPLACEMENT' (repeatable)")]
NormEpsOpt = Annotated[Optional[float], typer.Option(
    "--norm-eps", help="LayerNorm epsilon the checkpoint was trained with (timm 1e-6, torch.nn 1e-5)")]
ResolveOpt = Annotated[bool, typer.Option(
    "--resolve", help="decide what the weights cannot tell (heads, norm placement, activation, eps, mean/std) by "
                      "top-1 on labelled images (--data, or the bundled set when the classes match)")]
AssumeOpt = Annotated[Optional[list[str]], typer.Option(
    "--assume", help="state what a foreign layout's weights cannot tell: KEY=VALUE (repeatable): norm_placement="
                     "pre|post, act_layer=gelu|relu|..., head_act=..., head_softmax=true|false, fc_norm=true|false")]
ModuleOpt = Annotated[Optional[str], typer.Option(
    "--module", help="FILE.py:CALLABLE building your own model: its outputs decide how the checkpoint is read "
                     "(runs your code)")]
ModuleArgsOpt = Annotated[Optional[str], typer.Option("--module-args", help="JSON object of keyword arguments "
                                                                             "for --module's CALLABLE")]
DataOpt = Annotated[Optional[Path], typer.Option("--data", help="ImageFolder dir or .tar (default: bundled CIFAR-10)")]


def _floats(text: Optional[str], flag: str) -> Optional[tuple[float, ...]]:
    """``--mean``/``--std`` as numbers: finite, and each std > 0 (vitshrink.validate.parse_floats)."""
    from vitshrink.validate import parse_floats

    return parse_floats(text, flag, positive=flag == "--std")


def parse_assume(items: Optional[list[str]]) -> Optional[dict]:
    """``--assume KEY=VALUE`` items as a dict (true/false as booleans); load_model checks keys and values."""
    if not items:
        return None
    found = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--assume {item!r}: expected KEY=VALUE, e.g. norm_placement=post")
        value = value.strip()
        found[key.strip()] = {"true": True, "false": False}.get(value.lower(), value)
    return found


def load_spec(spec: str, arch: Optional[str], num_heads: Optional[int], img_size: Optional[int],
              in_chans: Optional[int], num_classes: Optional[int], mean: Optional[str], std: Optional[str],
              pretrained: bool = False, *, key_map: Optional[list[str]] = None, norm_eps: Optional[float] = None,
              resolve: bool = False, data: Optional[Path] = None, module: Optional[str] = None,
              module_args: Optional[str] = None, assume: Optional[list[str]] = None):
    """Load a SPEC with the shared loading options and print any assumption the loader made; ``resolve`` or
    ``module`` decide what the weights cannot tell (vitshrink.io.resolve) and print the candidates tried."""
    from vitshrink.validate import check_load_options, check_float

    means, stds = _floats(mean, "--mean"), _floats(std, "--std")
    check_load_options(num_heads=num_heads, img_size=img_size, in_chans=in_chans, num_classes=num_classes,
                       mean=means, std=stds)
    check_float(norm_eps, "--norm-eps", low=0.0, high=1.0, low_open=True, optional=True)
    from vitshrink.io import load_model, record_of  # after the checks: importing torch takes seconds
    load_kwargs = dict(arch=arch, num_heads=num_heads, img_size=img_size, in_chans=in_chans, num_classes=num_classes,
                       mean=means, std=stds, pretrained=pretrained, key_map=key_map, norm_eps=norm_eps,
                       assume=parse_assume(assume))
    if resolve or module:
        from vitshrink.io.resolve import load_resolved

        model, resolution = load_resolved(spec, load_kwargs, data, module=module, module_args=module_args,
                                          require_data=resolve)
        print_resolution(resolution)
    else:
        model = load_model(spec, **load_kwargs)
    record = record_of(model)
    record.spec = spec
    for note in record.notes:
        err_console.print(f"[yellow]note:[/yellow] {note}")
    return model


def print_resolution(resolution) -> None:
    """The candidates tried for what the weights cannot tell (stderr: stdout stays the command's output)."""
    if resolution is None:
        return
    err_console.print(f"decided by behaviour on {resolution.n_images} images of {resolution.data} "
                      "(candidate -> top-1; * = taken):", markup=False, highlight=False, soft_wrap=True)
    for line in resolution.table():
        err_console.print(line, markup=False, highlight=False, soft_wrap=True)


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks for errors")] = False) -> None:
    _state["debug"] = debug


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return name



def main() -> None:
    """Entry point: run the app; bad input becomes one stderr line and exit code 2, any other failure one
    line naming the command and the exception and exit code 1 (``--debug`` shows the traceback)."""
    from typer import _click as click  # typer 0.29 vendors click: its exceptions live here
    from typer.exceptions import Abort, Exit

    _state["debug"] = False
    try:
        from vitshrink.guard import check_no_empty_arguments

        check_no_empty_arguments(sys.argv[1:])  # `--out ""` would be the working directory
        # Not standalone: usage errors come back here and are printed on one line like any bad input.
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except Exit as exc:  # --help and friends
        sys.exit(exc.exit_code)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()  # `vitshrink` alone: the help
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        if _state["debug"]:
            raise
        hint = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) is not None else ""
        message = " ".join(exc.format_message().split())
        err_console.print(f"error: {message}{hint}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except Abort:
        err_console.print("error: aborted", markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)
    except UserError as exc:
        if _state["debug"]:
            if exc.details:
                err_console.print(exc.details, markup=False, highlight=False)
            raise
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(UserError.exit_code)
    except KeyboardInterrupt:
        if _state["debug"]:
            raise
        err_console.print("error: interrupted", markup=False, highlight=False, soft_wrap=True)
        sys.exit(130)
    except OSError as exc:
        if _state["debug"] or exc.errno not in _USER_ERRNOS:
            if _state["debug"]:
                raise
            _fail_unexpected(exc)
        # A full disk, a read-only folder, a vanished file: the user must act, as for bad input.
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        err_console.print(f"error: {_command_name()}: {where}{exc.strerror or exc}", markup=False,
                          highlight=False, soft_wrap=True)
        sys.exit(UserError.exit_code)
    except Exception as exc:  # noqa: BLE001  (the last resort: never a raw traceback)
        if _state["debug"]:
            raise
        _fail_unexpected(exc)


# OS errors the user must fix (space, permissions, paths): exit 2 like bad input.
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR,
                errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP, errno.EFBIG}


def _fail_unexpected(exc: BaseException) -> None:
    text = " ".join(str(exc).split())
    err_console.print(f"error: {_command_name()} failed: {type(exc).__name__}: {text[:500]} "
                      "(rerun with --debug for the traceback)", markup=False, highlight=False, soft_wrap=True)
    sys.exit(1)


def _command_name() -> str:
    """The subcommand in sys.argv (the first word after the global options), for one-line failure messages."""
    words = [a for a in sys.argv[1:] if not a.startswith("-")]
    return f"vitshrink {words[0]}" if words else "vitshrink"


# Command modules register their commands on `app` when imported.
from vitshrink.cli import models as _model_commands  # noqa: E402,F401
from vitshrink.cli import distill as _distill_commands  # noqa: E402,F401
from vitshrink.cli import wild as _wild_commands  # noqa: E402,F401
from vitshrink.cli import compare as _compare_commands  # noqa: E402,F401
from vitshrink.cli import synthesize as _synthesize_commands  # noqa: E402,F401
from vitshrink.cli import convert as _convert_commands  # noqa: E402,F401
from vitshrink.cli import recipes as _recipe_commands  # noqa: E402,F401
from vitshrink.cli import cache_logits as _cache_logits_commands  # noqa: E402,F401
from vitshrink.cli import train_teacher as _train_teacher_commands  # noqa: E402,F401
