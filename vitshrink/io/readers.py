"""Reading tensors from files: safetensors (with its metadata) and ``.pt`` state dicts, weights-only.

Nothing here builds a model. ``torch.load`` always runs with ``weights_only=True``: a file holding
pickled Python objects is refused with advice, never unpickled.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.models import clean_state_dict

from vitshrink.errors import UserError

TORCH_SUFFIXES = (".pt", ".pth", ".th", ".bin")
# Wrappers that training scripts put around the state dict (timm, DeiT, torchvision references...).
STATE_DICT_WRAPPERS = ("model", "state_dict", "model_ema", "state_dict_ema")


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # SafetensorError, OSError: truncated or not safetensors at all
        raise UserError(f"{path}: not a readable safetensors file ({one_line(exc)})") from None
    if not state:
        raise UserError(f"{path}: the safetensors file holds no tensors")
    check_dtypes(state, path)
    return state, metadata


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file, without reading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception as exc:  # SafetensorError, OSError: truncated or not safetensors at all
        raise UserError(f"{path}: not a readable safetensors file ({one_line(exc)})") from None


# Loading casts every tensor to the model's dtype: complex values would lose their imaginary part and 8-bit
# (quantised) weights their scale, giving a model that runs and is silently wrong. Refused instead.
_REFUSED_DTYPES = {torch.complex32, torch.complex64, torch.complex128, torch.int8, torch.uint8, torch.qint8,
                   torch.quint8, torch.qint32}


def check_dtypes(state: dict[str, torch.Tensor], path: Path) -> None:
    for key, tensor in state.items():
        if tensor.dtype in _REFUSED_DTYPES:
            raise UserError(f"{path}: tensor {key} is {str(tensor.dtype).replace('torch.', '')}; vitshrink loads "
                            "real-valued float weights only (dequantise or convert the checkpoint first)")


def read_torch_state_dict(path: Path, notes: list[str]) -> dict[str, torch.Tensor]:
    """The state dict in a ``.pt/.pth/.th/.bin`` file, read with ``weights_only=True``."""
    import pickle

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():
            raise UserError(
                f"{path}: refused for safety: the file stores pickled Python objects (not only tensors), and "
                f"unpickling them could run arbitrary code; where you trust it, re-save it as a plain state dict: "
                f"torch.save(model.state_dict(), 'weights.pt') or safetensors.torch.save_file(model.state_dict(), "
                f"'weights.safetensors')"
            ) from None
        detail = str(exc).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        raise UserError(f"{path}: not a PyTorch checkpoint (unreadable pickle: {' '.join(detail.split())[:100]})") from None
    except Exception as exc:  # RuntimeError from a truncated zip, EOFError, OSError...
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({one_line(exc)[:120]})") from None
    return unwrap_state_dict(obj, path, notes)


def unwrap_state_dict(obj: Any, path: Path, notes: list[str]) -> dict[str, torch.Tensor]:
    """Find the tensors inside ``{'model': ...}``-style wrappers and drop DDP/compile prefixes."""
    for _ in range(3):  # wrappers nest at most a couple of levels in practice
        if not isinstance(obj, dict) or all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        present = [k for k in STATE_DICT_WRAPPERS if isinstance(obj.get(k), dict)]
        if not present:
            break
        if len(present) > 1:
            notes.append(f"{path.name}: used the '{present[0]}' weights (the file also has {present[1:]})")
        obj = obj[present[0]]
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path}: no state dict found (expected a dict of tensors, got {type(obj).__name__})")
    bad_keys = [k for k in obj if not isinstance(k, str)]
    if bad_keys:
        raise UserError(f"{path}: state dict key {bad_keys[0]!r} is not a string (not a PyTorch state dict)")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise UserError(f"{path}: no tensors found (top-level keys: {', '.join(map(str, list(obj)[:8]))})")
    # timm's helper strips "module." (DDP) and "_orig_mod." (torch.compile) in either order.
    state = clean_state_dict(state)
    check_dtypes(state, path)
    return {k.replace("._orig_mod.", "."): v for k, v in state.items()}
