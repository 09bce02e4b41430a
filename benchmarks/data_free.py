"""Data-free distillation on CIFAR-10 (issue 10): does synthesis close the gap between noise and real images?

For each teacher, the same student, the same number of training images, the same epochs and seed are trained with
``vanilla`` KD on three image sets, and evaluated on ``cifar10/test.tar``:

* ``synth``: ``vitshrink.data.synthetic.synthesize`` from the teacher alone (labels = synthesis targets);
* ``noise``: Gaussian-noise images (the synthesis starting point, N(0, 1) in the teacher's normalised space,
  clipped to valid pixels; labels = the teacher's top-1);
* ``real``: the first N/10 images of each class of ``cifar10/train.tar``.

Teachers: the bundled ViT (patch-similarity prior) -> its derived half-depth student (the preset's student), and
the shared ResNet-56 (BatchNorm prior) -> a randomly initialised CIFAR ResNet-20. The vanilla preset initialises
the derived ViT student from the teacher's weights, which already carries the teacher's knowledge whatever the
images; ``--set init_from_teacher=false`` measures the images alone. The figure of merit is the share
of the noise-to-real gap that synthesis closes: (synth - noise) / (real - noise).

    python benchmarks/data_free.py [--teachers vit,resnet56] [--scale 1.0] [--iterations 500] [--epochs 10]
        [--device auto] [--val-data ../shared/data/cifar10/test.tar] [--set KEY=VALUE] [--out output/data_free.json]

``--scale`` multiplies the number of images per set (1.0 = 1,000 images, 100 per class). Run folders (synthesised
images, noise images, distillation runs) go under ``--work`` (default: next to ``--out``).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vitshrink.models  # noqa: E402,F401  (registers the CIFAR ResNets)
from vitshrink.data.folders import ImageSplit, reader_targets, resolve_data  # noqa: E402
from vitshrink.data.synthetic import class_folder_names, synthesize  # noqa: E402
from vitshrink.pipeline import BUNDLED_TEACHER, distill  # noqa: E402
from vitshrink.io import create_model, data_config, load_model, record_of, set_data_config  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TEACHERS = {
    "vit": {"spec": str(BUNDLED_TEACHER), "arch": None, "student": "derived half-depth ViT (preset)"},
    "resnet56": {"spec": str(SHARED / "checkpoints" / "cifar10_resnet56_akamaster.th"), "arch": "cifar_resnet56",
                 "student": "cifar_resnet20 (random init)"},
}


def load_teacher(name: str) -> torch.nn.Module:
    entry = TEACHERS[name]
    teacher = load_model(entry["spec"], arch=entry["arch"])
    record = record_of(teacher)
    if not record.class_names:
        record.class_names = list(CIFAR_CLASSES)  # the .th checkpoint carries no class names
    return teacher


def make_student(name: str, teacher: torch.nn.Module, seed: int) -> torch.nn.Module | None:
    """None: the preset's derived student. Otherwise a fresh, identically seeded module."""
    if name == "vit":
        return None
    torch.manual_seed(seed)
    student = create_model("cifar_resnet20", num_classes=10)
    cfg = data_config(teacher)
    set_data_config(student, input_size=cfg["input_size"], mean=cfg["mean"], std=cfg["std"])
    return student


def write_noise_images(teacher: torch.nn.Module, num: int, out_dir: Path, seed: int) -> Path:
    """``num`` Gaussian-noise PNGs filed under the teacher's top-1 class (skipped when already written)."""
    from PIL import Image

    if (out_dir / "done").exists():
        return out_dir
    cfg = data_config(teacher)
    mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    generator = torch.Generator().manual_seed(seed)
    names = class_folder_names(teacher, 10)
    teacher = teacher.eval().cpu()
    for first in range(0, num, 256):
        count = min(256, num - first)
        images = (torch.randn((count, *cfg["input_size"]), generator=generator) * std + mean).clamp(0, 1)
        pixels = (images * 255).round().to(torch.uint8)
        with torch.no_grad():
            top1 = teacher((pixels.float() / 255 - mean) / std).argmax(1).tolist()
        for offset, array in enumerate(pixels.permute(0, 2, 3, 1).numpy()):
            path = out_dir / names[top1[offset]] / f"{first + offset:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)
    (out_dir / "done").write_text("")
    return out_dir


def real_subset(train: Path, val: Path, num: int):
    """The first num/10 images of each class of ``train`` (balanced), validated on ``val``."""
    data = resolve_data(train, val_data=val)
    targets = reader_targets(data.train.reader)
    per_class = max(1, num // 10)
    seen: dict[int, int] = {}
    keep = []
    for index, target in enumerate(targets):
        if seen.get(target, 0) < per_class:
            seen[target] = seen.get(target, 0) + 1
            keep.append(index)
    data.train = ImageSplit(data.train.reader, keep, target_map=data.train.target_map)
    return data


def train_and_score(teacher_name: str, data, val: Path, work: Path, args) -> dict:
    teacher = load_teacher(teacher_name)
    student = make_student(teacher_name, teacher, args.seed)
    started = time.perf_counter()
    images = len(data.train)
    batch_size = args.batch_size or (None if images >= 256 else max(1, images // 2))  # tiny smoke runs
    result = distill(teacher, "vanilla", student=student, data=data, val_data=str(val), out_dir=work,
                     epochs=args.epochs, batch_size=batch_size, seed=args.seed, device=args.device,
                     workers=args.workers, overrides=args.overrides, progress=True)
    summary = list(csv.DictReader((result.out_dir / "summary.csv").open()))
    return {"best_top1": result.report["student"]["top1"], "final_epoch_top1": float(summary[-1]["eval_top1"]) / 100,
            "teacher_top1": result.report["teacher"]["top1"], "epochs": result.report["epochs"],
            "train_images": images, "batch_size": result.report.get("batch_size", batch_size),
            "wall_s": time.perf_counter() - started}


def run_teacher(name: str, args, work: Path) -> dict:
    num = max(10, int(round(1000 * args.scale)))
    teacher = load_teacher(name)
    synth_dir = work / name / "synth"
    synth = synthesize(teacher, num, synth_dir, iterations=args.iterations, batch_size=args.synth_batch_size,
                       device=args.device, seed=args.seed, progress=True, settings=args.settings)
    noise_dir = write_noise_images(load_teacher(name), num, work / name / "noise", args.seed)
    row = {"teacher": name, "student": TEACHERS[name]["student"], "images": num, "prior": synth.prior,
           "synth_settings": synth.settings.name,
           "synth_iterations": args.iterations, "synth_seconds": synth.seconds, "synth_images_per_s": synth.images_per_s,
           "synth_target_agreement": synth.target_agreement}
    sets = {"synth": resolve_data(synth_dir, val_data=args.val_data),
            "noise": resolve_data(noise_dir, val_data=args.val_data),
            "real": real_subset(args.real_data, args.val_data, num)}
    for label, data in sets.items():
        row[label] = train_and_score(name, data, args.val_data, work / name / f"distill_{label}", args)
    noise, real, synth_top1 = (row[k]["final_epoch_top1"] for k in ("noise", "real", "synth"))
    row["gap_closed"] = (synth_top1 - noise) / (real - noise) if real != noise else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", default="vit,resnet56")
    parser.add_argument("--scale", type=float, default=1.0, help="images per set = 1000 * scale (min 10)")
    parser.add_argument("--iterations", type=int, default=500, help="synthesis iterations per batch")
    parser.add_argument("--synth-batch-size", type=int, default=100)
    parser.add_argument("--settings", default="auto", help="synthesis settings set (vitshrink synthesize --settings)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("-b", "--batch-size", type=int, default=None, help="distillation batch (default: preset)")
    parser.add_argument("-j", "--workers", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resnet56", type=Path, default=None, help="ResNet-56 checkpoint (default: ../shared)")
    parser.add_argument("--real-data", type=Path, default=SHARED / "cifar10" / "train.tar")
    parser.add_argument("--val-data", type=Path, default=SHARED / "cifar10" / "test.tar")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a vanilla preset key for every run, e.g. init_from_teacher=false")
    parser.add_argument("--out", type=Path, default=Path("output/data_free.json"))
    parser.add_argument("--work", type=Path, default=None, help="run folders (default: OUT without .json)")
    args = parser.parse_args()
    args.overrides = {key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in args.set)}
    work = args.work or args.out.with_suffix("")
    if args.resnet56 is not None:
        TEACHERS["resnet56"]["spec"] = str(args.resnet56)
    rows = []
    for name in args.teachers.split(","):
        rows.append(run_teacher(name, args, work))
        write_output(args, rows)  # after each teacher, so a cut-off run keeps what it finished
    print(f"\n{'teacher':<10}{'prior':<11}{'img/s':>8}{'noise':>8}{'synth':>8}{'real':>8}{'gap closed':>12}")
    for r in rows:
        gap = f"{r['gap_closed']:.0%}" if r["gap_closed"] is not None else "n/a"
        print(f"{r['teacher']:<10}{r['prior']:<11}{r['synth_images_per_s'] or 0:>8.2f}"
              + "".join(f"{r[k]['final_epoch_top1']:>8.2%}" for k in ("noise", "synth", "real")) + f"{gap:>12}")


def write_output(args, rows: list[dict]) -> None:
    output = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()} {platform.processor() or ''} "
                         f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'}".strip(),
              "torch": torch.__version__, "argv": sys.argv[1:], "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(output, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
