"""Synthesis speed: images/s of ``vitshrink synthesize`` for the bundled ViT (patch-similarity prior) and the shared
ResNet-56 (BatchNorm prior), and how many of the images the teacher classifies as their target.

    python benchmarks/synth_speed.py [--teachers vit,resnet56] [--num 20] [--iterations 100] [-b 20]
        [--device auto] [--threads T] [--resnet56 PATH] [--out output/synth_speed.json]

images/s counts finished images (each optimised for ``--iterations`` steps); ``image_steps_per_s`` =
images/s * iterations is the rate independent of the iteration count.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vitshrink.models  # noqa: E402,F401  (registers the CIFAR ResNets)
from vitshrink.data.synthetic import synthesize  # noqa: E402
from vitshrink.pipeline import BUNDLED_TEACHER  # noqa: E402
from vitshrink.io import load_model  # noqa: E402

SHARED_RESNET56 = Path(__file__).resolve().parents[2] / "shared" / "data" / "checkpoints" / "cifar10_resnet56_akamaster.th"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", default="vit,resnet56")
    parser.add_argument("--num", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("-b", "--batch-size", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--resnet56", type=Path, default=SHARED_RESNET56)
    parser.add_argument("--work", type=Path, default=Path("output/synth_speed"))
    parser.add_argument("--out", type=Path, default=Path("output/synth_speed.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.teachers.split(","):
        teacher = load_model(BUNDLED_TEACHER) if name == "vit" else load_model(args.resnet56, arch="cifar_resnet56")
        work = args.work / name
        shutil.rmtree(work, ignore_errors=True)  # a fresh run: resume would skip the work being timed
        result = synthesize(teacher, args.num, work, iterations=args.iterations, batch_size=args.batch_size,
                            device=args.device, progress=False)
        rows.append({"teacher": name, "prior": result.prior, "num": args.num, "iterations": args.iterations,
                     "batch_size": args.batch_size, "seconds": round(result.seconds, 2),
                     "images_per_s": round(result.images_per_s, 4),
                     "image_steps_per_s": round(result.images_per_s * args.iterations, 1),
                     "target_agreement": result.target_agreement})
        print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name(0) if str(args.device) != "cpu" and torch.cuda.is_available() else "cpu"
    output = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": device, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "load_average": os.getloadavg(), "torch": torch.__version__, "machine": platform.machine(),
              "argv": sys.argv[1:], "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(output, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
