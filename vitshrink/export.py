"""ONNX export with a parity check against PyTorch on real images.

Exporter: torch's dynamo-based ``torch.onnx.export(dynamo=True)`` (the default since torch 2.9) with
``dynamic_shapes`` for the batch axis; it exports timm ViTs (fused attention becomes MatMul/Softmax)
and CNNs at any resolution. Only if it raises do we fall back to the TorchScript exporter
(``dynamo=False`` with ``dynamic_axes``), and ``ParityResult.exporter`` says which one wrote the file.

The file has one input ``"input"`` (N, C, H, W) and one output ``"logits"`` (N, classes) with a
symbolic batch dim ``"batch"``. It is written to a temporary file next to the target and renamed
only after the parity check passed, so a failed export never leaves a file behind.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from vitshrink._atomic import NO_ROOM, atomic_path
from vitshrink.errors import UserError
from vitshrink.runtime import eval_mode, model_device, ort_session, resolve_input_size

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
_MAX_SINGLE_FILE_BYTES = 2 * 1024**3  # protobuf limit of a single-file ONNX model

log = logging.getLogger(__name__)


class ExportParityError(UserError):
    """The exported ONNX file does not reproduce PyTorch's logits (one-line message, CLI exit code 2).

    A subclass of ``UserError`` so the CLI reports it like any other failure the user must act on
    (e.g. raise ``--atol`` or report the model), without a traceback.
    """


@dataclass
class ParityResult:
    """Outcome of comparing onnxruntime's logits with PyTorch's on the same images.

    With ``export_onnx(check=False)``: ``checked`` is False and the comparison fields are None/empty.
    """

    path: str
    passed: bool | None
    max_abs_diff: float | None  # over every logit of every batch checked
    top1_agree: float | None  # fraction of images whose arg-max class is the same
    n_images: int
    batch_sizes_checked: list[int] = field(default_factory=list)
    atol: float | None = None
    exporter: str = "dynamo"  # "dynamo" or "torchscript" (fallback)
    opset: int | None = None
    checked: bool = True
    outputs: str = "logits"  # "probabilities" when the model's head ends in softmax (vitshrink_vit head_softmax)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Logits(nn.Module):
    """Wraps a classifier so the graph has exactly one output: the logits.

    Distilled ViTs can return ``(cls, dist)`` logits; like evaluation, the export averages the heads.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002  (the ONNX input name)
        output = self.model(input)
        if isinstance(output, (tuple, list)):
            return sum(output) / len(output)
        return output


def _export_dynamo(wrapper: nn.Module, example: torch.Tensor, path: Path, opset: int | None) -> None:
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},), opset_version=opset, verbose=False, optimize=True)
    program.save(str(path), external_data=False)


def _export_torchscript(wrapper: nn.Module, example: torch.Tensor, path: Path, opset: int | None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (example,), str(path), dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset or 17, do_constant_folding=True)


def write_onnx(model: nn.Module, path: str | os.PathLike, *, input_size: Sequence[int] | None = None,
               opset: int | None = None, exporter: str = "dynamo") -> str:
    """Export ``model`` (in eval mode; its training flags are restored) to ``path``; return the exporter used.

    No parity check and not atomic: ``export_onnx`` is the public entry point that does both. ``exporter``
    ``"torchscript"`` skips the dynamo exporter (a tenth of a second instead of seconds; for throw-away timing
    probes such as uvc's latency table).
    """
    path = Path(path)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if param_bytes >= _MAX_SINGLE_FILE_BYTES:
        raise UserError(f"{path}: model weights are {param_bytes / 1024**3:.1f} GiB; single-file ONNX is limited to 2 GiB")
    size = resolve_input_size(model, input_size)
    # Batch 2, not 1: torch.export specialises a dim whose example size is 1.
    example = torch.randn(2, *size, device=model_device(model))
    wrapper = _Logits(model)
    with eval_mode(model), torch.no_grad():
        if exporter == "torchscript":
            _export_torchscript(wrapper, example, path, opset)
            return "torchscript"
        try:
            _export_dynamo(wrapper, example, path, opset)
            return "dynamo"
        except Exception as exc:  # the dynamo exporter raises many types (export, onnxscript, lowering)
            if isinstance(exc, OSError) and exc.errno in NO_ROOM:
                raise  # the file could not be written (full disk, size limit): the fallback would fail too
            log.warning("dynamo ONNX export failed (%s: %s); falling back to the TorchScript exporter",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            _export_torchscript(wrapper, example, path, opset)
            return "torchscript"


def bundled_sample(model: nn.Module, n_images: int = 8) -> torch.Tensor:
    """``n_images`` real images of the bundled CIFAR-10 val tar, spanning the classes, in the model's transform."""
    from vitshrink.data import sample_images
    from vitshrink.io import data_config

    return sample_images(data_config(model), None, n=n_images)


def check_parity(model: nn.Module, path: str | os.PathLike, sample: torch.Tensor, *, atol: float = 1e-4) -> ParityResult:
    """Run the ONNX file on ``sample`` (whole batch, then batch 1) on CPU and compare with PyTorch's logits."""
    session = ort_session(path, providers=["CPUExecutionProvider"])
    with eval_mode(model), torch.no_grad():
        expected = _Logits(model)(sample.to(model_device(model))).float().cpu().numpy()
    if not np.isfinite(expected).all():
        raise ExportParityError(f"{path}: the model outputs NaN or infinite logits on real images; not exported")
    images = sample.detach().float().cpu().numpy()
    got_full = session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    got_one = session.run([OUTPUT_NAME], {INPUT_NAME: images[:1]})[0]
    if got_full.shape != expected.shape or got_one.shape != expected[:1].shape:
        raise ExportParityError(f"ONNX output shapes {got_full.shape}/{got_one.shape} differ from "
                                f"PyTorch's {expected.shape}")
    max_abs_diff = float(max(np.abs(got_full - expected).max(), np.abs(got_one - expected[:1]).max()))
    top1_agree = float((got_full.argmax(1) == expected.argmax(1)).mean())
    same_one = bool(got_one.argmax(1)[0] == expected.argmax(1)[0])
    passed = bool(max_abs_diff <= atol and top1_agree == 1.0 and same_one)
    return ParityResult(path=str(path), passed=passed, max_abs_diff=max_abs_diff, top1_agree=top1_agree,
                        n_images=len(images), batch_sizes_checked=[len(images), 1], atol=atol)


def _onnx_opset(path: Path) -> int | None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def export_onnx(model: nn.Module, path: str | os.PathLike, *, sample: torch.Tensor | None = None,
                opset: int | None = None, check: bool = True, atol: float = 1e-4) -> ParityResult:
    """Export ``model`` to ``path`` (input "input", output "logits", dynamic batch) and prove it matches PyTorch.

    ``sample``: a real image batch (N >= 2, already in the model's transform); default: 8 images of
    the bundled CIFAR-10 val tar. Parity = max |logit difference| <= ``atol`` (fp32) and the same top-1
    class on every image, at batch N and at batch 1. On failure ``ExportParityError`` is raised and
    no file is left at ``path``. The model itself is not modified (training flags are restored).
    """
    from vitshrink.validate import (check_finite_weights, check_float, check_int, check_output_file,
                                    check_outputs_finite)

    path = check_output_file(path, "--output")
    check_int(opset, "opset", low=7, high=30, optional=True)
    check_float(atol, "atol")  # finite; a negative atol is a way to force the parity failure (tests)
    check_finite_weights(model, f"{path}: cannot export")
    if sample is not None and (sample.ndim != 4 or sample.shape[0] < 2):
        raise UserError(f"export sample must be an image batch (N, C, H, W) with N >= 2, got shape {tuple(sample.shape)}")
    size = tuple(sample.shape[1:]) if sample is not None else None
    if sample is not None:
        check_outputs_finite(model, sample, f"{path}: cannot export")
    with atomic_path(path) as tmp:
        exporter = write_onnx(model, tmp, input_size=size, opset=opset)
        if not check:
            result = ParityResult(path=str(path), passed=None, max_abs_diff=None, top1_agree=None, n_images=0,
                                  checked=False)
        else:
            images = sample if sample is not None else bundled_sample(model)
            result = check_parity(model, tmp, images, atol=atol)
            result.path = str(path)
            if not result.passed:
                raise ExportParityError(
                    f"{path}: ONNX export does not match PyTorch (max |logit diff| {result.max_abs_diff:.3g} vs "
                    f"atol {atol:g}, top-1 agreement {result.top1_agree:.1%} on {result.n_images} images); "
                    "no file written")
        result.exporter = exporter
        result.opset = _onnx_opset(tmp)
        if getattr(getattr(model, "module", model), "head_softmax", False):
            result.outputs = "probabilities"
    return result
