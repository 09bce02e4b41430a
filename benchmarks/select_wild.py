"""select-wild + probe distillation, closer to the paper (issue 5): does the attention probe pick useful images?

1. A ViT teacher is trained (plain CE loop) on 5 CIFAR-10 classes of cifar10/train.tar.
2. Pool = other cifar10/train.tar images of all 10 classes + MNIST digits (read as RGB), unlabelled.
3. select-wild picks --num images with each criterion; precision = share from the teacher's 5 classes.
4. Throughput: select-wild (decode + teacher + probe hooks + scores.csv) vs the teacher's plain inference
   over the same images with the same loader (decode + forward), and the model-only ratio (hooks vs none).
5. Students (derived by the engine from the teacher) trained with ``probe`` on (a) the selected images,
   (b) a random pool subset of the same size (pseudo-labelled by the teacher the same way), and with
   ``vanilla`` on (c) the teacher's labelled training images; top-1 on those 5 classes of cifar10/test.tar.

    .venv/bin/python benchmarks/select_wild.py --train-per-class 500 --pool-cifar 2000 --pool-mnist 2000 \
        --num 1000 --json benchmarks/results/select_wild.json

Sizes are knobs; the paper-like setting is --pool-cifar 45000 (the rest of train.tar) --pool-mnist 10000.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import random
import shutil
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vitshrink.attention_probe import ClassTokenAttention, check_probeable  # noqa: E402
from vitshrink.data import build_transform  # noqa: E402
from vitshrink.engine import distill  # noqa: E402
from vitshrink.loading import create_model, data_config, save_model, set_data_config  # noqa: E402
from vitshrink.wild import CRITERIA, _collate, _PoolImages, score_batch, select_wild  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
CIFAR_TRAIN, CIFAR_TEST, MNIST_TEST = DATA / "cifar10" / "train.tar", DATA / "cifar10" / "test.tar", \
    DATA / "mnist" / "test.tar"
TEACHER_CLASSES = ("airplane", "automobile", "bird", "cat", "deer")
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def extract(tar_path: Path, out: Path, pick) -> int:
    """Write the members ``pick(class, index_in_class)`` accepts to ``out/<class>/<name>``."""
    seen: dict[str, int] = {}
    written = 0
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            cls, name = member.name.split("/")[0], os.path.basename(member.name)
            index = seen.get(cls, 0)
            seen[cls] = index + 1
            target = pick(cls, index)
            if target is None:
                continue
            path = out / target / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(tar.extractfile(member).read())
            written += 1
    return written


def load_folder(root: Path, classes: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for label, cls in enumerate(classes):
        for path in sorted((root / cls).iterdir()):
            xs.append(torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0))
            ys.append(label)
    x = torch.stack(xs).permute(0, 3, 1, 2)
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (x - mean) / std, torch.tensor(ys)


def train_teacher(train_dir: Path, test_dir: Path, args) -> tuple[torch.nn.Module, float]:
    torch.manual_seed(args.seed)
    x, y = load_folder(train_dir, TEACHER_CLASSES)
    xt, yt = load_folder(test_dir, TEACHER_CLASSES)
    model = create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=args.teacher_width,
                         depth=args.teacher_depth, num_heads=3, num_classes=len(TEACHER_CLASSES))
    set_data_config(model, mean=CIFAR_MEAN, std=CIFAR_STD)
    batch = 128
    steps = args.teacher_epochs * max(1, len(x) // batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.teacher_lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.teacher_lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(args.teacher_epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x) - batch + 1, batch):
            xb = x[order[start:start + batch]]
            # random crop (pad 4) + flip, as the official teacher/student training
            xb = F.pad(xb, (4, 4, 4, 4), mode="reflect")
            i, j = random.randint(0, 8), random.randint(0, 8)
            xb = xb[:, :, i:i + 32, j:j + 32]
            if random.random() < 0.5:
                xb = xb.flip(3)
            loss = F.cross_entropy(model(xb), y[order[start:start + batch]])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        top1 = float((model(xt).argmax(1) == yt).float().mean())
    return model, top1


def precision(scores_csv: Path) -> float:
    with scores_csv.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["selected"] == "1"]
    return sum(r["path"].split("/")[1] in TEACHER_CLASSES and r["path"].startswith("cifar/") for r in rows) / len(rows)


def place_random(pool: Path, scores_csv: Path, out: Path, n: int, seed: int) -> None:
    """A random pool subset of n images in OUT/<teacher's predicted class>/, like select-wild's layout."""
    with scores_csv.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if not r["skipped"]]
    for row in random.Random(seed).sample(rows, n):
        target = out / row["pred_name"] / row["path"].replace("/", "__")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(pool / row["path"], target)


def labelled(train_dir: Path, val_dir: Path):
    """Train on ``train_dir``, validate on the teacher's classes of test.tar. A selection may miss a class,
    which shifts its folder indices; only ``vanilla`` reads training labels, and its folder has all five."""
    from vitshrink.data import ImageSplit, LabelledData, _open_reader

    return LabelledData(ImageSplit(_open_reader(train_dir)), ImageSplit(_open_reader(val_dir)),
                        list(TEACHER_CLASSES), f"{train_dir} (validation: {val_dir})")


def throughput(teacher, pool: Path, out: Path, args) -> dict:
    """Images/s of select-wild and of plain teacher inference over the same pool and loader settings."""
    cfg = data_config(teacher)
    transform = build_transform(cfg, is_training=False)
    loader_kwargs = dict(batch_size=args.batch_size, num_workers=args.workers, collate_fn=_collate)

    def plain() -> tuple[float, int]:
        loader = torch.utils.data.DataLoader(_PoolImages(pool, set(), transform, "RGB", None), **loader_kwargs)
        n, start = 0, time.perf_counter()
        with torch.inference_mode():
            for _, images, _ in loader:
                if images is not None:
                    teacher(images)
                    n += len(images)
        return n / (time.perf_counter() - start), n

    def wild() -> tuple[float, int]:
        target = out / "throughput_run"
        shutil.rmtree(target, ignore_errors=True)
        start = time.perf_counter()
        summary = select_wild(teacher, pool, target, num=1, mode="list", batch_size=args.batch_size,
                              workers=args.workers, progress=False)
        return summary.scored / (time.perf_counter() - start), summary.scored

    plain_runs, wild_runs = [], []
    for _ in range(args.repeats):  # interleaved, best of each: the machine is shared
        plain_runs.append(plain())
        wild_runs.append(wild())
    plain_ips, n = max(plain_runs)
    wild_ips, _ = max(wild_runs)
    # Model only (decoded batches in memory): forward with the probe hooks + all scores vs a plain forward.
    batches = [b for _, b, _ in torch.utils.data.DataLoader(
        _PoolImages(pool, set(), transform, "RGB", None), **loader_kwargs) if b is not None][: args.model_batches]
    blocks = check_probeable(teacher)

    def timed(fn) -> float:
        start = time.perf_counter()
        for b in batches:
            fn(b)
        return sum(len(b) for b in batches) / (time.perf_counter() - start)

    with torch.inference_mode():
        model_plain = max(timed(teacher) for _ in range(args.repeats))
        with ClassTokenAttention(teacher, blocks) as probe:
            model_wild = max(timed(lambda b: score_batch(teacher, b, probe)) for _ in range(args.repeats))
    return {"images": n, "plain_inference_ips": plain_ips, "select_wild_ips": wild_ips,
            "ratio_end_to_end": wild_ips / plain_ips, "model_only_plain_ips": model_plain,
            "model_only_probe_ips": model_wild, "ratio_model_only": model_wild / model_plain,
            "batch_size": args.batch_size, "workers": args.workers, "threads": args.threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("output/bench_select_wild"))
    parser.add_argument("--train-per-class", type=int, default=500, help="teacher images per class (train.tar)")
    parser.add_argument("--pool-cifar", type=int, default=2000, help="pool images from train.tar (after the "
                        "teacher's), spread over 10 classes")
    parser.add_argument("--pool-mnist", type=int, default=2000)
    parser.add_argument("--test-per-class", type=int, default=1000, help="test.tar images per teacher class")
    parser.add_argument("--num", type=int, default=1000, help="images to select")
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--teacher-width", type=int, default=96)
    parser.add_argument("--teacher-depth", type=int, default=6)
    parser.add_argument("--teacher-lr", type=float, default=2e-3)
    parser.add_argument("--student-epochs", type=int, default=10)
    parser.add_argument("--student-init", choices=("teacher", "random"), default="teacher")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: best on a shared CPU)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model-batches", type=int, default=8)
    parser.add_argument("--skip-students", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()

    per_class_pool = args.pool_cifar // 10
    extract(CIFAR_TRAIN, work / "teacher_data",
            lambda c, i: c if c in TEACHER_CLASSES and i < args.train_per_class else None)
    extract(CIFAR_TEST, work / "test5", lambda c, i: c if c in TEACHER_CLASSES and i < args.test_per_class else None)
    pool = work / "pool"
    extract(CIFAR_TRAIN, pool / "cifar",
            lambda c, i: c if args.train_per_class <= i < args.train_per_class + per_class_pool else None)
    extract(MNIST_TEST, pool / "mnist", lambda c, i: c if i < args.pool_mnist // 10 else None)

    teacher, teacher_top1 = train_teacher(work / "teacher_data", work / "test5", args)
    save_model(teacher, work / "teacher.safetensors", class_names=list(TEACHER_CLASSES))
    teacher.vitshrink_meta = {"class_names": list(TEACHER_CLASSES)}
    print(f"teacher top-1 on {len(TEACHER_CLASSES)} classes of test.tar: {teacher_top1:.4f}", flush=True)

    n_pool = sum(1 for _ in pool.rglob("*.*"))
    share = 5 * per_class_pool / n_pool
    results: dict = {"teacher_top1": teacher_top1, "pool_images": n_pool, "random_precision_expected": share,
                     "precision": {}, "selected": args.num}
    for criterion in CRITERIA:
        out = work / f"select_{criterion}"
        select_wild(teacher, pool, out, num=args.num, mode="copy", criterion=criterion,
                    batch_size=args.batch_size, workers=args.workers, progress=False)
        results["precision"][criterion] = precision(out / "scores.csv")
        print(f"precision {criterion}: {results['precision'][criterion]:.4f} (random: {share:.4f})", flush=True)

    results["throughput"] = throughput(teacher, pool, work, args)
    print("throughput", json.dumps(results["throughput"]), flush=True)

    if not args.skip_students:
        random_dir = work / "random_subset"
        place_random(pool, work / "select_combined" / "scores.csv", random_dir, args.num, args.seed)
        overrides = {"init_from_teacher": args.student_init == "teacher"}
        runs = {"probe_selected": ("probe", work / "select_combined"),
                "probe_random": ("probe", random_dir),
                "vanilla_labelled": ("vanilla", work / "teacher_data")}
        results["students"] = {}
        for name, (recipe, data) in runs.items():
            result = distill(teacher, recipe, data=labelled(data, work / "test5"), out_dir=work / f"run_{name}",
                             epochs=args.student_epochs, overrides=overrides, seed=args.seed, progress=False)
            results["students"][name] = {"top1": result.report["student"]["top1"], "recipe": recipe,
                                          "train_images": sum(1 for p in data.rglob("*") if p.is_file()
                                                              and p.suffix.lower() in (".jpg", ".png"))}
            print(f"student {name}: top-1 {result.report['student']['top1']:.4f}", flush=True)

    results.update({
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seconds": time.perf_counter() - started,
    })
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
