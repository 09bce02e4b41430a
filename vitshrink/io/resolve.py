"""What a state dict cannot tell, decided by behaviour on labelled images.

No tensor shape reveals a ViT's head count, where its norms sit (pre- or post-norm), its MLP activation, its
LayerNorm epsilon or the input normalisation it was trained with; a wrong guess still runs, at a lower
accuracy. ``open_settings`` says which of these the loader had to assume for a SPEC; ``resolve`` tries the
plausible candidates jointly (under a wrong normalisation every head count scores low) on a small labelled
sample and keeps the best, with the table of what was tried. Each candidate is the same file loaded again
with ``num_heads``/``norm_eps``/``assume`` (``load_candidate``); images are decoded once, unnormalised, and each
normalisation is applied as a tensor operation.
"""
from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from vitshrink.errors import UserError
from vitshrink.io.record import data_config, record_of, set_data_config

RESOLVE_IMAGES = 256  # labelled images the candidates are compared on
SCREEN_IMAGES = 48  # first round: every candidate; the best KEEP_AFTER_SCREEN go on to all RESOLVE_IMAGES
KEEP_AFTER_SCREEN = 6
MIN_HEAD_DIM, MAX_HEADS = 8, 16
TIE_MARGIN = 0.01  # top-1 differences below this (2-3 images of 256) are noise: cross-entropy decides
EPS_CANDIDATES = (1e-6, 1e-5)  # timm's, torch.nn.LayerNorm's
# Input normalisations seen in the wild; "data" (the sample's own per-channel statistics) is added per sample.
NORMALISATIONS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "0.5": ((0.5,), (0.5,)),
                  "none": ((0.0,), (1.0,))}
# What a layout may assume (load_model's ``assume``) that changes top-1, with the values tried. (A softmax at the
# end of the head does not change the argmax: not tried.)
STRUCTURE_CHOICES: dict[str, tuple[Any, ...]] = {"norm_placement": ("pre", "post"), "act_layer": ("gelu", "relu"),
                                                 "head_act": ("tanh", "gelu", "relu"), "fc_norm": (False, True)}


@dataclass(frozen=True)
class Candidate:
    """One guess at what the weights leave open: kwargs overrides plus an input normalisation."""

    norm: str  # "imagenet", "0.5", "none", "data", "assumed", "given"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    kwargs: tuple[tuple[str, Any], ...] = ()  # e.g. (("num_heads", 4), ("norm_placement", "post"))

    def label(self) -> str:
        parts = [f"{k.replace('norm_placement', 'norm').replace('act_layer', 'act')}={v}" for k, v in self.kwargs]
        stats = "/".join(f"{m:.3g}" for m in self.mean[:3]) + " ± " + "/".join(f"{s:.3g}" for s in self.std[:3])
        return ", ".join(parts + [f"input {self.norm} ({stats})"])


@dataclass
class OpenSettings:
    """Which settings the loader assumed rather than read or was given."""

    heads: bool = False
    normalisation: bool = False
    structure: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # assumed kwarg -> values (assumed first)
    eps: bool = False

    def names(self) -> list[str]:
        words = {"norm_placement": "norm placement", "act_layer": "activation", "head_act": "head activation",
                 "fc_norm": "final norm position"}
        return ([name for name, is_open in (("num_heads", self.heads), ("input normalisation", self.normalisation))
                 if is_open] + [words.get(k, k) for k in self.structure] + (["LayerNorm eps"] if self.eps else []))

    def any_decisive(self) -> bool:
        """Open settings that change top-1 grossly (an epsilon does not)."""
        return self.heads or self.normalisation or bool(self.structure)


@dataclass
class Resolution:
    model: nn.Module
    chosen: Candidate
    rows: list[tuple[Candidate, float, int, float]] = field(default_factory=list)  # top-1, images, cross-entropy
    data: str = ""
    top1: float = 0.0  # the chosen candidate's, on n_images
    n_images: int = 0

    def table(self, limit: int = 8) -> list[str]:
        """``candidate -> top-1 on N images`` lines, best first (the chosen one marked)."""
        ordered = sorted(self.rows, key=lambda row: (row[0] != self.chosen, -row[2], -row[1], row[3]))[:limit]
        return [f"{'*' if c == self.chosen else ' '} {c.label()}  ->  top-1 {top1:.3f} on {n} images "
                f"(cross-entropy {loss:.3f})" for c, top1, n, loss in ordered]


# --- what is open ------------------------------------------------------------------------------

def open_settings(spec: str | os.PathLike, model: nn.Module, load_kwargs: dict[str, Any]) -> OpenSettings:
    """The settings a foreign state dict left to assumption (nothing for timm names, vitshrink files, HF dirs)."""
    if not _is_foreign_state_dict(Path(str(spec)).expanduser()) or not hasattr(model, "blocks"):
        return OpenSettings()
    record = record_of(model)
    assumed = assumed_kwargs(record.notes)
    structure = {k: _with_first(STRUCTURE_CHOICES[k], assumed[k]) for k in STRUCTURE_CHOICES if k in assumed}
    return OpenSettings(
        heads=load_kwargs.get("num_heads") is None and _attention_width(model) is not None
        and any("num_heads=" in n and "assumed" in n for n in record.notes),  # per-head layouts show the count
        normalisation=load_kwargs.get("mean") is None or load_kwargs.get("std") is None,
        structure=structure,
        eps=load_kwargs.get("norm_eps") is None and ("norm_eps" in assumed or "norm_eps" not in record.kwargs),
    )


def assumed_kwargs(notes: list[str]) -> dict[str, Any]:
    """``kwarg=value`` pairs a layout's note says were assumed ("...: assumed ... (...): norm_placement='post'")."""
    found: dict[str, Any] = {}
    for note in notes:
        if "assumed" in note and "the weights cannot tell" in note:
            for key, value in re.findall(r"(\w+)=('[^']*'|[-+.\w]+)", note.rsplit("): ", 1)[-1]):
                try:  # the note writes each value as repr(): 'post', False, 1e-05
                    found[key] = ast.literal_eval(value)
                except (ValueError, SyntaxError):
                    found[key] = value
    return found


def _with_first(values: tuple[Any, ...], first: Any) -> tuple[Any, ...]:
    return (first,) + tuple(v for v in values if v != first)


def _is_foreign_state_dict(path: Path) -> bool:
    from vitshrink.io.readers import TORCH_SUFFIXES

    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        return path.is_file()
    if suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    from vitshrink.io.record import METADATA_KEY

    with safe_open(str(path), framework="pt") as handle:
        return METADATA_KEY not in (handle.metadata() or {})


def _attention_width(model: nn.Module) -> int | None:
    attn = getattr(model.blocks[0], "attn", None) if len(model.blocks) else None
    qkv = getattr(attn, "qkv", None)
    return int(qkv.weight.shape[0]) // 3 if qkv is not None else None


def unverified_refusal(spec: Any, model: nn.Module, open_: OpenSettings) -> UserError:
    """The error ``convert`` raises when it would write a file from guesses no images checked."""
    assumed = [n.split(": pass")[0] for n in record_of(model).notes if "assumed" in n and "--arch" not in n]
    flags = (["--num-heads N"] if open_.heads else []) + (["--mean M --std S"] if open_.normalisation else []) + [
        f"--assume {key}={values[0]}" for key, values in open_.structure.items()]
    return UserError(f"{spec}: {', '.join(open_.names())} cannot be read from the weights and would be guesses "
                     f"({'; '.join(assumed) or 'assumed defaults'}); pass --data with labelled images to decide them "
                     f"by behaviour, state them ({' '.join(flags)}), or give your model code with --module "
                     f"FILE.py:CALLABLE; nothing written")


# --- candidates --------------------------------------------------------------------------------

def head_candidates(width: int, prior: int) -> list[int]:
    """Divisors of the attention width giving heads at least ``MIN_HEAD_DIM`` wide (at most ``MAX_HEADS``)."""
    found = [h for h in range(1, MAX_HEADS + 1) if width % h == 0 and width // h >= MIN_HEAD_DIM]
    return sorted(set(found) | {prior})


def normalisation_candidates(raw: torch.Tensor, assumed: tuple[tuple[float, ...], tuple[float, ...]],
                             open_: bool) -> list[Candidate]:
    channels = int(raw.shape[1])
    if not open_:
        return [Candidate("given", *assumed)]
    stats = (tuple(raw.mean(dim=(0, 2, 3)).tolist()), tuple(raw.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()))
    found = [Candidate(name, *_per_channel(mean, std, channels)) for name, (mean, std) in NORMALISATIONS.items()]
    found.append(Candidate("data", *_per_channel(*stats, channels)))
    assumed = _per_channel(*assumed, channels)
    if not any(_close(c.mean, assumed[0]) and _close(c.std, assumed[1]) for c in found):
        found.insert(0, Candidate("assumed", *assumed))
    return found


def _per_channel(mean: Iterable[float], std: Iterable[float], channels: int) -> tuple[tuple[float, ...], ...]:
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != channels:
        mean = (sum(mean) / len(mean),) * channels
    if len(std) != channels:
        std = (sum(std) / len(std),) * channels
    return mean, std


def _close(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-3 for x, y in zip(a, b))


# --- the same file read under other assumptions ----------------------------------------------------

def load_candidate(spec: str | os.PathLike, load_kwargs: dict[str, Any], overrides: dict[str, Any]) -> nn.Module:
    """``spec`` loaded again with ``overrides`` (num_heads, norm_eps, and what ``load_model(assume=)`` takes)."""
    from vitshrink.io.spec import load_model

    kwargs, assume = dict(load_kwargs), dict(load_kwargs.get("assume") or {})
    for key, value in overrides.items():
        if key in ("num_heads", "norm_eps"):
            kwargs[key] = value
        else:
            assume[key] = value
    return load_model(spec, **{**kwargs, "assume": assume})


def apply_candidate(model: nn.Module, candidate: Candidate) -> nn.Module:
    set_data_config(model, mean=candidate.mean, std=candidate.std)
    record = record_of(model)
    record.notes = [n for n in record.notes if "mean/std" not in n]
    return model


# --- deciding -----------------------------------------------------------------------------------

def labelled_sample(model: nn.Module, data: str | os.PathLike | None,
                    n: int = RESOLVE_IMAGES) -> tuple[torch.Tensor, torch.Tensor, list[str], str]:
    """Up to ``n`` readable images spread over ``data``'s classes, unnormalised ([0, 1]), with labels."""
    from vitshrink.data import build_transform, resolve_eval_split
    from vitshrink.evaluation import align_classes

    cfg = data_config(model)
    channels = int(cfg["input_size"][0])
    split, description = resolve_eval_split(data, in_chans=channels)
    # timm's folder reader calls it class_to_idx, its tar reader class_name_to_idx.
    class_to_idx = (getattr(split.reader, "class_to_idx", None) or getattr(split.reader, "class_name_to_idx", None)
                    or {})
    names = sorted(class_to_idx, key=class_to_idx.get) if split.target_map is None else []
    split = align_classes(model, split, "--data")  # labels by class name; more classes than the model: refused
    split.transform = build_transform({**cfg, "mean": (0.0,) * channels, "std": (1.0,) * channels})
    # Evenly spaced over the whole split: a folder or tar is in class order.
    spaced = sorted({round(i * (len(split) - 1) / max(1, n - 1)) for i in range(n)}) if len(split) > n else None
    images, targets = [], []
    for index in spaced or range(len(split)):
        item = split[index]
        if item is not None:
            images.append(item[0])
            targets.append(item[1])
        if len(images) == n:
            break
    if not images:
        raise UserError(f"--data {data}: no readable images")
    return torch.stack(images), torch.tensor(targets), names, str(data) if data is not None else description


def bundled_fits(model: nn.Module) -> bool:
    """The bundled CIFAR-10 sample can judge a model with CIFAR-10's classes (RGB, 10 classes)."""
    from vitshrink.data.folders import BUNDLED_VAL, _class_names, _open_reader

    names = record_of(model).class_names
    if int(data_config(model)["input_size"][0]) != 3 or getattr(model, "num_classes", None) != 10:
        return False
    return names is None or list(names) == _class_names(_open_reader(BUNDLED_VAL))


@torch.no_grad()
def score(model: nn.Module, raw: torch.Tensor, targets: torch.Tensor, mean: tuple[float, ...],
          std: tuple[float, ...]) -> tuple[float, float]:
    """(top-1, mean cross-entropy) of ``model`` on ``(raw - mean) / std`` (a softmax head's output is taken as
    probabilities)."""
    mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    hits, loss = 0, 0.0
    for start in range(0, len(raw), 128):
        out = model((raw[start:start + 128] - mean_t) / std_t)
        out = (sum(out) / len(out) if isinstance(out, (tuple, list)) else out).float()
        is_probability = bool((out >= 0).all()) and torch.allclose(out.sum(1), torch.ones(len(out)), atol=1e-4)
        log_probs = out.clamp_min(1e-12).log() if is_probability else out.log_softmax(1)
        batch_targets = targets[start:start + 128]
        hits += int((out.argmax(1) == batch_targets).sum())
        loss += float(nn.functional.nll_loss(log_probs, batch_targets, reduction="sum"))
    return hits / len(raw), loss / len(raw)


def top1(model: nn.Module, raw: torch.Tensor, targets: torch.Tensor, mean: tuple[float, ...],
         std: tuple[float, ...]) -> float:
    return score(model, raw, targets, mean, std)[0]


def resolve(model: nn.Module, open_: OpenSettings, data: str | os.PathLike | None, spec: str | os.PathLike,
            load_kwargs: dict[str, Any]) -> Resolution:
    """Try the open settings jointly on labelled images; return the best model with the table of what was tried.

    Every candidate (heads x assumed structure x normalisation) is scored on ``SCREEN_IMAGES`` images, the best
    ``KEEP_AFTER_SCREEN`` on all ``RESOLVE_IMAGES`` (``_best`` picks); an open LayerNorm eps is tried last.
    Refuses when even the best candidate is at chance level.
    """
    raw, targets, class_names, where = labelled_sample(model, data)
    cfg = data_config(model)
    norms = normalisation_candidates(raw, (tuple(cfg["mean"]), tuple(cfg["std"])), open_.normalisation)
    rows: dict[Candidate, tuple[float, int, float]] = {}  # top-1, images, cross-entropy
    every = max(1, len(raw) // SCREEN_IMAGES)  # the sample is in class order: the screen strides over it
    screen = raw[::every][:SCREEN_IMAGES], targets[::every][:SCREEN_IMAGES]
    for kwargs in structure_candidates(model, open_):
        candidate_model = load_candidate(spec, load_kwargs, dict(kwargs)) if kwargs else model
        for norm in norms:
            accuracy, loss = score(candidate_model, *screen, norm.mean, norm.std)
            rows[replace(norm, kwargs=kwargs)] = (accuracy, len(screen[1]), loss)
    kept = sorted(rows, key=lambda c: (-rows[c][0], rows[c][2]))[:KEEP_AFTER_SCREEN]
    loaded: dict[tuple, nn.Module] = {(): model}
    for candidate in kept if len(raw) > len(screen[1]) else []:
        if candidate.kwargs not in loaded:
            loaded[candidate.kwargs] = load_candidate(spec, load_kwargs, dict(candidate.kwargs))
        accuracy, loss = score(loaded[candidate.kwargs], raw, targets, candidate.mean, candidate.std)
        rows[candidate] = (accuracy, len(raw), loss)
    best = _best(rows)
    if open_.eps:
        current = next((float(m.eps) for m in model.modules() if isinstance(m, nn.LayerNorm)), None)
        tried = [best]
        for eps in (e for e in EPS_CANDIDATES if current is None or abs(e - current) > 1e-12):
            candidate = replace(best, kwargs=best.kwargs + (("norm_eps", eps),))
            loaded[candidate.kwargs] = load_candidate(spec, load_kwargs, dict(candidate.kwargs))
            accuracy, loss = score(loaded[candidate.kwargs], raw, targets, best.mean, best.std)
            rows[candidate] = (accuracy, len(raw), loss)
            tried.append(candidate)
        best = _best({c: rows[c] for c in tried})
    classes = max(2, len(set(targets.tolist())))
    if rows[best][0] <= 1.5 / classes:
        raise UserError(f"{spec}: top-1 on {len(raw)} images of {where} is at chance level with every candidate "
                        f"tried (best: {best.label()}: {rows[best][0]:.3f}, {classes} classes); check that the "
                        f"images carry the model's classes and the layout, or give the model code with --module")
    if best.kwargs not in loaded:
        loaded[best.kwargs] = load_candidate(spec, load_kwargs, dict(best.kwargs))
    chosen = apply_candidate(loaded[best.kwargs], best)
    _record_decision(chosen, best, rows[best][:2], open_, where, class_names, len(rows))
    return Resolution(chosen, best, [(c, *row) for c, row in rows.items()], where, *rows[best][:2])


def _best(rows: dict[Candidate, tuple[float, int, float]]) -> Candidate:
    """Among the candidates scored on the most images, those within ``TIE_MARGIN`` of the best top-1 (top-1 alone
    cannot tell GELU from ReLU or one epsilon from another on a few hundred images), the lowest cross-entropy."""
    most = max(row[1] for row in rows.values())
    scored = {c: row for c, row in rows.items() if row[1] == most}
    top = max(row[0] for row in scored.values())
    return min((c for c, row in scored.items() if row[0] >= top - TIE_MARGIN), key=lambda c: scored[c][2])


def structure_candidates(model: nn.Module, open_: OpenSettings) -> list[tuple[tuple[str, Any], ...]]:
    """Overrides to try: head counts x the assumed structure settings (the assumed values first)."""
    combos: list[tuple[tuple[str, Any], ...]] = [()]
    if open_.heads:
        prior = int(model.blocks[0].attn.num_heads)
        combos = [(("num_heads", h),) for h in _with_first(tuple(head_candidates(_attention_width(model), prior)),
                                                          prior)]
    for key, values in open_.structure.items():
        combos = [c + ((key, v),) for c in combos for v in values]
    return combos


def _record_decision(model: nn.Module, best: Candidate, score: tuple[float, int], open_: OpenSettings, where: str,
                     class_names: list[str], tried: int) -> None:
    """Replace the loader's assumption notes with what the images decided."""
    record = record_of(model)
    record.notes = [n for n in record.notes if not ("assumed" in n and ("num_heads=" in n or "mean/std" in n
                                                                       or "the weights cannot tell" in n))]
    record.notes.append(f"{', '.join(open_.names())} decided by behaviour: {best.label()} scored top-1 "
                        f"{score[0]:.3f} on {score[1]} images of {where}, the best of {tried} candidates")
    if record.class_names is None and class_names and len(class_names) == getattr(model, "num_classes", None):
        record.class_names = list(class_names)


# --- the entry point for convert and every loading command -----------------------------------------

def load_resolved(spec: str | os.PathLike, load_kwargs: dict[str, Any], data: str | os.PathLike | None, *,
                  module: str | None = None, module_args: str | None = None,
                  refuse_guesses: bool = False, require_data: bool = False) -> tuple[nn.Module, Resolution | None]:
    """``load_model(spec, **load_kwargs)``, then what it had to assume decided by behaviour.

    ``module`` (``FILE.py:CALLABLE``) first matches the user's own model code (``vitshrink.io.user_module``):
    its logits decide the computation, the images only the normalisation. Without labelled images (``data``,
    or the bundled sample when the classes match), ``refuse_guesses`` (convert) refuses; otherwise the
    assumptions stand as notes, unless ``require_data`` (``--resolve``).
    """
    from vitshrink.io.spec import load_model

    model = load_model(spec, **load_kwargs)
    open_ = open_settings(spec, model, load_kwargs)
    if module is not None:
        from vitshrink.io.user_module import match_user_module

        model = match_user_module(spec, model, module, module_args, open_, data, load_kwargs)
        open_ = OpenSettings(normalisation=open_.normalisation)
    if not (open_.any_decisive() or open_.eps):
        if require_data:
            record_of(model).notes.append(f"--resolve: nothing to decide ({spec} states its architecture and "
                                          f"normalisation, or they were given)")
        return model, None
    if data is None and not bundled_fits(model):
        if require_data:
            raise UserError(f"--resolve: {spec} needs labelled images with its classes to decide "
                            f"{', '.join(open_.names())}: pass --data (the bundled CIFAR-10 sample serves only "
                            f"10-class RGB models)")
        if refuse_guesses and open_.any_decisive():
            raise unverified_refusal(spec, model, open_)
        return model, None
    resolution = resolve(model, open_, data, spec, load_kwargs)
    return resolution.model, resolution
