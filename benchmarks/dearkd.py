"""DearKD beside DeiT (issue 10): the ResNet-56 teacher, the same ViT student and epochs, on the bundled 5k
CIFAR-10 images and on 10% of them (DearKD's claim is data efficiency), evaluated on ``--val-data``.

Both recipes distil from the same CNN, which for ``dearkd`` is also the CNN teacher of the early-feature stage
(no ``--cnn-teacher``: the TEACHER stands in). The student is a ViT from scratch (a CNN shares no weights).

    python benchmarks/dearkd.py [--device auto] [--data-dir ../shared/data] [--resnet56 PATH] [--val-data PATH]
        [--epochs 30] [--seeds 0,1] [--fractions 1.0,0.1] [--student SPEC] [--set KEY=VALUE] [--out output/dearkd.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vitshrink.models  # noqa: E402,F401  (registers the CIFAR ResNets)
from vitshrink.data.folders import (ImageSplit, LabelledData, reader_targets, resolve_data,  # noqa: E402
                                    stratified_holdout)
from vitshrink.io import load_model, record_of  # noqa: E402
from vitshrink.pipeline import distill  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# A DeiT-Tiny-shaped ViT at 32 px with 4 px patches (8x8 grid) at half width: trains on a GPU in minutes.
STUDENT = "vit_tiny_patch16_224:img_size=32,patch_size=4,embed_dim=96,depth=6,num_heads=3,num_classes=10"


def bundled_subset(fraction: float, val_data: Path, seed: int) -> LabelledData:
    """The bundled 5k training images (all, or a stratified ``fraction``), validated on ``val_data``."""
    data = resolve_data(None, val_data)
    if fraction >= 1.0:
        return data
    _, kept = stratified_holdout(reader_targets(data.train.reader), fraction, seed)
    data.train = ImageSplit(data.train.reader, kept, img_mode=data.train.img_mode)
    data.description = f"bundled CIFAR-10 train_5k, stratified {fraction:.0%} ({len(kept)} images; validation: " \
                       f"{val_data})"
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", type=Path, default=SHARED)
    parser.add_argument("--resnet56", type=Path, default=None, help="default: DATA_DIR/checkpoints/...resnet56...")
    parser.add_argument("--val-data", type=Path, default=None, help="default: DATA_DIR/cifar10/test.tar")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--fractions", default="1.0,0.1")
    parser.add_argument("--recipes", default="deit,dearkd")
    parser.add_argument("--student", default=STUDENT)
    parser.add_argument("-b", "--batch-size", type=int, default=None)
    parser.add_argument("-j", "--workers", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("output/dearkd.json"))
    args = parser.parse_args()
    resnet56 = args.resnet56 or args.data_dir / "checkpoints" / "cifar10_resnet56_akamaster.th"
    val_data = args.val_data or args.data_dir / "cifar10" / "test.tar"
    overrides = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.set)}
    work = args.out.with_suffix("")
    rows = []
    for fraction in [float(f) for f in args.fractions.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for recipe in args.recipes.split(","):
                teacher = load_model(str(resnet56), arch="cifar_resnet56")
                record_of(teacher).class_names = list(CIFAR_CLASSES)
                data = bundled_subset(fraction, val_data, seed)
                started = time.perf_counter()
                result = distill(teacher, recipe, student=args.student, data=data, val_data=val_data,
                                 out_dir=work / f"{recipe}_f{fraction}_s{seed}", epochs=args.epochs,
                                 batch_size=args.batch_size, device=args.device, seed=seed, workers=args.workers,
                                 overrides=overrides, progress=False)
                report = result.report
                rows.append({"recipe": recipe, "fraction": fraction, "train_images": len(data.train), "seed": seed,
                             "epochs": args.epochs, "student_top1": report["student"]["top1"],
                             "teacher_top1": report["teacher"]["top1"], "student_params": report["student"]["params"],
                             "best_epoch": report["best_epoch"], "seconds": time.perf_counter() - started})
                print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": datetime.date.today().isoformat(), "machine": platform.platform(),
                                    "device": args.device, "student": args.student, "resnet56": str(resnet56),
                                    "val_data": str(val_data), "set": overrides, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
