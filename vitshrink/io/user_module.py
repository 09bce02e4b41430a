"""``--module FILE.py:CALLABLE``: the user's own model code as the ground truth for reading their checkpoint.

This is the only place vitshrink runs code the user did not install, and only on their explicit request. The
callable (with ``--module-args`` JSON as keyword arguments) builds their module; the checkpoint loads into it
strictly (read weights-only); the checkpoint is read into ``vitshrink_vit`` as usual, each computation the
weights leave open (heads, norm placement, activation, LayerNorm eps) is compared with the user's logits on
real images, and the one that matches within ``PARITY_LIMIT`` is kept. When none does, the block outputs of both
are hooked and the error names where they first diverge.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitshrink.errors import UserError
from vitshrink.io.record import data_config, record_of

PARITY_LIMIT = 1e-4
PARITY_IMAGES = 16


def build_user_module(module: str, module_args: str | None) -> nn.Module:
    """``CALLABLE(**json.loads(module_args))`` from ``FILE.py``, in eval mode; one-line errors for every fault."""
    file, sep, name = module.rpartition(":")
    if not sep or not file or not name.isidentifier():
        raise UserError(f"--module {module!r}: expected FILE.py:CALLABLE, e.g. my_vit.py:build_model")
    path = Path(file).expanduser()
    if path.suffix != ".py" or not path.is_file():
        raise UserError(f"--module {module}: {file} is not a Python file" + ("" if path.exists() else " (not found)"))
    kwargs = _module_kwargs(module_args)
    spec = importlib.util.spec_from_file_location(f"vitshrink_user_module_{abs(hash(str(path.resolve())))}", path)
    code = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))  # its own sibling imports
    try:
        spec.loader.exec_module(code)
    except Exception as exc:  # noqa: BLE001  (anything the user's file raises on import)
        raise UserError(f"--module {module}: importing {file} failed "
                        f"({type(exc).__name__}: {_first_line(exc)})") from None
    finally:
        sys.path.remove(str(path.resolve().parent))
    factory = getattr(code, name, None)
    if not callable(factory):
        defined = sorted(k for k, v in vars(code).items()
                         if callable(v) and getattr(v, "__module__", "") == code.__name__)
        raise UserError(f"--module {module}: {file} defines no callable {name} "
                        f"(it defines: {', '.join(defined) or 'none'})")
    try:
        built = factory(**kwargs)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"--module {module}: {name}(**{kwargs}) failed ({type(exc).__name__}: {_first_line(exc)}); "
                        f"check --module-args") from None
    if not isinstance(built, nn.Module):
        raise UserError(f"--module {module}: {name}(...) returned a {type(built).__name__}, not a torch nn.Module")
    return built.eval()


def _module_kwargs(module_args: str | None) -> dict[str, Any]:
    if module_args is None:
        return {}
    try:
        kwargs = json.loads(module_args)
    except json.JSONDecodeError as exc:
        raise UserError(f"--module-args: not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(kwargs, dict):
        raise UserError(f"--module-args: expected a JSON object of keyword arguments, got a {type(kwargs).__name__}")
    return kwargs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def load_into_user_module(user: nn.Module, spec: str | os.PathLike, module: str) -> None:
    """The checkpoint's tensors into the user's module, strictly (``.pt`` read with ``weights_only=True``)."""
    from vitshrink.io.readers import TORCH_SUFFIXES, read_safetensors, read_torch_state_dict

    path = Path(str(spec)).expanduser()
    if path.suffix.lower() == ".safetensors":
        state = read_safetensors(path)[0]
    elif path.suffix.lower() in TORCH_SUFFIXES:
        state = read_torch_state_dict(path, [])
    else:
        raise UserError(f"--module: {spec} is not a .safetensors or .pt state dict")
    try:
        user.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise UserError(f"--module {module}: {spec} does not load strictly into the module it builds "
                        f"({detail[:400]}); check --module-args") from None


@torch.no_grad()
def match_user_module(spec: str | os.PathLike, model: nn.Module, module: str, module_args: str | None,
                      open_: Any, data: str | os.PathLike | None, load_kwargs: dict[str, Any]) -> nn.Module:
    """The reading of ``spec`` whose logits equal the user's module's on real images (else a UserError saying
    where the two first diverge)."""
    from vitshrink.data import sample_images
    from vitshrink.io.resolve import EPS_CANDIDATES, load_candidate, structure_candidates

    user = build_user_module(module, module_args)
    load_into_user_module(user, spec, module)
    images = sample_images(data_config(model), data, n=PARITY_IMAGES)
    reference = _logits(user, images)
    structures = structure_candidates(model, open_)
    if "head_softmax" not in (load_kwargs.get("assume") or {}):  # no tensor shows it; the logits do
        structures = [s + (("head_softmax", ending),) for ending in (False, True) for s in structures]
    if open_.eps:  # the assumed epsilon first
        current = next((float(m.eps) for m in model.modules() if isinstance(m, nn.LayerNorm)), EPS_CANDIDATES[0])
        epsilons = sorted(EPS_CANDIDATES, key=lambda eps: abs(eps - current))
        structures = [s + (("norm_eps", eps),) for s in structures for eps in epsilons]
    best, best_diff, best_kwargs = model, float("inf"), ()
    for kwargs in structures:
        candidate = load_candidate(spec, load_kwargs, dict(kwargs)) if kwargs else model
        out = _logits(candidate, images)
        diff = (out - reference).abs().max().item() if out.shape == reference.shape else float("inf")
        if diff < best_diff:
            best, best_diff, best_kwargs = candidate, diff, kwargs
        if diff <= PARITY_LIMIT:
            break
    settings = ", ".join(f"{k}={v}" for k, v in best_kwargs) or "as loaded"
    if not best_diff <= PARITY_LIMIT:
        raise UserError(f"--module {module}: no reading of {spec} reproduces your module's logits (best: {settings}, "
                        f"max |logit diff| {best_diff:.3g} on {len(images)} real images, limit {PARITY_LIMIT:g}); "
                        f"{first_divergence(user, best, images)}")
    record = record_of(best)
    record.notes = [n for n in record.notes if not ("assumed" in n and ("num_heads=" in n
                                                                       or "the weights cannot tell" in n))]
    record.notes.append(f"--module {module}: logits match your module within {best_diff:.1e} on {len(images)} real "
                        f"images ({settings})")
    return best


def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = model.eval()(images)
    out = sum(out) / len(out) if isinstance(out, (tuple, list)) else out
    return out.float()


def first_divergence(user: nn.Module, model: nn.Module, images: torch.Tensor) -> str:
    """Where the user's module and vitshrink's first differ: the embeddings, a block's output, or the head."""
    theirs_list = _block_list(user, len(model.blocks))
    if theirs_list is None:
        return (f"your module has no list of {len(model.blocks)} blocks to compare with block by block; compare "
                f"norm placement, activation and head count with your code")
    ours, theirs = _block_io(model, list(model.blocks), images), _block_io(user, theirs_list, images)
    for index, ((our_in, our_out), (their_in, their_out)) in enumerate(zip(ours, theirs)):
        if index == 0:
            gap = _gap(our_in, their_in)
            if gap is None or gap > PARITY_LIMIT:
                what = "have other shapes" if gap is None else f"differ by {gap:.3g}"
                return f"the embeddings (input of block 0) {what}: patch embedding, class token or position table?"
        gap = _gap(our_out, their_out)
        if gap is None or gap > PARITY_LIMIT:
            what = "has another shape" if gap is None else f"differs by {gap:.3g}"
            return (f"block {index} output {what} (its input matches within {PARITY_LIMIT:g}): norm placement, "
                    f"activation, head count or LayerNorm eps?")
    return "every block output matches: the final norm, the pooling or the head differ (a softmax at the end?)"


def _block_list(user: nn.Module, depth: int) -> list[nn.Module] | None:
    """The user's transformer blocks: the largest ``ModuleList``/``Sequential`` of ``depth`` modules."""
    found = [m for m in user.modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) == depth
             and all(sum(1 for _ in child.parameters()) >= 4 for child in m)]
    if not found:
        return None
    return list(max(found, key=lambda m: sum(p.numel() for p in m.parameters())))


def _block_io(model: nn.Module, blocks: list[nn.Module], images: torch.Tensor) -> list[tuple[Any, Any]]:
    captured: list[list[Any]] = [[None, None] for _ in blocks]
    handles = []
    for index, block in enumerate(blocks):
        def pre(_module, args, kwargs, index=index):
            captured[index][0] = args[0] if args else next(iter(kwargs.values()), None)

        def post(_module, _args, output, index=index):
            captured[index][1] = output[0] if isinstance(output, tuple) else output

        handles += [block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post)]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return [tuple(pair) for pair in captured]


def _gap(ours: Any, theirs: Any) -> float | None:
    """max |difference| of two token tensors, allowing (tokens, batch, dim) against (batch, tokens, dim)."""
    if not isinstance(ours, torch.Tensor) or not isinstance(theirs, torch.Tensor):
        return None
    if theirs.shape != ours.shape and theirs.dim() == 3 and theirs.transpose(0, 1).shape == ours.shape:
        theirs = theirs.transpose(0, 1)
    if theirs.shape != ours.shape:
        return None
    return (ours.float() - theirs.float()).abs().max().item()
