"""The distillation loop every recipe runs on.

AdamW + cosine-with-warm-up (timm's factories), gradient clipping, bf16 autocast on CUDA, optional
``torch.compile``, evaluation every epoch, best checkpoint by top-1, resumable state written atomically,
a rich progress bar, a NaN/inf guard, and ``torchrun`` DDP (the student alone is wrapped; only rank 0
writes and prints). Recipes supply the student and the loss (``vitshrink.recipes.base``).

Determinism and resume: the training order of epoch ``e`` is a seeded permutation (torch's
``DistributedSampler`` with ``seed``; one replica when not distributed), and every image's augmentation
is drawn from RNGs seeded by ``(seed, epoch, index)``, so a batch is the same whichever worker makes it
and however many batches were skipped. ``last.pt`` is written every ``checkpoint_steps`` optimizer steps
and at each epoch end with the model, optimizer, scheduler, position (epoch, batch, step), the partial
epoch's metrics and the python/numpy/torch RNG states; ``--resume`` skips the batches already done, so an
interrupted run ends with the same weights as an uninterrupted one (CPU).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, Sampler, Subset

import vitshrink
from vitshrink._atomic import atomic_path, atomic_write_text
from vitshrink.data import LabelledData, build_transform, make_loader, resolve_data
from vitshrink.errors import UserError
from vitshrink.evaluation import evaluate_loader
from vitshrink.io import architecture_record, data_config, model_from_record, save_model
from vitshrink.config import resolve_config
from vitshrink.recipes.base import RecipeContext, get_recipe

BUNDLED_TEACHER = Path(vitshrink.__file__).parent / "assets" / "teacher_vit_cifar10.safetensors"
SUMMARY_COLUMNS = ("epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr", "time")
CHECKPOINT_FORMAT = 1


@dataclass
class DistillResult:
    student: nn.Module  # the finalized best student (eval mode, CPU)
    out_dir: Path
    report: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)


def _train_transform(model: nn.Module, cfg: dict[str, Any]):
    aug = {"scale": tuple(cfg["aug_scale"]), "hflip": cfg["aug_hflip"], "color_jitter": cfg["aug_color_jitter"],
           "auto_augment": cfg["aug_auto_augment"], "re_prob": cfg["aug_re_prob"]}
    return build_transform(data_config(model), is_training=True, **aug)


# ------------------------------------------------------------------------------------- data, deterministic
class SeededAugmentation(Dataset):
    """Looks up ``(epoch, index)`` keys; the augmentation RNGs are seeded from ``(seed, epoch, index)``.

    The caller's python/numpy/torch CPU RNG states are restored afterwards, so data loading never perturbs
    the model's own randomness (dropout, drop-path) in the main process.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        sample_seed = (self.seed * 1_000_003 + epoch * 7_919 + index) % (2**31)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(sample_seed)
            np.random.seed(sample_seed)
            torch.default_generator.manual_seed(sample_seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class EpochSampler(Sampler):
    """torch's DistributedSampler order for ``epoch`` (this rank's shard), as ``(epoch, index)`` keys,
    skipping the first ``skip`` samples (the batches a resumed run has already trained on)."""

    def __init__(self, n: int, *, seed: int, rank: int, world_size: int):
        self.inner = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in enumerate(self.inner):
            if position >= self.skip:
                yield self.epoch, index

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip)


# ------------------------------------------------------------------------------------------ distribution
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float], device: torch.device) -> list[float]:
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()


def _init_distributed(device_name: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns)


def _device(name: str, ddp: Dist) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(ddp.local_rank)
    return torch.device("cuda", ddp.local_rank)


# ------------------------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``last.pt``: tensors and plain containers only (loads with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--resume: {path} not found (nothing to resume)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a vitshrink training checkpoint")
    return state


def _write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _unwrap(module: nn.Module) -> nn.Module:
    from timm.utils import unwrap_model

    return unwrap_model(module)


# -------------------------------------------------------------------------------------------- progress
def _progress(enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class StatsColumn(ProgressColumn):
        # Loss / accuracy / lr of the training task; evaluation tasks (added by evaluate_loader) have none.
        def render(self, task) -> Text:
            return Text(task.fields.get("stats", ""))

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), StatsColumn(), console=Console(stderr=True))


def _log(progress, ddp: Dist, message: str) -> None:
    if not ddp.main:
        return
    if progress is not None:
        progress.console.print(message, markup=False, highlight=False)
    else:
        print(message, flush=True)


# ------------------------------------------------------------------------------------------------ distill
def distill(
    teacher: nn.Module | None,
    recipe: str = "vanilla",
    *,
    student: nn.Module | str | None = None,
    data: str | os.PathLike | LabelledData | None = None,
    val_data: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = "output/distill",
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    device: str = "auto",
    amp: bool | None = None,
    resume: bool = False,
    seed: int = 0,
    config: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    workers: int | None = None,
    compile: bool = False,
    progress: bool = True,
    flops_target: float | None = None,
    val_split: float = 0.1,
) -> DistillResult:
    """Distil ``teacher`` into a smaller student with ``recipe``; write the run folder; return the result.

    ``teacher=None`` uses the bundled ViT teacher. ``data`` is a path (ImageFolder dir or tar) or a
    ``LabelledData``; None means the bundled CIFAR-10 subset. Settings come from ``recipes/RECIPE.yaml``,
    then ``config``, then the explicit arguments, then ``overrides`` (any preset key).
    """
    ddp = _init_distributed(device)
    try:
        return _distill(teacher, recipe, student=student, data=data, val_data=val_data, val_split=val_split,
                        out_dir=Path(out_dir),
                        epochs=epochs, batch_size=batch_size, lr=lr, device_name=device, amp=amp, resume=resume,
                        seed=seed, config=config, overrides=overrides, workers=workers, compile=compile,
                        show_progress=progress, flops_target=flops_target, ddp=ddp)
    finally:
        if ddp.owns_group:
            dist.destroy_process_group()


def load_bundled_teacher() -> nn.Module:
    from vitshrink.io import load_model

    if not BUNDLED_TEACHER.exists():
        raise UserError(f"no TEACHER given and the bundled teacher {BUNDLED_TEACHER.name} is not installed; "
                        "pass a TEACHER (timm name, .safetensors, .pt/.pth/.th or HF directory)")
    return load_model(BUNDLED_TEACHER)


def _distill(teacher, recipe_name, *, student, data, val_data, val_split, out_dir: Path, epochs, batch_size, lr, device_name,
             amp, resume, seed, config, overrides, workers, compile, show_progress, flops_target, ddp: Dist):
    recipe = get_recipe(recipe_name)
    cfg = resolve_config(recipe_name, config, {"epochs": epochs, "batch_size": batch_size, "lr": lr,
                                                "workers": workers, "amp": amp}, overrides)
    cfg = recipe.configure(cfg)
    device = _device(device_name, ddp)
    use_amp = bool(cfg["amp"]) if cfg["amp"] is not None else device.type == "cuda"
    use_amp = use_amp and device.type == "cuda"  # bf16 autocast on CPU is slower than fp32 there
    if teacher is None:
        teacher = load_bundled_teacher()
    checkpoint_path = out_dir / "last.pt"
    state = load_checkpoint(checkpoint_path) if resume else None

    random.seed(seed + ddp.rank)
    np.random.seed(seed + ddp.rank)
    torch.manual_seed(seed + ddp.rank)

    labelled = data if isinstance(data, LabelledData) else resolve_data(
        data, val_data, val_split=val_split, seed=seed, in_chans=int(data_config(teacher)["input_size"][0]))
    if labelled.train is None:
        raise UserError(f"--data {data}: no training images")
    t_classes = getattr(_unwrap(teacher), "num_classes", None)
    if t_classes is not None and t_classes != labelled.num_classes:
        raise UserError(f"teacher has {t_classes} classes but --data {data or 'bundled'} has "
                        f"{labelled.num_classes}; distil on the data the teacher was trained for")
    teacher = teacher.to(device).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)

    with _progress(show_progress and ddp.main) as bar:
        log = lambda message: _log(bar, ddp, message)  # noqa: E731
        if labelled.note:
            log(f"note: {labelled.note}")

        def train_loader_for(model: nn.Module, batch_size: int | None = None):
            split = labelled.train
            split.transform = _train_transform(model, cfg)
            sampler = DistributedSampler(split, num_replicas=ddp.world_size, rank=ddp.rank, shuffle=True, seed=seed)
            return make_loader(split, batch_size or cfg["batch_size"], sampler=sampler, workers=cfg["workers"],
                               drop_last=True, seed=seed)

        ctx = RecipeContext(cfg=cfg, device=device, data=labelled, train_loader=train_loader_for, progress=bar,
                            flops_target=flops_target, rank=ddp.rank, world_size=ddp.world_size, out_dir=out_dir,
                            log=log)
        if state is not None:
            # The student's architecture may come from a search (prepare): rebuild it from the record.
            model = model_from_record(json.loads(state["arch"]))
        else:
            model = recipe.build_student(teacher, student, ctx).to(device)
            model = recipe.prepare(teacher, model, ctx)
        model = model.to(device)
        s_classes = getattr(model, "num_classes", None)
        if t_classes is not None and s_classes is not None and s_classes != t_classes:
            raise UserError(f"--student has {s_classes} classes, the teacher {t_classes}")
        if getattr(model, "vitshrink_arch", None) is None:
            raise UserError("the student must be built by vitshrink.io.create_model (its architecture is "
                            "recorded for saving and resuming)")
        arch_json = json.dumps(architecture_record(model, class_names=labelled.class_names))

        task = recipe.task(teacher, model, cfg).to(device)
        trainable = task.get_trainable_module()

        # Data: seeded per-sample augmentation, this rank's shard of a seeded permutation.
        labelled.train.transform = _train_transform(model, cfg)
        train_set = SeededAugmentation(labelled.train, seed)
        sampler = EpochSampler(len(train_set), seed=seed, rank=ddp.rank, world_size=ddp.world_size)
        full_steps = len(sampler) // cfg["batch_size"]
        steps_per_epoch = min(full_steps, cfg["steps_per_epoch"] or full_steps)
        if steps_per_epoch < 1:
            raise UserError(f"--batch-size {cfg['batch_size']} is larger than the training split per process "
                            f"({len(sampler)} images): no full batch to train on")
        train_loader = make_loader(train_set, cfg["batch_size"], sampler=sampler, workers=cfg["workers"],
                                   drop_last=True, seed=seed)
        val_images = labelled.val
        val_images.transform = build_transform(data_config(model), is_training=False)
        val_shard = Subset(val_images, range(ddp.rank, len(val_images), ddp.world_size))
        val_loader = make_loader(val_shard, cfg["eval_batch_size"], workers=cfg["workers"])

        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        optimizer = create_optimizer_v2(trainable, opt=cfg["opt"], lr=float(cfg["lr"]),
                                        weight_decay=float(cfg["weight_decay"]))
        scheduler, _ = create_scheduler_v2(optimizer, sched=cfg["sched"], num_epochs=cfg["epochs"],
                                           warmup_epochs=cfg["warmup_epochs"], warmup_lr=float(cfg["warmup_lr"]),
                                           min_lr=float(cfg["min_lr"]), step_on_epochs=False,
                                           updates_per_epoch=steps_per_epoch)

        epoch, batch_done, global_step = 0, 0, 0
        best_top1, best_epoch, rows, elapsed = -1.0, None, [], 0.0
        accum = [0.0, 0.0, 0.0]  # loss sum (over samples), samples, correct
        if state is not None:
            _unwrap(trainable).load_state_dict(state["trainable"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            epoch, batch_done, global_step = state["epoch"], state["batch"], state["global_step"]
            best_top1, best_epoch, rows = state["best_top1"], state["best_epoch"], list(state["summary"])
            accum, elapsed = list(state["accum"]), state["elapsed"]
            _set_rng_state(state["rng"][ddp.rank] if ddp.rank < len(state["rng"]) else state["rng"][0])
            log(f"resuming {out_dir} at epoch {epoch + 1}, batch {batch_done} (step {global_step})")
        scheduler.step_update(global_step)

        if compile:
            task.compile()
        if ddp.world_size > 1:
            task.prepare_distributed(device_ids=[device.index] if device.type == "cuda" else None)

        run_args = {"recipe": recipe_name, "teacher": _describe(teacher), "student": _describe_student(student),
                    "data": str(data) if not isinstance(data, LabelledData) else labelled.description,
                    "val_data": None if val_data is None else str(val_data), "seed": seed, "device": device_name,
                    "compile": compile, "flops_target": flops_target, "world_size": ddp.world_size,
                    "vitshrink_version": vitshrink.__version__, "config": cfg}
        if ddp.main:
            atomic_write_text(out_dir / "args.yaml", yaml.safe_dump(run_args, sort_keys=False))
            log(f"{recipe_name}: teacher {run_args['teacher']} -> student {json.loads(arch_json)['model']} "
                f"({sum(p.numel() for p in model.parameters()):,} params), {labelled.description}, "
                f"{cfg['epochs']} epochs x {steps_per_epoch} steps, batch {cfg['batch_size']} x {ddp.world_size}, "
                f"{device}{' bf16' if use_amp else ''}")

        def checkpoint(at_epoch: int, at_batch: int) -> None:
            rng = _gather_rng(ddp)
            if not ddp.main:
                return
            _save_checkpoint(checkpoint_path, {
                "format": CHECKPOINT_FORMAT, "arch": arch_json, "epoch": at_epoch, "batch": at_batch,
                "global_step": global_step, "trainable": _unwrap(trainable).state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng,
                "best_top1": best_top1, "best_epoch": best_epoch, "summary": rows, "accum": accum,
                "elapsed": elapsed + (time.perf_counter() - started)})

        clip = cfg["clip_grad"]
        started = time.perf_counter()
        while epoch < cfg["epochs"]:
            task.train()
            sampler.set_epoch(epoch, skip=batch_done * cfg["batch_size"])
            bar_task = bar.add_task(f"epoch {epoch + 1}/{cfg['epochs']}", total=steps_per_epoch,
                                    completed=batch_done, stats="") if bar is not None else None
            batch_index = batch_done
            for images, targets, _ in train_loader:
                if batch_index >= steps_per_epoch:
                    break
                images = images.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                out, loss_value = train_step(task, images, targets, optimizer, clip_grad=clip, amp=use_amp,
                                             ddp=ddp)
                if not math.isfinite(loss_value):
                    kept = f"last good checkpoint kept: {checkpoint_path}" if checkpoint_path.exists() \
                        else "no checkpoint was written yet"
                    raise UserError(f"loss became {loss_value} at epoch {epoch + 1}, step {global_step + 1}; "
                                    f"stopped ({kept}); try a lower --lr or --clip-grad")
                n = images.shape[0]
                correct = 0.0
                if recipe.uses_labels and out.get("output") is not None:
                    correct = float((out["output"].argmax(-1) == targets).sum())
                global_step += 1
                batch_index += 1
                scheduler.step_update(global_step)
                accum[0] += float(out["loss"]) * n
                accum[1] += n
                accum[2] += correct
                if bar_task is not None:
                    stats = f"loss {accum[0] / accum[1]:.4f}"
                    if recipe.uses_labels:
                        stats += f"  acc {accum[2] / accum[1]:.2%}"
                    bar.update(bar_task, advance=1, stats=f"{stats}  lr {optimizer.param_groups[0]['lr']:.2e}")
                if cfg["checkpoint_steps"] and global_step % cfg["checkpoint_steps"] == 0 \
                        and batch_index < steps_per_epoch:
                    checkpoint(epoch, batch_index)
            loss_sum, seen, _ = ddp.all_sum(accum, device)
            if bar_task is not None:
                bar.remove_task(bar_task)
            result = _evaluate(model, val_loader, device, use_amp, ddp, bar)
            row = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "eval_loss": result["loss"],
                   "eval_top1": result["top1"] * 100, "eval_top5": result["top5"] * 100,
                   "lr": optimizer.param_groups[0]["lr"], "time": round(elapsed + time.perf_counter() - started, 3)}
            rows.append(row)
            if result["top1"] > best_top1:
                best_top1, best_epoch = result["top1"], epoch + 1
                if ddp.main:
                    save_model(model, out_dir / "student.safetensors", class_names=labelled.class_names,
                               provenance={"recipe": recipe_name, "teacher": run_args["teacher"],
                                           "epoch": epoch + 1, "top1": result["top1"]})
            log(f"epoch {epoch + 1}/{cfg['epochs']}: train loss {row['train_loss']:.4f}, val top-1 "
                f"{row['eval_top1']:.2f}% top-5 {row['eval_top5']:.2f}% (best {best_top1:.2%}, epoch {best_epoch})")
            if ddp.main:
                _write_summary(out_dir / "summary.csv", rows)
            epoch, batch_done, accum = epoch + 1, 0, [0.0, 0.0, 0.0]
            checkpoint(epoch, 0)
        distill_seconds = elapsed + time.perf_counter() - started

        paths = {name: out_dir / name for name in ("args.yaml", "summary.csv", "student.safetensors", "last.pt")}
        if not ddp.main:
            return DistillResult(model, out_dir, {}, paths)
        return _finish(recipe, cfg, teacher, model, labelled, out_dir, paths, bar, log,
                       distill_seconds=distill_seconds, best_epoch=best_epoch, device=device, use_amp=use_amp)


def train_step(task, images: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer, *,
               clip_grad: float | None = None, amp: bool = False, ddp: Dist | None = None
               ) -> tuple[dict[str, torch.Tensor], float]:
    """One optimizer step of a recipe's task: forward (bf16 autocast on CUDA when ``amp``), backward, gradient
    clipping, NaN/inf check, step. Returns the task's outputs (detached) and the loss (summed over ranks).

    A non-finite loss returns before ``optimizer.step``, so the weights stay the last good ones. The loss is
    read (a device-to-host sync) only after backward and clipping are queued, so on CUDA the GPU keeps
    working while the host waits for the value.
    """
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp and images.device.type == "cuda"):
        out = task(images, targets)
    loss = out["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(task.get_clip_parameters(), float(clip_grad))
    loss_value = float(loss.detach())
    if ddp is not None and ddp.world_size > 1:
        loss_value, = ddp.all_sum([loss_value], images.device)
    detached = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    if math.isfinite(loss_value):
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    return detached, loss_value


def _gather_rng(ddp: Dist) -> list[dict[str, Any]]:
    state = _rng_state()
    if ddp.world_size == 1:
        return [state]
    gathered: list[Any] = [None] * ddp.world_size
    dist.all_gather_object(gathered, state)
    return gathered


def _evaluate(model: nn.Module, loader, device: torch.device, amp: bool, ddp: Dist, bar) -> dict[str, float]:
    result = evaluate_loader(model, loader, device=device, amp=amp, progress=bar, description="validate")
    if bar is not None:
        bar.remove_task(bar.task_ids[-1])
    n = result.n_images
    loss_sum = 0.0 if n == 0 else result.loss * n
    total_loss, top1, top5, seen = ddp.all_sum([loss_sum, result.top1 * n, result.top5 * n, n], device)
    if seen == 0:
        raise UserError("the validation split has no readable images")
    return {"loss": total_loss / seen, "top1": top1 / seen, "top5": top5 / seen}


def _describe(model: nn.Module) -> str:
    spec = getattr(model, "vitshrink_spec", None)
    if spec:
        return str(spec)
    arch = getattr(_unwrap(model), "vitshrink_arch", None)
    return arch["name"] if arch else type(model).__name__


def _describe_student(student: nn.Module | str | None) -> str | None:
    if student is None:
        return None
    return student if isinstance(student, str) else _describe(student)


def _finish(recipe, cfg, teacher, model, labelled, out_dir, paths, bar, log, *, distill_seconds, best_epoch,
            device, use_amp) -> DistillResult:
    """Best weights -> finalize -> ONNX (parity-checked) -> measure teacher and student -> report."""
    from safetensors.torch import load_file

    from vitshrink.export import export_onnx
    from vitshrink.measure import benchmark, count_flops, count_params
    from vitshrink.report import build_report, model_entry, write_report

    model.load_state_dict(load_file(str(paths["student.safetensors"])))
    final = recipe.finalize(model, cfg).cpu().eval()
    val = labelled.val
    val.transform = build_transform(data_config(final), is_training=False)
    sample = torch.stack([val[i][0] for i in range(min(8, len(val))) if val[i] is not None])
    log("exporting student.onnx (parity check on real images) and measuring teacher and student ...")
    onnx = export_onnx(final, out_dir / "student.onnx", sample=sample)
    paths["student.onnx"] = out_dir / "student.onnx"

    def top1(m: nn.Module) -> float:
        val.transform = build_transform(data_config(m), is_training=False)
        loader = make_loader(val, cfg["eval_batch_size"], workers=cfg["workers"])
        result = evaluate_loader(m, loader, device=device, amp=use_amp, progress=bar, description="evaluate")
        if bar is not None:
            bar.remove_task(bar.task_ids[-1])
        return result.top1

    teacher_top1 = top1(teacher)
    student_top1 = top1(final.to(device))
    final = final.cpu()
    sizes = tuple(int(b) for b in cfg["bench_batch_sizes"])
    teacher_bench = benchmark(teacher.cpu(), batch_sizes=sizes, runtimes=("onnxruntime",), min_time_s=0.5)
    # The student is timed as shipped (student.onnx); its params and MACs are counted on the torch model,
    # the same way as the teacher's.
    student_bench = benchmark(paths["student.onnx"], batch_sizes=sizes, min_time_s=0.5, name="student.onnx",
                              input_size=data_config(final)["input_size"])
    flops = count_flops(final, data_config(final)["input_size"])
    student_bench.update(params=count_params(final), macs=flops.macs, flops=flops.flops, gmacs=flops.gmacs,
                         gflops=flops.gflops, flops_note=teacher_bench["flops_note"])
    report = build_report(
        recipe=recipe.name, data=labelled.description, epochs=cfg["epochs"], best_epoch=best_epoch,
        distill_seconds=distill_seconds, onnx=onnx.as_dict(), warnings=recipe.report_notes(out_dir),
        teacher=model_entry(teacher_top1, teacher_bench, sizes), student=model_entry(student_top1, student_bench, sizes))
    paths.update({"report.json": out_dir / "report.json", "report.md": out_dir / "report.md"})
    write_report(report, out_dir)
    return DistillResult(final, out_dir, report, paths)
