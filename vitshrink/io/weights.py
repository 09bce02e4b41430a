"""Fitting a state dict to a timm model: check it against the model's shapes first, then build and load.

``build_and_load`` builds the architecture on the meta device (no memory), compares every tensor's
shape with the state dict, and only then builds the model for real: a record asking for an absurd
size fails on the tensors it does not match, with one line, before anything is allocated.
"""
from __future__ import annotations

import difflib
import functools
import math
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from vitshrink.errors import UserError
from vitshrink.io.readers import one_line
from vitshrink.io.record import create_model


def first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) else value


def require_timm_name(name: str, what: str) -> None:
    import vitshrink.models  # noqa: F401  (registers vitshrink's own timm models)

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models() for the names"
    raise UserError(f"{name}: unknown {what}{hint}")


@functools.lru_cache(maxsize=32)
def probe(name: str) -> nn.Module:
    """The arch with default arguments, on the meta device (no memory, no init cost): for its defaults."""
    import vitshrink.models  # noqa: F401

    try:
        with torch.device("meta"):
            return timm.create_model(name)
    except Exception:  # a model whose init needs real tensors: build it for real, once
        return timm.create_model(name)


def is_vision_transformer(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def create_checked(name: str, kwargs: dict[str, Any], source: str, *, meta: bool = False) -> nn.Module:
    """``create_model`` with constructor failures turned into one line naming ``source``."""
    try:
        if meta:
            with torch.device("meta"):
                return create_model(name, **kwargs)
        return create_model(name, **kwargs)
    except TypeError as exc:
        raise UserError(f"{source}: timm model {name} does not accept these options {sorted(kwargs)} ({exc})") from None
    except (AssertionError, ValueError, RuntimeError, IndexError, KeyError, ZeroDivisionError) as exc:
        raise UserError(f"{source}: cannot build {name} with {kwargs} ({type(exc).__name__}: {exc})") from None


def build_and_load(name: str, kwargs: dict[str, Any], state: dict[str, torch.Tensor], source: Path | str,
                   label: str) -> nn.Module:
    """Build ``name(**kwargs)`` and load ``state`` strictly; shapes are checked on a meta build first."""
    try:
        with torch.device("meta"):
            shell = create_model(name, **kwargs)
    except Exception:  # a constructor that needs real tensors: the real build below reports any fault
        shell = None
    if shell is not None:
        check_state(shell.state_dict(), state, source, label)
    model = create_checked(name, kwargs, source=str(source))
    load_state_checked(model, state, source, label)
    return model


def check_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: Path | str,
                label: str) -> None:
    """One line naming the tensors missing / left over (with the ``--key-map`` rule that renames them), else the
    first tensor whose shape differs. Names come first: a renamed tensor is a name problem, and the sizes read
    from a half-recognised file are not worth comparing."""
    # Checkpoints from PyTorch < 0.4.1 have no BatchNorm step counter; it does not affect the outputs.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if not missing and not unexpected:
        for key, tensor in state.items():
            if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
                raise UserError(f"{source}: {key} has shape {tuple(tensor.shape)} but arch {label} expects "
                                f"{tuple(expected[key].shape)}")
        return
    details = ("tensors in the file that the model lacks:\n  " + "\n  ".join(
        f"{k} {tuple(state[k].shape)}" for k in unexpected) + "\ntensors the model needs that the file lacks:\n  "
        + "\n  ".join(f"{k} {tuple(expected[k].shape)}" for k in missing))
    hint = " (--debug lists every unmatched key)"
    suggestion = suggest_key_map(unexpected, missing, state, expected)
    if suggestion is not None:
        found, wanted, rules, fixed = suggestion
        flags = " ".join(f"--key-map '{rule}'" for rule in rules)
        raise UserError(f"{source}: {found} {tuple(state[found].shape)} looks like {wanted}: try {flags} ({fixed} of "
                        f"{len(unexpected)} unmatched tensors would match){hint}", details)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{source}: arch {label} needs tensor {missing[0]}{more}, which the file lacks{hint}", details)
    more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
    raise UserError(f"{source}: tensor {unexpected[0]}{more} is not part of arch {label}{hint}", details)


# timm names a foreign file may hold under another name even when the arch built has no such tensor (a head
# when the file's classifier was not recognised), with their number of dimensions.
STANDARD_TENSORS = {"head.weight": 2, "head.bias": 1, "norm.weight": 1, "norm.bias": 1, "cls_token": 3,
                    "pos_embed": 3, "patch_embed.proj.weight": 4, "patch_embed.proj.bias": 1}
MAX_RULES = 3


def suggest_key_map(unexpected: list[str], missing: list[str], state: dict[str, torch.Tensor],
                    expected: dict[str, torch.Tensor]) -> tuple[str, str, list[str], int] | None:
    """``--key-map`` rules (greedy, at most ``MAX_RULES``) renaming the most unmatched file tensors onto needed
    names: (first file tensor, the name it maps to, rules, tensors they fix).

    A file tensor pairs with a needed name of the same shape, or, since sizes read from a half-recognised file
    can be wrong, of the same rank whose name contains or shares its last part with it; top-level tensors pair
    with top-level names, block tensors with names of the same block. Each rule replaces the dotted segment
    where the two names differ (with the segment before it as context, e.g. ``mlp\\.0\\.=mlp.fc1.``).
    """
    targets = {k: (tuple(v.shape), v.dim()) for k, v in expected.items() if k in set(missing)}
    targets.update({k: (None, rank) for k, rank in STANDARD_TENSORS.items() if k not in expected})
    remaining, rules, fixed, first = list(unexpected), [], 0, None
    for _ in range(MAX_RULES):
        best = _best_rule(remaining, targets, state)
        if best is None:
            break
        found, wanted, rule, mapped = best
        first = first or (found, wanted)
        rules.append(rule)
        fixed += len(mapped)
        remaining = [k for k in remaining if k not in mapped]
        for target in mapped.values():
            targets.pop(target, None)
    return (first[0], first[1], rules, fixed) if rules else None


def _best_rule(unexpected: list[str], targets: dict[str, tuple[tuple[int, ...] | None, int]],
               state: dict[str, torch.Tensor]) -> tuple[str, str, str, dict[str, str]] | None:
    import re

    best, best_score, tried = None, (0, 0), set()
    for found in unexpected[:64]:
        for wanted in targets:
            if not _plausible(found, wanted, tuple(state[found].shape), targets[wanted]):
                continue
            rule = _rule_between(found, wanted)
            if rule is None or rule in tried:
                continue
            tried.add(rule)
            pattern, replacement = rule.split("=", 1)
            mapped = {k: re.sub(pattern, replacement, k) for k in unexpected}
            mapped = {k: v for k, v in mapped.items() if v in targets and v != k
                      and _plausible(k, v, tuple(state[k].shape), targets[v])}
            same_shape = sum(tuple(state[k].shape) == targets[v][0] for k, v in mapped.items())
            if len(set(mapped.values())) == len(mapped) and (len(mapped), same_shape) > best_score:
                best, best_score = (found, wanted, rule, mapped), (len(mapped), same_shape)
    return best


def _plausible(found: str, wanted: str, shape: tuple[int, ...], target: tuple[tuple[int, ...] | None, int]) -> bool:
    import re

    def block(name: str) -> str | None:  # a numbered block holds modules (blocks.3.attn.x), a Sequential leaf not
        match = re.search(r"(?:^|\.)(\d+)\.[^.]+\.", name)
        return match.group(1) if match else None

    if block(found) != block(wanted):
        return False
    if shape == target[0]:
        return True
    head, tail = found.rsplit(".", 1)[-1], wanted.rsplit(".", 1)[-1]
    return len(shape) == target[1] and (head == tail or wanted in found or found in wanted)


def _rule_between(found: str, wanted: str) -> str | None:
    import re

    a, b = found.split("."), wanted.split(".")
    start = 0
    while start < min(len(a), len(b)) and a[start] == b[start]:
        start += 1
    end = 0
    while end < min(len(a), len(b)) - start and a[-1 - end] == b[-1 - end]:
        end += 1
    old, new = a[start:len(a) - end], b[start:len(b) - end]
    if not old:  # a segment inserted (patch_embed.weight -> patch_embed.proj.weight)
        if start == 0 or not new:
            return None
        lead = "^" if start == 1 else r"\."
        pattern = lead + re.escape(a[start - 1]) + r"\." + f"(?!{re.escape('.'.join(new))}\\.)"
        return f"{pattern}={'' if start == 1 else '.'}{'.'.join([a[start - 1]] + new)}."
    context = [a[start - 1]] if start > 0 and not a[start - 1].isdigit() else []
    lead = "" if context or start == 0 else "."
    pattern = (re.escape(lead) + re.escape(".".join(context + old))) if start else "^" + re.escape(".".join(old))
    replacement = lead + ".".join(context + new)
    return f"{pattern}\\.={replacement}." if end else f"{pattern}$={replacement}"


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], source: Path | str, label: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the first offending tensor."""
    expected = model.state_dict()
    check_state(expected, state, source, label)
    state = {**{k: torch.zeros_like(v) for k, v in expected.items()
                if k.endswith("num_batches_tracked") and k not in state}, **state}
    model.load_state_dict(state, strict=True)


def resample_pos_embed(state: dict[str, torch.Tensor], new_img_size: int, patch_size: int,
                       no_embed_class: bool, source: Path) -> dict[str, torch.Tensor]:
    """Interpolate the position embedding to a new patch grid (prefix-token rows are kept as they are)."""
    from timm.layers import resample_abs_pos_embed

    if new_img_size % patch_size:
        raise UserError(f"{source}: --img-size {new_img_size} is not a multiple of the model's patch size {patch_size}")
    num_prefix = 0 if no_embed_class else (
        int("cls_token" in state) + int("dist_token" in state)
        + (int(state["reg_token"].shape[1]) if "reg_token" in state else 0))
    pos_embed = state["pos_embed"]
    if pos_embed.dim() != 3:
        raise UserError(f"{source}: pos_embed has shape {tuple(pos_embed.shape)}, expected (1, tokens, width)")
    old_grid = math.isqrt(int(pos_embed.shape[1]) - num_prefix)
    state = dict(state)
    try:
        state["pos_embed"] = resample_abs_pos_embed(
            pos_embed.float(), [new_img_size // patch_size] * 2, old_size=[old_grid] * 2,
            num_prefix_tokens=num_prefix).to(pos_embed.dtype)
    except RuntimeError as exc:
        raise UserError(f"{source}: cannot resample pos_embed to {new_img_size} ({one_line(exc)})") from None
    return state


def resize_rel_pos_tables(state: dict[str, torch.Tensor], shell: nn.Module,
                          source: Path | str) -> dict[str, torch.Tensor]:
    """Relative-position bias tables (BEiT) resized to ``shell``'s grid by timm's ``resize_rel_pos_bias_table``.

    ``shell`` is the model at the new ``--img-size`` (a meta build is enough). RoPE frequencies are rebuilt from
    the grid, never stored; anything else of another shape is left for ``check_state`` to report.
    """
    from timm.layers import resize_rel_pos_bias_table

    expected = shell.state_dict()
    resized = dict(state)
    for key, value in state.items():
        if not key.endswith("relative_position_bias_table") or key not in expected \
                or expected[key].shape == value.shape:
            continue
        owner = shell.get_submodule(key.rsplit(".", 1)[0]) if "." in key else shell
        try:
            resized[key] = resize_rel_pos_bias_table(value, new_window_size=tuple(owner.window_size),
                                                     new_bias_shape=tuple(expected[key].shape))
        except (AssertionError, RuntimeError, ValueError, AttributeError) as exc:
            raise UserError(f"{source}: cannot resize {key} to the new --img-size ({type(exc).__name__}: {exc})") from None
    return resized


def check_sizes_against_state(where: str, kwargs: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """The sizes a record or config states, compared with the tensors before anything is built."""
    import re

    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    stated = kwargs.get("depth")
    if isinstance(stated, int) and depth and stated != depth:
        raise UserError(f"{where}: depth={stated} but the file holds {depth} blocks")
    proj = state.get("patch_embed.proj.weight")
    width = kwargs.get("embed_dim")
    if isinstance(width, int) and proj is not None and proj.dim() == 4 and int(proj.shape[0]) != width:
        raise UserError(f"{where}: embed_dim={width} but patch_embed.proj.weight has width {int(proj.shape[0])}")
    head = state.get("head.weight")
    classes = kwargs.get("num_classes")
    if isinstance(classes, int) and head is not None and head.dim() == 2 and int(head.shape[0]) != classes:
        raise UserError(f"{where}: num_classes={classes} but head.weight has {int(head.shape[0])} rows")
