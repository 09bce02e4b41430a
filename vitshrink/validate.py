"""Checks of user input, shared by the CLI and the Python API: numbers, settings, paths read back from files.

Every check raises ``UserError`` with one line naming the flag (or file) and what is wrong, so a bad value
stops the run before any work starts instead of surfacing later as a traceback or a silently wrong number.
"""
from __future__ import annotations

import math
import os
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from vitshrink.errors import UserError

# ------------------------------------------------------------------------------------------ numbers
# Upper bounds that are generous but stop absurd values (e.g. --img-size 10**9) before allocating.
MAX_IMG_SIZE = 4096  # = vitshrink.io.record.MAX_SIDE
MAX_HEADS = 4096
MAX_CHANNELS = 4096
MAX_CLASSES = 10**6
MAX_BATCH = 1 << 20
MAX_WORKERS = 256
MAX_SEED = 2**32 - 1  # numpy's seed range


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_int(value: Any, flag: str, *, low: int | None = None, high: int | None = None,
              optional: bool = False) -> int | None:
    """``value`` as an int in [low, high] (None allowed when ``optional``)."""
    if value is None and optional:
        return None
    if not _is_int(value):
        raise UserError(f"{flag} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise UserError(f"{flag} must be at least {low}, got {value}")
    if high is not None and value > high:
        raise UserError(f"{flag} must be at most {high}, got {value}")
    return int(value)


def check_float(value: Any, flag: str, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, optional: bool = False) -> float | None:
    """``value`` as a finite float in the given range; ``low_open``/``high_open`` exclude the bounds."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise UserError(f"{flag} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise UserError(f"{flag} must be a finite number, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise UserError(f"{flag} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None and (value > high or (high_open and value == high)):
        raise UserError(f"{flag} must be {'<' if high_open else '<='} {high:g}, got {value:g}")
    return value


def parse_floats(text: str | None, flag: str, *, positive: bool = False) -> tuple[float, ...] | None:
    """A comma-separated list of finite numbers (``positive``: each > 0), e.g. ``--mean 0.5,0.5,0.5``."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise UserError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    for v in values:
        if not math.isfinite(v):
            raise UserError(f"{flag} must be finite numbers, got {text!r}")
        if positive and v <= 0:
            raise UserError(f"{flag} must be > 0, got {text!r}")
    return values


def parse_ints(text: str, flag: str, *, low: int = 0, high: int | None = None) -> tuple[int, ...]:
    """A comma-separated list of integers in [low, high], e.g. ``--batch-sizes 1,32``."""
    try:
        values = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise UserError(f"{flag} must be comma-separated integers, got {text!r}") from None
    for v in values:
        check_int(v, flag, low=low, high=high)
    return values


def check_load_options(*, num_heads: Any = None, img_size: Any = None, in_chans: Any = None,
                       num_classes: Any = None, mean: Sequence[float] | None = None,
                       std: Sequence[float] | None = None) -> None:
    """The loading options shared by every command that takes a SPEC (``vitshrink.io.load_model``)."""
    check_int(num_heads, "--num-heads", low=1, high=MAX_HEADS, optional=True)
    check_int(img_size, "--img-size", low=1, high=MAX_IMG_SIZE, optional=True)
    check_int(in_chans, "--in-chans", low=1, high=MAX_CHANNELS, optional=True)
    check_int(num_classes, "--num-classes", low=1, high=MAX_CLASSES, optional=True)
    for flag, values in (("--mean", mean), ("--std", std)):
        if values is None:
            continue
        if len(values) == 0:
            raise UserError(f"{flag} must hold at least one number")
        for v in values:
            check_float(v, flag, low=0.0 if flag == "--std" else None, low_open=flag == "--std")


def check_workers(workers: Any, flag: str = "-j/--workers") -> int | None:
    return check_int(workers, flag, low=0, high=MAX_WORKERS, optional=True)


def check_batch_size(batch_size: Any, flag: str = "-b/--batch-size") -> int:
    return check_int(batch_size, flag, low=1, high=MAX_BATCH)


def check_seed(seed: Any, flag: str = "--seed") -> int:
    return check_int(seed, flag, low=0, high=MAX_SEED)


# ----------------------------------------------------------------------------------------- settings
# Range of each engine setting a preset, --config, a flag or --set may give. (low, high, low_open, kind):
# kind "int" or "float"; None bounds are open-ended; keys missing here get only a finiteness check.
_SETTING_RANGES: dict[str, tuple[float | None, float | None, bool, str]] = {
    "epochs": (1, 100_000, False, "int"),
    "batch_size": (1, MAX_BATCH, False, "int"),
    "eval_batch_size": (1, MAX_BATCH, False, "int"),
    "lr": (0.0, None, True, "float"),  # no upper bound: a huge lr is how the NaN guard is tested
    "warmup_lr": (0.0, 10.0, False, "float"),
    "min_lr": (0.0, 10.0, False, "float"),
    "weight_decay": (0.0, 10.0, False, "float"),
    "warmup_epochs": (0, 100_000, False, "int"),
    "clip_grad": (0.0, None, True, "float"),  # null disables clipping; <= 0 would flip the update
    "smoothing": (0.0, 1.0, False, "float"),
    "checkpoint_steps": (0, None, False, "int"),
    "steps_per_epoch": (1, None, False, "int"),
    "workers": (0, MAX_WORKERS, False, "int"),
    "kd_weight": (0.0, 1.0, False, "float"),
    "temperature": (0.0, 1000.0, True, "float"),
    "flops_target": (0.0, 1.0, True, "float"),
    "latency_target": (0.0, 1.0, True, "float"),
    "latency_batch": (1, MAX_BATCH, False, "int"),
    "dim_multiple": (1, 4096, False, "int"),
    "student_depth_ratio": (0.0, 1.0, True, "float"),
    "aug_hflip": (0.0, 1.0, False, "float"),
    "aug_re_prob": (0.0, 1.0, False, "float"),
    "aug_color_jitter": (0.0, 10.0, False, "float"),
    "mixup": (0.0, 100.0, False, "float"),  # Beta(alpha, alpha); 0 = off
    "cutmix": (0.0, 100.0, False, "float"),
    "mixup_prob": (0.0, 1.0, False, "float"),
    "mixup_switch_prob": (0.0, 1.0, False, "float"),
    # recipe options (presets/NAME.yaml): counts and sizes >= 1, weights and rates >= 0, shares in [0, 1]
    "search_steps": (1, 10_000_000, False, "int"), "search_batch_size": (1, MAX_BATCH, False, "int"),
    "latency_corrections": (0, 100, False, "int"), "synth_batch_size": (1, MAX_BATCH, False, "int"),
    "synth_iterations": (1, 10_000_000, False, "int"), "synth_num": (1, 100_000_000, False, "int"),
    "cit_depth": (1, 512, False, "int"), "cit_embed_dim": (1, 16384, False, "int"),
    "cit_num_heads": (1, 1024, False, "int"),
    "search_lr": (0.0, None, False, "float"), "count_lr": (0.0, None, False, "float"),
    "gate_lr": (0.0, None, False, "float"), "y_lr": (0.0, None, False, "float"), "z_lr": (0.0, None, False, "float"),
    "gate_momentum": (0.0, 1.0, False, "float"), "gumbel_tau": (0.0, 100.0, True, "float"),
    "flops_tolerance": (0.0, 1.0, False, "float"), "z_clip": (0.0, None, False, "float"),
    "stage1_share": (0.0, 1.0, False, "float"), "probe_weight": (0.0, None, False, "float"),
    "gating_weight": (0.0, None, False, "float"), "search_kd_weight": (0.0, None, False, "float"),
    "cls_teacher_weight": (0.0, None, False, "float"), "conv_weight": (0.0, None, False, "float"),
    "inv_weight": (0.0, None, False, "float"), "task_weight": (0.0, None, False, "float"),
    "feature_weight": (0.0, None, False, "float"),
}
# Settings whose null value means "off" or "default".
_NULLABLE = {"clip_grad", "steps_per_epoch", "workers", "kd_weight", "flops_target", "amp", "aug_auto_augment",
             "latency_target", "synth_iterations", "synth_batch_size", "synth_divergence_weight"}  # synthesis: null = the chosen set's value


def _setting_flag(key: str, source: str | None) -> str:
    """How the user set ``key``: its flag, ``--set key``, or the file (``--config FILE``, a preset)."""
    flag = f"--{key.replace('_', '-')}"
    if source is None or source == "flag":
        return flag
    if source in ("override", "--set"):
        return f"{flag} (or --set {key})"
    if source in ("base", "preset"):
        return f"{key} (recipe preset)"
    return f"{key} ({source})"


def check_settings(cfg: dict[str, Any], sources: Mapping[str, str] | None = None) -> None:
    """Type and range of every known engine/recipe setting; finiteness of every other number.

    ``sources`` maps a key to where its value came from ("flag", "override" for --set, "--config FILE",
    absent for the preset) so that the message names what the user must change. A float setting given as
    a numeric string (YAML reads ``1e-4`` as a string) is converted in place.
    """
    sources = sources or {}
    for key, value in cfg.items():
        flag = _setting_flag(key, sources.get(key))
        if value is None:
            if key in _SETTING_RANGES and key not in _NULLABLE:
                raise UserError(f"{flag} must be set, got null")
            continue
        spec = _SETTING_RANGES.get(key)
        if spec is None:
            _check_finite_tree(value, flag)
            continue
        low, high, low_open, kind = spec
        if kind == "int":
            check_int(value, flag, low=None if low is None else int(low), high=None if high is None else int(high))
        else:
            if isinstance(value, str):
                try:
                    value = cfg[key] = float(value)
                except ValueError:
                    raise UserError(f"{flag} must be a number, got {value!r}") from None
            check_float(value, flag, low=low, high=high, low_open=low_open)
    if "aug_scale" in cfg and cfg["aug_scale"] is not None:
        scale = cfg["aug_scale"]
        flag = _setting_flag("aug_scale", sources.get("aug_scale"))
        message = f"{flag} must be two numbers [low, high] with 0 < low <= high <= 1, got {scale!r}"
        if not isinstance(scale, (list, tuple)) or len(scale) != 2:
            raise UserError(message)
        low = check_float(scale[0], flag, low=0.0, high=1.0, low_open=True)
        if check_float(scale[1], flag, low=0.0, high=1.0) < low:
            raise UserError(message)
    _check_optimiser_names(cfg, sources)
    if cfg.get("select_epoch", "last") not in ("last", "best"):
        raise UserError(f"{_setting_flag('select_epoch', sources.get('select_epoch'))} must be last or best, "
                        f"got {cfg['select_epoch']!r:.60}")
    if "mixup_mode" in cfg and cfg["mixup_mode"] not in ("batch", "pair", "elem"):
        raise UserError(f"{_setting_flag('mixup_mode', sources.get('mixup_mode'))} must be batch, pair or elem "
                        f"(timm Mixup modes), got {cfg['mixup_mode']!r}")


# timm's create_scheduler_v2 names (an unknown one would silently train without a schedule).
SCHEDULERS = ("constant", "cosine", "multistep", "plateau", "poly", "rsqrt", "step", "tanh")


def _check_optimiser_names(cfg: dict[str, Any], sources: Mapping[str, str]) -> None:
    """``opt`` a timm optimiser (``lookahead_`` prefix allowed), ``sched`` a timm scheduler, before any work."""
    if cfg.get("opt") is not None:
        from timm.optim import list_optimizers

        opt = cfg["opt"]
        name = opt.lower().removeprefix("lookahead_") if isinstance(opt, str) else None
        if name not in list_optimizers():
            raise UserError(f"{_setting_flag('opt', sources.get('opt'))} must be a timm optimizer name (e.g. adamw, "
                            f"sgd, lamb), got {opt!r:.60}")
    if cfg.get("sched") is not None and cfg["sched"] not in SCHEDULERS:
        raise UserError(f"{_setting_flag('sched', sources.get('sched'))} must be one of {', '.join(SCHEDULERS)}, "
                        f"got {cfg['sched']!r:.60}")


def check_run_options(*, seed: Any = 0, val_split: Any = 0.1, flops_target: Any = None, workers: Any = None,
                      epochs: Any = None, batch_size: Any = None, lr: Any = None,
                      out_dir: str | os.PathLike | None = None, teacher: Any = None,
                      teacher_role: str = "teacher") -> None:
    """The ``distill`` arguments that are not preset settings (and the flags that become settings, early);
    ``out_dir`` must be a writable folder (made if missing), ``teacher`` free of NaN/inf weights."""
    if out_dir is not None:
        check_output_dir(out_dir)
    if teacher is not None:
        check_finite_weights(teacher, "teacher" if teacher_role in ("teacher", "") else f"teacher {teacher_role!r}")
    check_seed(seed)
    check_float(val_split, "--val-split", low=0.0, high=1.0, low_open=True, high_open=True)
    check_float(flops_target, "--flops-target", low=0.0, high=1.0, low_open=True, optional=True)
    check_workers(workers)
    check_int(epochs, "--epochs", low=1, high=100_000, optional=True)
    check_int(batch_size, "-b/--batch-size", low=1, high=MAX_BATCH, optional=True)
    check_float(lr, "--lr", low=0.0, low_open=True, optional=True)


def _check_finite_tree(value: Any, flag: str) -> None:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, Real):
        if not math.isfinite(float(value)):
            raise UserError(f"{flag} must be a finite number, got {value}")
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_finite_tree(item, flag)
    elif isinstance(value, Mapping):
        for item in value.values():
            _check_finite_tree(item, flag)


# -------------------------------------------------------------------------------------------- paths
def contained(base: str | os.PathLike, relative: str, what: str) -> Path:
    """``base / relative`` for a ``relative`` path read back from a file, refused unless it stays in ``base``.

    Refuses absolute paths, ``..`` components, and paths that resolve (through symlinks) outside ``base``.
    ``what`` names the file the path came from, for the message.
    """
    text = str(relative)
    if not text or "\x00" in text or os.path.isabs(text) or text.startswith(("/", "\\")):
        raise UserError(f"{what}: path {text!r} is not a relative path inside {base}")
    parts = text.replace("\\", "/").split("/")
    if any(part in ("..",) for part in parts):
        raise UserError(f"{what}: path {text!r} leaves {base}")
    base_real = os.path.realpath(base)
    target = os.path.join(base, text)
    target_real = os.path.realpath(target)
    if target_real != base_real and not target_real.startswith(base_real.rstrip(os.sep) + os.sep):
        raise UserError(f"{what}: path {text!r} resolves outside {base}")
    return Path(target)


def plain_name(name: Any, what: str) -> str:
    """A single path component read back from a file (no separators, not '.', '..' or hidden)."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or "\x00" in name or os.path.isabs(name):
        raise UserError(f"{what}: {name!r} is not a plain folder name")
    return name


def is_inside(path: str | os.PathLike, parent: str | os.PathLike) -> bool:
    """True when ``path`` is ``parent`` or lies below it, comparing resolved paths."""
    path_real, parent_real = os.path.realpath(path), os.path.realpath(parent)
    return path_real == parent_real or path_real.startswith(parent_real.rstrip(os.sep) + os.sep)


def check_output_dir(out: str | os.PathLike, flag: str = "--out") -> Path:
    """An output folder that exists or can be made and is writable; an existing file is refused."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{flag} {out}: a parent path is a file, not a directory") from None
    except OSError as exc:
        raise UserError(f"{flag} {out}: cannot create the folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out}: folder is not writable")
    return out


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """An output file whose folder exists or can be made and is writable; a directory is refused."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory, expected a file name")
    check_output_dir(path.parent if str(path.parent) else Path("."), flag=f"{flag} {path}: folder")
    return path


def first_nonfinite(named: Iterable[tuple[str, Any]]) -> str | None:
    """The name of the first tensor in ``named`` holding a NaN or infinity, else None."""
    import torch

    for name, tensor in named:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def check_finite_weights(model: Any, what: str) -> None:
    """Refuse a model whose parameters or buffers hold NaN/inf: every number it computes would be wrong."""
    name = first_nonfinite([*model.named_parameters(), *model.named_buffers()])
    if name is not None:
        raise UserError(f"{what}: weight {name} holds NaN or infinite values")


# ------------------------------------------------------------------------------------------- models
def _nonfinite_output(output: Any) -> bool:
    import numpy as np

    outputs = output if isinstance(output, (tuple, list)) else [output]
    return any(not np.isfinite(np.asarray(o, dtype=np.float64)).all() for o in outputs)


def check_outputs_finite(model: Any, images: Any, what: str) -> None:
    """Run ``model`` (eval mode) on a few real ``images``; NaN/inf outputs are a UserError naming ``what``.

    Called before a long loop starts, so that broken weights or normalisation (--mean/--std) stop the run
    with one line instead of producing a meaningless accuracy or ranking.
    """
    import torch

    from vitshrink.measure import eval_mode, model_device

    with eval_mode(model), torch.inference_mode():
        output = model(images.to(model_device(model)))
    outputs = output if isinstance(output, (tuple, list)) else [output]
    if any(not torch.isfinite(o.float()).all() for o in outputs):
        raise UserError(f"{what}: the model outputs NaN or infinite values on real images; check its weights "
                        "and normalisation (--mean/--std)")


def check_torch_classifier(model: Any, size: Sequence[int], what: str) -> None:
    """Refuse a model with NaN/inf weights or whose output on a test image is NaN/inf (timings of it mean nothing)."""
    import torch

    from vitshrink.measure import eval_mode, model_device

    check_finite_weights(model, what)
    with eval_mode(model), torch.inference_mode():
        output = model(torch.zeros(1, *size, device=model_device(model)))
    outputs = output if isinstance(output, (tuple, list)) else [output]
    if any(not torch.isfinite(o.float()).all() for o in outputs):
        raise UserError(f"{what}: the model outputs NaN or infinite values")


def check_onnx_classifier(path: Path, input_size: Sequence[int] | None = None) -> None:
    """Refuse a file that is not a loadable ONNX model with one float image input (N, C, H, W), or whose output
    on a test image is NaN/inf."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    try:
        proto = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(proto)
    except Exception as exc:  # DecodeError, ValidationError, OSError: a damaged or foreign file
        raise UserError(f"{path}: not a valid ONNX model ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:200]})") from None
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise UserError(f"{path}: expected one image input, the model has {len(inputs)} inputs "
                        f"({', '.join(i.name for i in inputs)})")
    tensor_type = inputs[0].type.tensor_type
    dims = tensor_type.shape.dim
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    if tensor_type.elem_type not in float_types or len(dims) != 4:
        raise UserError(f"{path}: input {inputs[0].name!r} is not a float image tensor (N, C, H, W): "
                        f"{onnx.TensorProto.DataType.Name(tensor_type.elem_type)} of rank {len(dims)}")
    static = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims[1:]]
    size = list(input_size) if input_size is not None else static
    if any(v is None for v in size):
        return  # symbolic sizes: benchmark asks for a fixed-size export
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        dtype = np.float16 if tensor_type.elem_type == onnx.TensorProto.FLOAT16 else (
            np.float64 if tensor_type.elem_type == onnx.TensorProto.DOUBLE else np.float32)
        outputs = session.run(None, {inputs[0].name: np.zeros((1, *size), dtype=dtype)})
    except Exception as exc:  # onnxruntime's Fail / InvalidArgument / RuntimeException
        raise UserError(f"{path}: onnxruntime cannot run it on a (1, {', '.join(map(str, size))}) image "
                        f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    if _nonfinite_output(outputs):
        raise UserError(f"{path}: the model outputs NaN or infinite values")
