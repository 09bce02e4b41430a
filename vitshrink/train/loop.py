"""The training loop: ``train(task, source, schedule, checkpointing, ...)`` trains, and does nothing after.

AdamW + cosine-with-warm-up (timm's factories), gradient clipping, bf16 autocast on CUDA, optional
``torch.compile``, evaluation every epoch, best checkpoint by top-1, resumable state (``vitshrink.train.checkpoint``),
a rich progress bar, a NaN/inf guard, and DDP of the student alone (``vitshrink.train.distributed``). The task
is any ``timm.task.TrainingTask`` (``vitshrink.distill.tasks``); the source yields ``(images, targets, extras)``
(``vitshrink.data.sources``). With ``mixing`` (``vitshrink.train.mixup``) each batch is mixup/cutmix-ed, drawn from
its own keys, before the step: the task's student and teachers all see the mixed images.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from vitshrink.errors import UserError
from vitshrink.evaluation import evaluate_loader
from vitshrink.train.checkpoint import Checkpointing, save_checkpoint, set_rng_state, rng_state, write_summary
from vitshrink.train.distributed import Dist
from vitshrink.train.mixup import SeededMixup


@dataclass
class Schedule:
    """How long and how the student is optimised (keys of recipes/base.yaml)."""

    epochs: int
    batch_size: int
    lr: float
    opt: str = "adamw"
    sched: str = "cosine"
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    clip_grad: float | None = 1.0
    max_steps_per_epoch: int | None = None
    amp: bool = False  # bf16 autocast (CUDA only)
    compile: bool = False

    @classmethod
    def from_settings(cls, cfg: dict[str, Any], *, amp: bool = False, compile: bool = False) -> "Schedule":
        return cls(epochs=int(cfg["epochs"]), batch_size=int(cfg["batch_size"]), lr=float(cfg["lr"]), opt=cfg["opt"],
                   sched=cfg["sched"], weight_decay=float(cfg["weight_decay"]), warmup_epochs=cfg["warmup_epochs"],
                   warmup_lr=float(cfg["warmup_lr"]), min_lr=float(cfg["min_lr"]), clip_grad=cfg["clip_grad"],
                   max_steps_per_epoch=cfg["steps_per_epoch"], amp=amp, compile=compile)

    def steps_per_epoch(self, source) -> int:
        """Optimizer steps of one epoch: the source's full batches, capped by ``steps_per_epoch``."""
        full = source.batches_per_epoch()
        steps = min(full, self.max_steps_per_epoch or full)
        if steps < 1:
            raise UserError(f"--batch-size {self.batch_size} is larger than the training split per process "
                            f"({source.images_per_epoch()} images): no full batch to train on")
        return steps


@dataclass
class Evaluation:
    """The model evaluated after each epoch (the raw student) and its validation loader (this rank's shard);
    ``loader`` None: no validation set, every epoch's student is kept (the last one wins)."""

    model: nn.Module
    loader: Any
    select_best: bool = False  # keep the best epoch by validation top-1 (else the last epoch)


@dataclass
class TrainEnv:
    """Where the loop runs and reports."""

    device: torch.device
    ddp: Dist = field(default_factory=Dist)
    progress: Any = None  # rich.progress.Progress or None
    log: Callable[[str], None] = print
    uses_labels: bool = True  # show train accuracy against the targets


@dataclass
class TrainResult:
    best_epoch: int | None
    best_top1: float
    seconds: float
    rows: list[dict[str, Any]]
    global_step: int


@dataclass
class _Position:
    epoch: int = 0
    batch: int = 0
    global_step: int = 0
    best_top1: float = -1.0
    best_epoch: int | None = None
    rows: list = field(default_factory=list)
    accum: list = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss sum (over samples), samples, correct
    elapsed: float = 0.0
    last_batch: tuple | None = None  # (images, targets, extras) of the latest step: the weights' sanity check


def train_step(task, images: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer, *,
               clip_grad: float | None = None, amp: bool = False, ddp: Dist | None = None,
               extras: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """One optimizer step of a task: forward (bf16 autocast on CUDA when ``amp``), backward, gradient
    clipping, NaN/inf check, step. Returns the task's outputs (detached) and the loss (summed over ranks).

    ``extras`` reach the task when it asks for them (``task.wants_extras``). A non-finite loss returns before
    ``optimizer.step``, so the weights stay the last good ones. The loss is read (a device-to-host sync) only
    after backward and clipping are queued, so on CUDA the GPU keeps working while the host waits.
    """
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp and images.device.type == "cuda"):
        out = task(images, targets, extras) if getattr(task, "wants_extras", False) else task(images, targets)
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


def _optimizer_and_scheduler(trainable: nn.Module, schedule: Schedule, steps_per_epoch: int):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    optimizer = create_optimizer_v2(trainable, opt=schedule.opt, lr=schedule.lr, weight_decay=schedule.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched=schedule.sched, num_epochs=schedule.epochs,
                                       warmup_epochs=schedule.warmup_epochs, warmup_lr=schedule.warmup_lr,
                                       min_lr=schedule.min_lr, step_on_epochs=False,
                                       updates_per_epoch=steps_per_epoch)
    return optimizer, scheduler


def _restore(state: dict[str, Any], trainable: nn.Module, optimizer, scheduler, env: TrainEnv) -> _Position:
    from timm.utils import unwrap_model

    unwrap_model(trainable).load_state_dict(state["trainable"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    position = _Position(state["epoch"], state["batch"], state["global_step"], state["best_top1"],
                         state["best_epoch"], list(state["summary"]), list(state["accum"]), state["elapsed"])
    rank = env.ddp.rank
    set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
    return position


def train(task, source, schedule: Schedule, checkpointing: Checkpointing, *, evaluation: Evaluation,
          env: TrainEnv, mixing: SeededMixup | None = None) -> TrainResult:
    """Train ``task.get_trainable_module()`` on ``source`` for ``schedule``; write ``last.pt``, ``summary.csv``
    and (through ``checkpointing.save_best``) the best student. Resumes from ``checkpointing.resume_state``.
    ``mixing`` mixes every batch before the step (the train accuracy is then not shown: its targets are mixed)."""
    from timm.utils import unwrap_model

    trainable = task.get_trainable_module()
    steps_per_epoch = schedule.steps_per_epoch(source)
    optimizer, scheduler = _optimizer_and_scheduler(trainable, schedule, steps_per_epoch)
    at = _Position()
    if checkpointing.resume_state is not None:
        try:
            at = _restore(checkpointing.resume_state, trainable, optimizer, scheduler, env)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            text = " ".join(str(exc).split())[:160]
            raise UserError(f"{checkpointing.path}: damaged checkpoint, cannot resume ({type(exc).__name__}: "
                            f"{text}); run again without --resume or use another --out") from None
        env.log(f"resuming {checkpointing.out_dir} at epoch {at.epoch + 1}, batch {at.batch} "
                f"(step {at.global_step})")
    scheduler.step_update(at.global_step)
    if schedule.compile:
        task.compile()
    if env.ddp.world_size > 1:
        task.prepare_distributed(device_ids=[env.device.index] if env.device.type == "cuda" else None)
    started = time.perf_counter()

    def checkpoint(epoch: int, batch: int) -> None:
        check_weights_good(task, at, checkpointing)  # a checkpoint is only ever written with good weights
        rng = env.ddp.gather(rng_state())
        if env.ddp.main:
            save_checkpoint(checkpointing.path, {
                "arch": checkpointing.arch_json, "epoch": epoch, "batch": batch, "global_step": at.global_step,
                "trainable": unwrap_model(trainable).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng, "best_top1": at.best_top1,
                "best_epoch": at.best_epoch, "summary": at.rows, "accum": at.accum,
                "elapsed": at.elapsed + (time.perf_counter() - started), "run": checkpointing.identity or {}})

    while at.epoch < schedule.epochs:
        _train_epoch(task, source, schedule, steps_per_epoch, optimizer, scheduler, at, env, checkpointing,
                     checkpoint, mixing)
        _end_epoch(at, evaluation, schedule, optimizer, env, checkpointing, started)
        at.epoch, at.batch, at.accum = at.epoch + 1, 0, [0.0, 0.0, 0.0]
        checkpoint(at.epoch, 0)
    return TrainResult(at.best_epoch, at.best_top1, at.elapsed + time.perf_counter() - started, at.rows,
                       at.global_step)


def _train_epoch(task, source, schedule: Schedule, steps_per_epoch: int, optimizer, scheduler, at: _Position,
                 env: TrainEnv, checkpointing: Checkpointing, checkpoint: Callable[[int, int], None],
                 mixing: SeededMixup | None = None) -> None:
    bar = env.progress
    # A top-1 against mixed targets means nothing, so with mixup the bar shows the loss alone.
    show_accuracy = env.uses_labels and mixing is None
    task.train()
    source.set_epoch(at.epoch, at.batch)
    bar_task = bar.add_task(f"epoch {at.epoch + 1}/{schedule.epochs}", total=steps_per_epoch, completed=at.batch,
                            stats="") if bar is not None else None
    for images, targets, extras in source:
        if at.batch >= steps_per_epoch:
            break
        images = images.to(env.device, non_blocking=True)
        targets = targets.to(env.device, non_blocking=True)
        if mixing is not None:
            images, targets, extras = mixing(images, targets, extras)
        out, loss_value = train_step(task, images, targets, optimizer, clip_grad=schedule.clip_grad,
                                     amp=schedule.amp, ddp=env.ddp, extras=extras)
        if not math.isfinite(loss_value):
            if at.global_step == 0:  # before any update: the learning rate cannot be the cause
                raise UserError(f"loss is {loss_value} at the first step, before any update: the inputs, the "
                                "teacher's outputs or the student's initial weights are not finite (check "
                                "--mean/--std, the teacher and --student); a lower --lr will not help")
            raise UserError(f"loss became {loss_value} at epoch {at.epoch + 1}, step {at.global_step + 1}; "
                            f"stopped ({_kept(checkpointing)}); try a lower --lr or --clip-grad")
        at.last_batch = (images, targets, extras)
        n = images.shape[0]
        correct = 0.0
        if show_accuracy and out.get("output") is not None:
            correct = float((out["output"].argmax(-1) == targets).sum())
        at.global_step += 1
        at.batch += 1
        scheduler.step_update(at.global_step)
        at.accum[0] += float(out["loss"]) * n
        at.accum[1] += n
        at.accum[2] += correct
        if bar_task is not None:
            stats = f"loss {at.accum[0] / at.accum[1]:.4f}"
            if show_accuracy:
                stats += f"  acc {at.accum[2] / at.accum[1]:.2%}"
            bar.update(bar_task, advance=1, stats=f"{stats}  lr {optimizer.param_groups[0]['lr']:.2e}")
        if checkpointing.every_steps and at.global_step % checkpointing.every_steps == 0 \
                and at.batch < steps_per_epoch:
            checkpoint(at.epoch, at.batch)
    if bar_task is not None:
        bar.remove_task(bar_task)
    check_weights_good(task, at, checkpointing)  # before the epoch's evaluation may save student.safetensors


def _kept(checkpointing: Checkpointing) -> str:
    return f"last good checkpoint kept: {checkpointing.path}" if checkpointing.path.exists() \
        else "no checkpoint was written yet"


def check_weights_good(task, at: _Position, checkpointing: Checkpointing) -> None:
    """The NaN guard for weights: after the latest step, every trainable weight is finite and the loss of the
    latest batch recomputed with them is finite; else stop, keeping the last good checkpoint. A finite loss
    before the step does not prove the step left usable weights (an update to 1e30 is finite, and every later
    step then fails). The recomputation changes nothing: no grad, the RNG forked, buffers (BatchNorm running
    statistics) restored, so training goes on exactly as without it."""
    from vitshrink.validate import first_nonfinite

    if at.last_batch is None:
        return
    where = f"at epoch {at.epoch + 1}, step {at.global_step}"
    bad = first_nonfinite(task.get_trainable_module().named_parameters())
    if bad is not None:
        raise UserError(f"weights became NaN/inf {where} ({bad}); stopped ({_kept(checkpointing)}); "
                        "try a lower --lr or --clip-grad")
    images, targets, extras = at.last_batch
    buffers = {name: b.detach().clone() for name, b in task.named_buffers()}
    devices = [images.device.index or 0] if images.device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            out = task(images, targets, extras) if getattr(task, "wants_extras", False) else task(images, targets)
            loss = float(out["loss"])
    finally:
        with torch.no_grad():
            for name, buffer in task.named_buffers():
                if name in buffers:
                    buffer.copy_(buffers[name])
    if not math.isfinite(loss):
        raise UserError(f"loss became {loss} {where} with the updated weights; stopped before saving them "
                        f"({_kept(checkpointing)}); try a lower --lr or --clip-grad")


def _end_epoch(at: _Position, evaluation: Evaluation, schedule: Schedule, optimizer, env: TrainEnv,
               checkpointing: Checkpointing, started: float) -> None:
    loss_sum, seen, _ = env.ddp.all_sum(at.accum, env.device)
    row = {"epoch": at.epoch, "train_loss": loss_sum / max(seen, 1), "eval_loss": None, "eval_top1": None,
           "eval_top5": None, "lr": optimizer.param_groups[0]["lr"],
           "time": round(at.elapsed + time.perf_counter() - started, 3)}
    if evaluation.loader is None:
        # No labelled validation images (a data-free run without --val-data): the last epoch is kept.
        at.rows.append(row)
        at.best_epoch = at.epoch + 1
        if env.ddp.main:
            checkpointing.save_best(at.epoch + 1, None)
            env.log(f"epoch {at.epoch + 1}/{schedule.epochs}: train loss {row['train_loss']:.4f} "
                    "(no validation set: not evaluated)")
            write_summary(checkpointing.out_dir / "summary.csv", at.rows)
        return
    result = evaluate_split(evaluation.model, evaluation.loader, env, amp=schedule.amp)
    row.update(eval_loss=result["loss"], eval_top1=result["top1"] * 100, eval_top5=result["top5"] * 100)
    at.rows.append(row)
    # Picking the best epoch on the set whose top-1 the report quotes would overstate it: by default the last
    # epoch is kept; select_epoch: best keeps the best one (and the report says so).
    if result["top1"] > at.best_top1 or not evaluation.select_best:
        at.best_top1, at.best_epoch = result["top1"], at.epoch + 1
        if env.ddp.main:
            checkpointing.save_best(at.epoch + 1, result["top1"])
    if env.ddp.main:
        kept = "best" if evaluation.select_best else "kept"
        env.log(f"epoch {at.epoch + 1}/{schedule.epochs}: train loss {row['train_loss']:.4f}, val top-1 "
                f"{row['eval_top1']:.2f}% top-5 {row['eval_top5']:.2f}% ({kept} {at.best_top1:.2%}, "
                f"epoch {at.best_epoch})")
        write_summary(checkpointing.out_dir / "summary.csv", at.rows)


def evaluate_split(model: nn.Module, loader, env: TrainEnv, *, amp: bool = False) -> dict[str, float]:
    """Loss, top-1 and top-5 over every rank's shard (all-reduced)."""
    bar = env.progress
    result = evaluate_loader(model, loader, device=env.device, amp=amp, progress=bar, description="validate")
    if bar is not None:
        bar.remove_task(bar.task_ids[-1])
    n = result.n_images
    loss_sum = 0.0 if n == 0 else result.loss * n
    total_loss, top1, top5, seen = env.ddp.all_sum([loss_sum, result.top1 * n, result.top5 * n, n], env.device)
    if seen == 0:
        raise UserError("the validation split has no readable images")
    return {"loss": total_loss / seen, "top1": top1 / seen, "top5": top5 / seen}
