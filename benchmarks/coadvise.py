"""Co-advise on CIFAR-10 (issue 9): does a convolution + an involution teacher beat one CNN teacher?

Rows (same CiT student, epochs, data; each seed):
  coadvise      CE(cls) + KL(conv head || ResNet-56) + KL(inv head || RedNet trained here)   (official loss)
  ce            the CiT on labels alone (conv/inv weights 0: no teacher is run)
  deit_token    DeiT hard token KD with the ResNet-56 alone on the conv token: 0.5 CE(cls) + 0.5 CE(conv head,
                argmax ResNet-56); the inv head gets no loss (inference still averages all three heads)
  coadvise_r56  co-advise with the ResNet-56 on both the conv and the inv token (does the involution bias matter?)
The involution teacher (``--inv-arch``, default rednet_cifar26) is trained first with
``vitshrink.supervised.train_teacher`` on the same training split; its top-1 is recorded. Top-1 on the test tar
(test.tar when present), training images/s (steps x batch / the loop's wall time, which includes each epoch's
validation). With ``--select-split F`` every run (teacher included) keeps the fraction F of the training images
apart to pick its best epoch, and the chosen model is then evaluated once on the test tar (the test images
never choose a checkpoint); without it the test tar is also the per-epoch validation set.

CPU scale (2 cores, about 110 minutes, one torch thread; benchmarks/RESULTS.md):

    OMP_NUM_THREADS=1 python benchmarks/coadvise.py --data-dir DIR_WITH_train_5k_AND_test.tar \
        --student vitshrink_cit:img_size=32,patch_size=4,embed_dim=96,depth=4,num_heads=3 \
        --inv-arch rednet_cifar26:base_chs=16 --select-split 0.1 --epochs 6 --teacher-epochs 10 -b 64

    python benchmarks/coadvise.py --data-dir ../shared/data/cifar10 \
        --resnet56 ../shared/data/checkpoints/cifar10_resnet56_akamaster.th \
        --epochs 30 --teacher-epochs 30 --seeds 0,1 --device cuda --budget-s 3000 --out output/coadvise.json

Every other setting comes from recipes/coadvise.yaml (``--set KEY=VALUE`` overrides for every run). When the
wall-clock budget runs out, the remaining runs are listed as skipped.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitshrink.data import resolve_eval_split  # noqa: E402
from vitshrink.evaluation import evaluate  # noqa: E402
from vitshrink.io import load_model, save_model  # noqa: E402
from vitshrink.pipeline import BUNDLED_TEACHER, distill  # noqa: E402
from vitshrink.students import parse_student_spec  # noqa: E402
from vitshrink.supervised import train_teacher  # noqa: E402

DEFAULT_STUDENT = "vitshrink_cit:img_size=32,patch_size=4,embed_dim=192,depth=6,num_heads=3"
ROWS = {
    "coadvise": {},
    "ce": {"conv_weight": 0.0, "inv_weight": 0.0},
    "deit_token": {"distill_type": "hard", "task_weight": 0.5, "conv_weight": 0.5, "inv_weight": 0.0},
    "coadvise_r56": {"inv_teacher": "RESNET56"},
}


def data_paths(folder: Path) -> tuple[Path, Path]:
    train = next((folder / n for n in ("train.tar", "train_5k.tar") if (folder / n).exists()), None)
    val = next((folder / n for n in ("test.tar", "test_1k.tar") if (folder / n).exists()), None)
    if train is None or val is None:
        raise SystemExit(f"--data-dir {folder}: needs train.tar or train_5k.tar and test.tar or test_1k.tar")
    return train, val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/cifar10")
    parser.add_argument("--resnet56", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared/data/checkpoints/"
                                                                       "cifar10_resnet56_akamaster.th")
    parser.add_argument("--student", default=DEFAULT_STUDENT)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--teacher-epochs", type=int, default=5)
    parser.add_argument("--inv-arch", default="rednet_cifar26",
                        help="involution teacher: timm name[:key=value,...], e.g. rednet_cifar26:base_chs=16")
    parser.add_argument("--select-split", type=float, default=0.0,
                        help="fraction of the training images that picks each run's best epoch (0: the test tar)")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("-b", "--batch-size", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--budget-s", type=float, default=3000.0, help="wall-clock budget for the whole benchmark")
    parser.add_argument("--work", type=Path, default=Path("output/coadvise_bench"), help="run folders")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default: WORK/coadvise.json)")
    args = parser.parse_args()
    start = time.time()
    overrides = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.set)}
    train, val = data_paths(args.data_dir)
    args.work.mkdir(parents=True, exist_ok=True)

    resnet56 = args.work / "resnet56.safetensors"
    save_model(load_model(args.resnet56, arch="cifar_resnet56"), resnet56)
    select = args.select_split > 0
    inv_name, inv_kwargs = parse_student_spec(args.inv_arch)  # same NAME:key=value,... form as --student
    inv = train_teacher(inv_name, data=train, val_data=None if select else val, val_split=args.select_split or 0.1,
                        out_dir=args.work / "rednet", device=args.device, model_kwargs=inv_kwargs,
                        epochs=args.teacher_epochs, batch_size=args.batch_size, overrides=dict(overrides))
    test_set = resolve_eval_split(None, val)[0] if select else None
    inv_top1 = test_top1(inv.model, test_set, args.device) if select else inv.report["top1"]
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "device": args.device,
              "command": " ".join(sys.argv), "train": str(train), "val": str(val), "student": args.student,
              "epochs": args.epochs, "select_split": args.select_split,
              "inv_teacher": {"arch": args.inv_arch, "epochs": args.teacher_epochs, "top1": inv_top1,
                                                     "seconds": inv.report["train_seconds"]},
              "rows": {}, "skipped": []}
    for row in args.rows.split(","):
        runs = []
        for seed in (int(s) for s in args.seeds.split(",")):
            if time.time() - start > args.budget_s:
                result["skipped"].append(f"{row} seed {seed}")
                continue
            options = {"conv_teacher": str(resnet56), "inv_teacher": str(args.work / "rednet" / "model.safetensors"),
                       **{k: (str(resnet56) if v == "RESNET56" else v) for k, v in ROWS[row].items()}}
            run = distill(load_model(BUNDLED_TEACHER), "coadvise", student=args.student, data=train,
                          val_data=None if select else val, val_split=args.select_split or 0.1,
                          out_dir=args.work / f"{row}_s{seed}", epochs=args.epochs, batch_size=args.batch_size,
                          device=args.device, seed=seed, overrides=dict(overrides), options=options)
            top1 = test_top1(run.student, test_set, args.device) if select else run.report["student"]["top1"]
            cfg = yaml.safe_load((run.out_dir / "args.yaml").read_text())["config"]
            steps = optimizer_steps(run.out_dir)
            runs.append({"seed": seed, "top1": top1, "select_top1": run.report["student"]["top1"],
                         "images_per_s": steps * int(cfg["batch_size"]) / max(run.report["distill_seconds"], 1e-9)})
        if runs:
            top1 = [r["top1"] for r in runs]
            result["rows"][row] = {"runs": runs, "top1_mean": statistics.mean(top1),
                                   "top1_spread": (max(top1) - min(top1)) / 2,
                                   "images_per_s_mean": statistics.mean(r["images_per_s"] for r in runs)}
    out = args.out or args.work / "coadvise.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"involution teacher {args.inv_arch}: top-1 {100 * inv_top1:.2f}%")
    for row, entry in result["rows"].items():
        print(f"{row:14s} top-1 {100 * entry['top1_mean']:.2f}% +- {100 * entry['top1_spread']:.2f} "
              f"({len(entry['runs'])} seeds), {entry['images_per_s_mean']:.1f} img/s")
    if result["skipped"]:
        print("skipped (budget):", ", ".join(result["skipped"]))
    print(f"wrote {out}")


def test_top1(model, test_set, device: str) -> float:
    """Top-1 of ``model`` on the whole test tar (its own eval transform)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return evaluate(model, test_set, device=device).top1


def optimizer_steps(out_dir: Path) -> int:
    """Optimizer steps the run took: global_step from last.pt."""
    state = torch.load(out_dir / "last.pt", map_location="cpu", weights_only=True)
    return int(state.get("global_step") or 0)


if __name__ == "__main__":
    main()
