"""Benchmark UVC's pruning choices at one FLOPs target (issue 15) on two real models.

Models: the bundled CIFAR-10 ViT teacher (6 blocks) and a 4-block MNIST ViT with LayerNorm eps 1e-5 (as
models trained outside timm's defaults), trained here on ``../shared/data/mnist/train_5k.tar``.
Rows, per model and seed, all at ``--target`` (default 0.5):

* ``search official`` / ``search kd`` (``search_objective``), each with ``restore_kept`` on and off;
* ``search official + official post-train`` (``posttrain_objective: official``);
* ``magnitude one-shot`` (``pruning_plan: magnitude``, no search);
* ``depth-halved`` (every other block dropped, the rest the teacher's weights).

Each row records the counted FLOPs ratio R, the search's own R before the greedy adjustment, top-1 before
post-training and top-1 after the same post-training (the uvc preset's KD: T 4, weight 0.9, AdamW + cosine),
so "uvc beats depth-halved at equal FLOPs after the same post-training" can be read off directly. The
post-training loop is written here (not the engine) so every row gets exactly the same one.

    python benchmarks/uvc_choices.py --scale full --device cuda --out benchmarks/results/uvc_choices_full.json
    nice -n 5 python benchmarks/uvc_choices.py --scale small --out benchmarks/results/uvc_choices_small.json

(``benchmarks/uvc.py`` is issue 4's benchmark through the engine: targets 0.7/0.5, uniform pruning, ablations.)

``--scale full``: 2 seeds, the preset's 300 search steps, 5 post-training epochs on the 5k training images,
top-1 on the full test sets (bundled test_1k; MNIST test.tar 10k). ``small`` is a CPU-sized smoke run
(1 seed, 60 search steps, 1 epoch on 1000 images, 500 test images). JSON is rewritten after every row.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vitshrink._atomic import atomic_write_text  # noqa: E402
from vitshrink.config import load_preset  # noqa: E402
from vitshrink.data import build_transform, make_loader, resolve_data  # noqa: E402
from vitshrink.distill import losses  # noqa: E402
from vitshrink.evaluation import evaluate_loader  # noqa: E402
from vitshrink.io import data_config, load_model, set_data_config  # noqa: E402
from vitshrink.measure import count_flops  # noqa: E402
from vitshrink.prune.decisions import magnitude_plan  # noqa: E402
from vitshrink.prune.surgery import drop_blocks, slice_vit  # noqa: E402
from vitshrink.prune.uvc_objective import OfficialLoss  # noqa: E402
from vitshrink.prune.uvc_search import search_uvc, sliced_student  # noqa: E402
from vitshrink.recipes.uvc import uvc_config  # noqa: E402
from vitshrink.students import kept_blocks  # noqa: E402

MNIST = REPO.parent / "shared" / "data" / "mnist"
BUNDLED_TEACHER = REPO / "vitshrink" / "assets" / "teacher_vit_cifar10.safetensors"
SCALES = {
    "full": dict(seeds=[0, 1], search_steps=None, epochs=5, train_images=None, test_images=None, mnist_epochs=40),
    "small": dict(seeds=[0], search_steps=60, epochs=1, train_images=1000, test_images=500, mnist_epochs=12),
}


def subset(split, n: int | None, seed: int = 0):
    """A class-balanced-enough random subset of a split (same images for every row)."""
    if n is None or n >= len(split):
        return split
    from torch.utils.data import Subset

    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return Subset(split, idx)


def train_mnist_vit(data, epochs: int, device: torch.device, seed: int = 0) -> nn.Module:
    """A 4-block ViT on 28x28 grey digits, LayerNorm eps 1e-5 (timm's default is 1e-6), trained with CE."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1,
                              embed_dim=96, depth=4, num_heads=4, mlp_ratio=2.0, num_classes=10,
                              norm_layer=partial(nn.LayerNorm, eps=1e-5))
    set_data_config(model, input_size=(1, 28, 28), mean=(0.1307,), std=(0.3081,), interpolation="bilinear",
                    crop_pct=1.0)
    data.train.transform = build_transform(data_config(model), is_training=False)
    loader = make_loader(data.train, 64, shuffle=True, workers=0, drop_last=True, seed=seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * len(loader))
    for _ in range(epochs):
        for images, targets, _ in loader:
            loss = nn.functional.cross_entropy(model(images.to(device)), targets.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def post_train(student: nn.Module, teacher: nn.Module, train, epochs: int, device: torch.device, seed: int,
               objective: str = "kd", hflip: float | None = None) -> nn.Module:
    """The uvc preset's post-training (kd: T 4, weight 0.9; or UVC's official loss), AdamW + cosine."""
    preset = load_preset("uvc")
    torch.manual_seed(seed)
    student = copy.deepcopy(student).to(device).train()
    train.transform = build_transform(data_config(teacher), is_training=True, scale=tuple(preset["aug_scale"]),
                                      hflip=float(preset["aug_hflip"]) if hflip is None else hflip, color_jitter=0.0)
    loader = make_loader(train, int(preset["batch_size"]), shuffle=True, workers=0, drop_last=True, seed=seed)
    steps = max(1, epochs * len(loader))
    opt = torch.optim.AdamW(student.parameters(), lr=float(preset["lr"]), weight_decay=float(preset["weight_decay"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    official = OfficialLoss(int(teacher.num_classes)) if objective == "official" else None
    teacher = teacher.to(device).eval()
    for _ in range(epochs):
        for images, targets, _ in loader:
            images, targets = images.to(device), targets.to(device)
            if official is not None:
                images, soft = official.mix(images, targets)
            with torch.no_grad():
                t_logits = teacher(images)
            s_logits = student(images)
            if official is not None:
                loss = official(s_logits, t_logits, soft)["loss"]
            else:
                loss = losses.kd_loss(s_logits, t_logits, targets, kd_weight=float(preset["kd_weight"]),
                                      temperature=float(preset["temperature"]))["loss"]
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(student.parameters(), float(preset["clip_grad"]))
            opt.step()
            sched.step()
    return student.eval()


def search_rows(teacher, data, args, scale, seed, device):
    """(name, student, extra) for every pruning choice at the target."""
    preset = load_preset("uvc")
    search_split = subset(data.train, scale["train_images"], seed)
    data.train.transform = build_transform(data_config(teacher), is_training=False)
    loader = make_loader(search_split, int(preset["search_batch_size"]), shuffle=True, workers=0, drop_last=True,
                         seed=seed)
    for objective in ("official", "kd"):
        overrides = {"search_objective": objective}
        if scale["search_steps"]:
            overrides["search_steps"] = scale["search_steps"]
        config = uvc_config({**preset, **overrides}, args.target)
        torch.manual_seed(seed)
        start = time.time()
        result = search_uvc(teacher, loader, config, device=device)
        extra = {"search_resource": result.search_resource, "adjusted": result.adjusted,
                 "search_seconds": time.time() - start,
                 "resource_trace": [round(h["resource"], 4) for h in result.history][::5],
                 "z_trace": [round(h["z"], 3) for h in result.history][::5]}
        for restore in (True, False):
            name = f"search {objective}, restore {'on' if restore else 'off'}"
            yield name, sliced_student(teacher, result, restore=restore), {**extra, "restore_kept": restore}, "kd"
        if objective == "official":
            yield ("search official, restore on, official post-train", sliced_student(teacher, result, restore=True),
                   {**extra, "restore_kept": True}, "official")
    yield "magnitude one-shot", slice_vit(teacher, magnitude_plan(teacher, args.target)), {}, "kd"
    depth = len(teacher.blocks)
    keep = kept_blocks(depth, max(1, depth // 2))
    yield "depth-halved", drop_blocks(teacher, [i for i in range(depth) if i not in keep]), {"kept": keep}, "kd"


def load_models(args, scale, device):
    """(name, teacher, data) for the benchmark's models."""
    for name in args.models.split(","):
        if name == "bundled":
            data = resolve_data()
            yield name, load_model(str(BUNDLED_TEACHER)).to(device).eval(), data
        elif name == "mnist":
            data = resolve_data(MNIST / "train_5k.tar", MNIST / "test.tar", in_chans=1)
            yield name, train_mnist_vit(data, scale["mnist_epochs"], device), data
        else:
            raise SystemExit(f"--models: unknown model {name!r} (bundled, mnist)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="small")
    parser.add_argument("--models", default="bundled,mnist")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the scale's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default="benchmarks/results/uvc_choices.json", help="JSON written after every row")
    args = parser.parse_args(argv)
    scale = dict(SCALES[args.scale])
    if args.seeds:
        scale["seeds"] = [int(s) for s in args.seeds.split(",")]
    device = torch.device(args.device)
    torch.set_num_threads(1 if device.type == "cpu" else torch.get_num_threads())
    record: dict[str, Any] = {
        "command": " ".join([sys.executable, *sys.argv]), "scale": args.scale, "settings": scale,
        "target": args.target,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if device.type == "cuda" else None},
        "models": {}, "rows": [],
    }
    for model_name, teacher, data in load_models(args, scale, device):
        test = subset(data.val, scale["test_images"])
        data.val.transform = build_transform(data_config(teacher), is_training=False)
        teacher_macs = count_flops(teacher).macs
        record["models"][model_name] = {
            "teacher_top1": evaluate_loader(teacher, make_loader(test, 256, workers=0), device=device).top1,
            "teacher_macs": teacher_macs, "test_images": len(test)}
        for seed in scale["seeds"]:
            for name, student, extra, post in search_rows(teacher, data, args, scale, seed, device):
                student = student.to(device).eval()
                data.val.transform = build_transform(data_config(student), is_training=False)
                before = evaluate_loader(student, make_loader(test, 256, workers=0), device=device).top1
                trained = post_train(student, teacher, subset(data.train, scale["train_images"], seed),
                                     scale["epochs"], device, seed, objective=post,
                                     hflip=0.0 if model_name == "mnist" else None)  # digits are not mirror-symmetric
                data.val.transform = build_transform(data_config(student), is_training=False)
                after = evaluate_loader(trained, make_loader(test, 256, workers=0), device=device).top1
                row = {"model": model_name, "seed": seed, "name": name, "post_train": post,
                       "flops_ratio": count_flops(student).macs / teacher_macs, "top1_before": before,
                       "top1_after": after, **extra}
                record["rows"].append(row)
                print(f"{model_name:8s} seed {seed} {name:48s} R {row['flops_ratio']:.3f}  top-1 before "
                      f"{before:.4f}  after {after:.4f}", flush=True)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
