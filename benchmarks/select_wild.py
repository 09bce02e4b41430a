"""select-wild + probe distillation, closer to the paper (issue 5): does the attention probe pick useful images?

1. A 5-class ViT teacher (airplane, automobile, bird, cat, deer). ``--teacher-source bundled`` (default): the
   bundled CIFAR-10 ViT (6 blocks, 192 wide, patch 4) with its head cut to those 5 classes' rows, then
   fine-tuned with CE on those 5 classes' images of cifar10/train.tar only. CAVEAT: the bundled teacher was
   trained on all 50k train.tar images of all 10 classes, so its features know the other 5 classes; this
   teacher is "trained on 5 classes" only in its head and its last fine-tune. That is why its pool is taken
   from cifar10/test.tar (images it never saw), not train.tar. ``--teacher-source scratch``: the strict
   setting, a ViT trained from scratch on the 5 classes only (weak on a CPU budget); pool from train.tar.
2. Pool, unlabelled: CIFAR-10 images of all 10 classes (disjoint from the teacher's training images and from
   the test images the students are scored on) + MNIST test digits (read as RGB).
3. select-wild picks N images with each criterion, globally (the paper) and class-balanced (``balanced``:
   the best N/C of each predicted class first); precision = share from the teacher's 5 classes.
4. Throughput: select-wild (decode + teacher + probe hooks + scores.csv) vs the teacher's plain inference
   over the same images with the same loader (decode + forward), and the model-only ratio (hooks vs none).
5. Students (derived by the engine from the teacher: half its depth, initialised from it or not) trained for
   the same epochs on the same number N of images: ``probe`` on (a) each selection, (b) a random pool
   subset (pseudo-labelled by the teacher the same way), and ``vanilla`` on (c) N labelled images of the
   teacher's training data; top-1 on the teacher's 5 classes of cifar10/test.tar (held-out part).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/select_wild.py --num 1000 2500 \
        --json benchmarks/results/select_wild_cpu.json

The JSON is rewritten after every student run, so a stopped run keeps what it measured.
"""
from __future__ import annotations

import argparse
import csv
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

from vitshrink.distill.attention_probe import ClassTokenAttention, check_probeable  # noqa: E402
from vitshrink.data import build_transform  # noqa: E402
from vitshrink.pipeline import distill, load_bundled_teacher  # noqa: E402
from vitshrink.io import create_model, data_config, record_of, save_model, set_data_config  # noqa: E402
from vitshrink.data.wild import CRITERIA, _collate, _PoolImages, score_batch, select_wild  # noqa: E402

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


def load_folder(root: Path, classes: tuple[str, ...], model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of ``root/<class>/`` as one tensor, normalised the way ``model`` expects."""
    xs, ys = [], []
    for label, cls in enumerate(classes):
        for path in sorted((root / cls).iterdir()):
            xs.append(torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0))
            ys.append(label)
    cfg = data_config(model)
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return (torch.stack(xs).permute(0, 3, 1, 2) - mean) / std, torch.tensor(ys)


def top1_on(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return float((pred == y).float().mean())


def fit_ce(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float) -> None:
    """Plain CE training with random crop (pad 4) + flip, as the official teacher/student training."""
    batch = 128
    steps = max(1, epochs * max(1, len(x) // batch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x) - batch + 1, batch):
            xb = F.pad(x[order[start:start + batch]], (4, 4, 4, 4), mode="reflect")
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


def make_teacher(train_dir: Path, test_dir: Path, args) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(args.seed)
    info: dict = {"source": args.teacher_source, "classes": list(TEACHER_CLASSES)}
    if args.teacher_source == "bundled":
        base = load_bundled_teacher()
        names = list(record_of(base).class_names)
        rows = [names.index(c) for c in TEACHER_CLASSES]
        model = create_model(record_of(base).name, **(record_of(base).kwargs | {"num_classes": 5}))
        cfg = data_config(base)
        set_data_config(model, mean=cfg["mean"], std=cfg["std"])
        state = base.state_dict()
        state["head.weight"], state["head.bias"] = state["head.weight"][rows], state["head.bias"][rows]
        model.load_state_dict(state)
        x, y = load_folder(train_dir, TEACHER_CLASSES, model)
        xt, yt = load_folder(test_dir, TEACHER_CLASSES, model)
        info["top1_head_cut_only"] = top1_on(model, xt, yt)
        start = time.perf_counter()
        fit_ce(model, x, y, args.teacher_epochs, args.teacher_lr)
        info["note"] = ("bundled CIFAR-10 ViT (trained on all 50k train.tar images, 10 classes) with its head cut "
                        "to the 5 classes' rows, then CE fine-tuned on the 5 classes' train.tar images only: its "
                        "features have seen the other 5 classes (knowledge leak); the pool therefore comes from "
                        "test.tar images it never saw")
    else:
        model = create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=args.teacher_width,
                             depth=args.teacher_depth, num_heads=3, num_classes=len(TEACHER_CLASSES))
        set_data_config(model, mean=CIFAR_MEAN, std=CIFAR_STD)
        x, y = load_folder(train_dir, TEACHER_CLASSES, model)
        xt, yt = load_folder(test_dir, TEACHER_CLASSES, model)
        start = time.perf_counter()
        fit_ce(model, x, y, args.teacher_epochs, args.teacher_lr)
        info["note"] = "trained from scratch on the 5 classes' train.tar images only (strict setting)"
    info.update(train_seconds=time.perf_counter() - start, train_images=len(x), epochs=args.teacher_epochs,
                lr=args.teacher_lr, top1=top1_on(model, xt, yt), test_images=len(xt),
                arch={"name": record_of(model).name, "kwargs": record_of(model).kwargs})
    return model, info


def precision(scores_csv: Path) -> tuple[float, dict[str, int]]:
    """Share of selected images from the teacher's classes, and the selection's true-source histogram."""
    with scores_csv.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["selected"] == "1"]
    sources: dict[str, int] = {}
    for r in rows:
        source = "mnist" if r["path"].startswith("mnist/") else r["path"].split("/")[1]
        sources[source] = sources.get(source, 0) + 1
    return sum(sources.get(c, 0) for c in TEACHER_CLASSES) / len(rows), dict(sorted(sources.items()))


def place_random(pool: Path, scores_csv: Path, out: Path, n: int, seed: int) -> float:
    """A random pool subset of n images in OUT/<teacher's predicted class>/, like select-wild's layout."""
    with scores_csv.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if not r["skipped"]]
    picked = random.Random(seed).sample(rows, n)
    for row in picked:
        target = out / row["pred_name"] / row["path"].replace("/", "__")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(pool / row["path"], target)
    return sum(r["path"].startswith("cifar/") and r["path"].split("/")[1] in TEACHER_CLASSES for r in picked) / n


def labelled_subset(source: Path, out: Path, n: int) -> Path:
    """The first n / 5 labelled training images of each teacher class."""
    for cls in TEACHER_CLASSES:
        (out / cls).mkdir(parents=True, exist_ok=True)
        for path in sorted((source / cls).iterdir())[: n // len(TEACHER_CLASSES)]:
            shutil.copy2(path, out / cls / path.name)
    return out


def labelled(train_dir: Path, val_dir: Path):
    """Train on ``train_dir``, validate on the teacher's classes of test.tar. A selection may miss a class,
    which shifts its folder indices; only ``vanilla`` reads training labels, and its folder has all five."""
    from vitshrink.data.folders import ImageSplit, LabelledData, _open_reader

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
            "batch_size": args.batch_size, "workers": args.workers, "threads": args.threads,
            "goal": "select_wild_ips >= 0.8 x plain_inference_ips"}


def print_table(results: dict) -> None:
    t = results["teacher"]
    print(f"\nteacher ({t['source']}): top-1 {t['top1']:.4f} on {t['test_images']} test images of 5 classes"
          + (f" (head cut only, before fine-tune: {t['top1_head_cut_only']:.4f})" if "top1_head_cut_only" in t else ""))
    print(f"pool: {results['pool_images']} images, in-distribution share {results['random_precision_expected']:.3f}")
    print(f"{'N':>6} {'selection':<22} {'precision':>9}  class histogram (predicted)")
    for n, sel in results["selections"].items():
        for name, entry in sel.items():
            print(f"{n:>6} {name:<22} {entry['precision']:>9.3f}  {entry.get('class_histogram', '')}")
    if "throughput" in results:
        tp = results["throughput"]
        print(f"throughput: select-wild {tp['select_wild_ips']:.0f} img/s vs plain inference "
              f"{tp['plain_inference_ips']:.0f} img/s = {tp['ratio_end_to_end']:.2f}x (model only "
              f"{tp['ratio_model_only']:.2f}x; goal >= 0.8x)")
    print(f"\n{'N':>6} {'init':<8} {'epochs':>6} {'student data':<24} {'recipe':<8} {'in-dist':>7} {'top-1':>7}")
    for run in results["students"]:
        print(f"{run['num']:>6} {run['init']:<8} {run['epochs']:>6} {run['data']:<24} {run['recipe']:<8} "
              f"{run['in_distribution_share']:>7.3f} {run['top1']:>7.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("output/bench_select_wild"))
    parser.add_argument("--teacher-source", choices=("bundled", "scratch"), default="bundled")
    parser.add_argument("--train-per-class", type=int, default=1000, help="teacher images per class (train.tar)")
    parser.add_argument("--teacher-epochs", type=int, default=1)
    parser.add_argument("--teacher-lr", type=float, default=1e-4)
    parser.add_argument("--teacher-width", type=int, default=96, help="scratch teacher only")
    parser.add_argument("--teacher-depth", type=int, default=6, help="scratch teacher only")
    parser.add_argument("--test-per-class", type=int, default=500, help="test.tar images per teacher class to "
                        "score students on (the first ones of each class)")
    parser.add_argument("--pool-per-class", type=int, default=500, help="CIFAR-10 pool images per class (10 "
                        "classes); bundled teacher: test.tar images after the first --test-per-class; scratch: "
                        "train.tar images after the first --train-per-class")
    parser.add_argument("--pool-mnist", type=int, default=2500)
    parser.add_argument("--num", type=int, nargs="+", default=[1000], help="images to select (one or more N)")
    parser.add_argument("--selections", nargs="+", default=["combined", "combined_balanced"],
                        help="selections students are trained on: CRITERION or CRITERION_balanced")
    parser.add_argument("--student-epochs", type=int, default=5)
    parser.add_argument("--student-init", nargs="+", choices=("teacher", "random"), default=["teacher"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: best on a shared CPU)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model-batches", type=int, default=8)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-students", action="store_true")
    parser.add_argument("--skip-labelled", action="store_true", help="no (c) vanilla-on-labelled student")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()
    results: dict = {
        "command": " ".join(["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "unset"),
                             ".venv/bin/python", *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": "CPU: 2 cores, shared",
        "platform": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                     "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }

    def save() -> None:
        results["seconds"] = time.perf_counter() - started
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))

    extract(CIFAR_TRAIN, work / "teacher_data",
            lambda c, i: c if c in TEACHER_CLASSES and i < args.train_per_class else None)
    extract(CIFAR_TEST, work / "test5", lambda c, i: c if c in TEACHER_CLASSES and i < args.test_per_class else None)
    pool = work / "pool"
    if args.teacher_source == "bundled":  # images the bundled teacher never saw, none of them a student test image
        first = args.test_per_class
        extract(CIFAR_TEST, pool / "cifar", lambda c, i: c if first <= i < first + args.pool_per_class else None)
    else:
        first = args.train_per_class
        extract(CIFAR_TRAIN, pool / "cifar", lambda c, i: c if first <= i < first + args.pool_per_class else None)
    extract(MNIST_TEST, pool / "mnist", lambda c, i: c if i < args.pool_mnist // 10 else None)

    teacher, results["teacher"] = make_teacher(work / "teacher_data", work / "test5", args)
    save_model(teacher, work / "teacher.safetensors", class_names=list(TEACHER_CLASSES))
    record_of(teacher).class_names = list(TEACHER_CLASSES)
    print(f"teacher: {json.dumps(results['teacher'])}", flush=True)

    n_pool = sum(1 for p in pool.rglob("*") if p.is_file())
    n_in = sum(1 for c in TEACHER_CLASSES for p in (pool / "cifar" / c).iterdir())
    results.update(pool_images=n_pool, pool_in_distribution=n_in, random_precision_expected=n_in / n_pool,
                   selections={}, students=[])
    save()
    # Score once per criterion dir; every further N / balancing re-ranks the same scores.csv (resume).
    for n in args.num:
        results["selections"][n] = {}
        for criterion in CRITERIA:
            for balanced in (False, True):
                name = criterion + ("_balanced" if balanced else "")
                out = work / f"select_{criterion}"
                if not out.exists() and (work / "select_combined" / "scores.csv").exists():
                    out.mkdir()  # same scores: select_wild resumes from them and only re-ranks
                    shutil.copy2(work / "select_combined" / "scores.csv", out / "scores.csv")
                summary = select_wild(teacher, pool, out, num=n, mode="copy", criterion=criterion,
                                      balanced=balanced, batch_size=args.batch_size, workers=args.workers,
                                      progress=False)
                prec, sources = precision(out / "scores.csv")
                results["selections"][n][name] = {"precision": prec, "class_histogram": summary.class_histogram,
                                                  "true_sources": sources}
                if name in args.selections:  # keep a copy of the selected ImageFolder for the students
                    shutil.copytree(out, work / f"data_{name}_{n}",
                                    ignore=shutil.ignore_patterns("scores.csv", "selection.json"))
                print(f"N={n} precision {name}: {prec:.4f} (random: {n_in / n_pool:.4f}) "
                      f"{summary.class_histogram}", flush=True)
    save()

    if not args.skip_throughput:
        results["throughput"] = throughput(teacher, pool, work, args)
        print("throughput", json.dumps(results["throughput"]), flush=True)
        save()

    if not args.skip_students:
        for init in args.student_init:
            overrides = {"init_from_teacher": init == "teacher", "bench_batch_sizes": [1]}
            for n in args.num:
                random_dir = work / f"data_random_{n}"
                random_share = place_random(pool, work / "select_combined" / "scores.csv", random_dir, n, args.seed)
                runs = [(f"{name}", "probe", work / f"data_{name}_{n}",
                         results["selections"][n][name]["precision"]) for name in args.selections]
                runs.append(("random", "probe", random_dir, random_share))
                if not args.skip_labelled:
                    runs.append(("labelled", "vanilla",
                                 labelled_subset(work / "teacher_data", work / f"data_labelled_{n}", n), 1.0))
                for name, recipe, data, share in runs:
                    start = time.perf_counter()
                    result = distill(teacher, recipe, data=labelled(data, work / "test5"),
                                     out_dir=work / f"run_{init}_{n}_{name}", epochs=args.student_epochs,
                                     overrides=overrides, seed=args.seed, progress=False)
                    run = {"num": n, "init": init, "epochs": args.student_epochs, "data": name, "recipe": recipe,
                           "in_distribution_share": share, "top1": result.report["student"]["top1"],
                           "train_images": sum(1 for p in data.rglob("*") if p.is_file()),
                           "seconds": time.perf_counter() - start}
                    results["students"].append(run)
                    print(f"student {json.dumps(run)}", flush=True)
                    save()
    save()
    print_table(results)


if __name__ == "__main__":
    main()
