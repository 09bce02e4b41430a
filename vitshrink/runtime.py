"""Where and how a model runs: its device, eval mode, input size, and onnxruntime sessions.

Shared by ``vitshrink.export`` (parity checks) and ``vitshrink.measure`` (counting, timing), so that
neither imports the other's internals: imports go measure -> export -> runtime.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from vitshrink.errors import UserError


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def resolve_input_size(model: nn.Module, input_size: Sequence[int] | None) -> tuple[int, ...]:
    if input_size is not None:
        size = tuple(int(v) for v in input_size)
    else:
        from vitshrink.io import data_config

        size = tuple(int(v) for v in data_config(model)["input_size"])
    if len(size) != 3 or min(size) < 1:
        raise UserError(f"input size must be (channels, height, width), got {size}")
    return size


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own training flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def ort_providers() -> list[str]:
    """CUDA when both onnxruntime and torch can use it, else CPU."""
    import onnxruntime as ort

    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def ort_session(path: str | os.PathLike, *, threads: int | None = None, providers: Sequence[str] | None = None):
    """An onnxruntime session (``threads`` = intra-op threads; None = onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers or ort_providers()))
