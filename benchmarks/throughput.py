"""Distillation step throughput: vitshrink's train_step vs timm's LogitDistillationTask, same everything.

Both sides train the same student (a fresh copy each), against the same frozen teacher, on the same batch of
real images, with the same AdamW optimizer, gradient clipping and (on CUDA) bf16 autocast; only the task and
step differ: ``vitshrink.train.train_step`` with the ``vanilla`` recipe's task vs a plain loop around
``timm.task.LogitDistillationTask`` (the loop timm's train.py runs). Data loading is excluded on both sides.
Steps interleave one by one (A B A B ...; B A in odd rounds) so machine-load drift hits both alike;
images/s per round is steps x batch / the side's summed step time, and the table gives the median round.

    python benchmarks/throughput.py [--teacher SPEC] [--batch-size 64] [--steps 20] [--rounds 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitshrink.data import build_transform, make_loader, resolve_data  # noqa: E402
from vitshrink.data.sources import with_transform  # noqa: E402
from vitshrink.train import train_step  # noqa: E402
from vitshrink.io import create_model, data_config, load_model  # noqa: E402
from vitshrink.recipes import get_recipe, load_preset  # noqa: E402
from vitshrink.students import derive_student  # noqa: E402

DEFAULT_TEACHER = ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3,
                                                num_classes=10))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", help="teacher SPEC (default: a ViT-Ti/4 at 32 px, 12 blocks, random weights)")
    parser.add_argument("--arch", help="--arch for a foreign teacher checkpoint")
    parser.add_argument("-b", "--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile both tasks")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/throughput.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    amp = device.type == "cuda"

    torch.manual_seed(0)
    if args.teacher:
        teacher = load_model(args.teacher, arch=args.arch)
    else:
        teacher = create_model(DEFAULT_TEACHER[0], **DEFAULT_TEACHER[1])
    teacher = teacher.to(device).eval()
    base_student = derive_student(teacher).to(device)
    cfg = load_preset("vanilla")
    split = resolve_data().train
    split = with_transform(split, build_transform(data_config(base_student), is_training=True, scale=(0.35, 1.0)))
    images, targets, _ = next(iter(make_loader(split, args.batch_size, shuffle=True, workers=0, seed=0)))
    images, targets = images.to(device), targets.to(device)

    def build(kind: str):
        from timm.optim import create_optimizer_v2
        from timm.task import LogitDistillationTask

        student = copy.deepcopy(base_student)
        if kind == "vitshrink":
            task = get_recipe("vanilla").task(teacher, student, cfg).to(device)
        else:
            task = LogitDistillationTask(student, teacher, criterion=torch.nn.CrossEntropyLoss(),
                                         task_loss_weight=1.0 - cfg["kd_weight"], temperature=cfg["temperature"],
                                         device=device, verbose=False).to(device)
        if args.compile:
            task.compile()
        optimizer = create_optimizer_v2(task.get_trainable_module(), opt="adamw", lr=float(cfg["lr"]),
                                        weight_decay=float(cfg["weight_decay"]))
        task.train()
        return task, optimizer

    def timm_step(task, optimizer):
        # The step timm's train.py runs: forward under autocast, backward, clip, step.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = task(images, targets)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.get_clip_parameters(), float(cfg["clip_grad"]))
        optimizer.step()
        return loss.item()  # timm logs the loss value (a host sync), as vitshrink's NaN guard does

    def ours_step(task, optimizer):
        return train_step(task, images, targets, optimizer, clip_grad=cfg["clip_grad"], amp=amp)[1]

    runs = {"vitshrink": (ours_step, build("vitshrink")), "timm": (timm_step, build("timm"))}
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for name, (step, (task, optimizer)) in runs.items():
        for _ in range(args.warmup):
            step(task, optimizer)
    for round_index in range(args.rounds):
        # Steps interleave one by one (A B A B ..., B first in odd rounds) so load drift on a shared
        # machine hits both sides alike; each side's time is the sum of its own steps.
        order = list(runs.items()) if round_index % 2 == 0 else list(runs.items())[::-1]
        spent = {name: 0.0 for name in runs}
        for _ in range(args.steps):
            for name, (step, (task, optimizer)) in order:
                _sync(device)
                start = time.perf_counter()
                step(task, optimizer)
                _sync(device)
                spent[name] += time.perf_counter() - start
        for name in runs:
            rates[name].append(args.steps * args.batch_size / spent[name])
    median = {name: statistics.median(values) for name, values in rates.items()}
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python"] + sys.argv),
        "machine": {"platform": platform.platform(), "cpu_count": __import__("os").cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device)},
        "teacher": args.teacher or f"{DEFAULT_TEACHER[0]} {DEFAULT_TEACHER[1]} (random weights)",
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in base_student.parameters()),
        "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds, "amp_bf16": amp,
        "compile": args.compile,
        "images_per_s": {name: {"median": median[name], "rounds": rates[name]} for name in rates},
        "ratio_vitshrink_over_timm": median["vitshrink"] / median["timm"],
    }
    print(f"{'step':<30} {'images/s (median)':>18}   rounds (images/s)")
    for name, label in (("vitshrink", "vitshrink train_step"), ("timm", "timm LogitDistillationTask")):
        print(f"{label:<30} {median[name]:>18.1f}   {'  '.join(f'{v:.1f}' for v in rates[name])}")
    print(f"ratio vitshrink / timm: {result['ratio_vitshrink_over_timm']:.3f}  ({device}, batch {args.batch_size})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
