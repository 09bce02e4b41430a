"""The `vitshrink` command line: parse, call the library, print. No logic lives here.

This module holds the Typer app, the options shared by every command that takes a SPEC, and `main`; each
command group is a module of this package that registers its commands on `app` (imported at the end).
"""
from __future__ import annotations

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
              pretrained: bool = False, *, key_map: Optional[list[str]] = None, norm_eps: Optional[float] = None):
    """Load a SPEC with the shared loading options and print any assumption the loader made."""
    from vitshrink.io import load_model, record_of

    model = load_model(spec, arch=arch, num_heads=num_heads, img_size=img_size, in_chans=in_chans,
                       num_classes=num_classes, mean=_floats(mean, "--mean"), std=_floats(std, "--std"),
                       pretrained=pretrained, key_map=key_map, norm_eps=norm_eps)
    record = record_of(model)
    record.spec = spec
    for note in record.notes:
        err_console.print(f"[yellow]note:[/yellow] {note}")
    return model


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
    """Entry point: run the app; bad input becomes one stderr line and exit code 2."""
    try:
        # Standalone mode: click handles usage errors itself (message + exit 2) and --help.
        app()
    except UserError as exc:
        if _state["debug"]:
            if exc.details:
                err_console.print(exc.details, markup=False, highlight=False)
            raise
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(UserError.exit_code)


# Command modules register their commands on `app` when imported.
from vitshrink.cli import models as _model_commands  # noqa: E402,F401
from vitshrink.cli import distill as _distill_commands  # noqa: E402,F401
from vitshrink.cli import wild as _wild_commands  # noqa: E402,F401
from vitshrink.cli import compare as _compare_commands  # noqa: E402,F401
from vitshrink.cli import synthesize as _synthesize_commands  # noqa: E402,F401
from vitshrink.cli import convert as _convert_commands  # noqa: E402,F401
from vitshrink.cli import recipes as _recipe_commands  # noqa: E402,F401
from vitshrink.cli import cache_logits as _cache_logits_commands  # noqa: E402,F401
