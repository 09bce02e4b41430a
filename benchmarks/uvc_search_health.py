"""UVC's search alone (no post-training), with vitshrink's safeguards (the ``kd`` defaults, issue 23) and with UVC's own
dynamics (unbounded dual, no reset, no penalty, raw duals, no stop, no restart; same scale-free loss), on small
teachers built here from real CIFAR-10 images:

* ``hard``: 2 blocks, ONE head of width 32, 32 px in 8-px patches, trained for one pass over 512 images;
* ``tiny``: the test suite's 4-block, 3-head, width-48 ViT (``tests/distill_support.py``), trained 2 epochs on 5k.

Per run: steps run, where it stopped, whether the search's own decisions reached the band, how far the greedy
adjustment moved R, restarts, the largest search loss, and the decisions' R every 3 steps.

    python benchmarks/uvc_search_health.py --steps 200 --json benchmarks/results/uvc_search_health.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from distill_support import eval_view_loader, train_hard_teacher, train_tiny_teacher  # noqa: E402

from vitshrink._atomic import atomic_write_text  # noqa: E402
from vitshrink.io import load_model, save_model  # noqa: E402
from vitshrink.prune.uvc_search import UVCConfig, search_uvc  # noqa: E402

UVC_DYNAMICS = dict(z_bound=math.inf, z_reset=False, z_penalty=0.0, relative_duals=False, patience=0,
                    max_restarts=0, loss_limit=math.inf, runaway=math.inf)


def hard_teacher(path: Path):
    if not path.exists():
        save_model(train_hard_teacher(img_size=32, patch_size=8, n_train=512, batch=64), path)
    return load_model(path)


def run(teacher, dynamics: str, steps: int, target: float, seed: int) -> dict:
    torch.manual_seed(seed)
    extra = UVC_DYNAMICS if dynamics == "uvc" else {}
    config = UVCConfig.for_objective("kd", flops_target=target, steps=steps, log_every=0, **extra)
    start = time.process_time()
    result = search_uvc(teacher, eval_view_loader(teacher, n=320, batch=32), config)
    health = result.health
    return {"dynamics": dynamics, "target": target, "seed": seed, "cpu_s": round(time.process_time() - start, 1),
            **{k: v for k, v in health.items() if k != "trace"},
            "decided_every_3": health["trace"]["decided"][::3], "kept_blocks": result.summary()["kept_blocks"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--cache", type=Path, default=Path("output/uvc_search_health"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.cache.mkdir(parents=True, exist_ok=True)
    tiny = args.cache / "tiny.safetensors"
    if not tiny.exists():
        train_tiny_teacher(tiny)
    teachers = {"hard": hard_teacher(args.cache / "hard.safetensors"), "tiny": load_model(tiny)}
    rows = []
    for name, teacher in teachers.items():
        for dynamics in ("vitshrink", "uvc"):
            row = {"teacher": name, **run(teacher, dynamics, args.steps, args.target, 0)}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "decided_every_3"}))
    out = {"command": " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s), shared", "rows": rows}
    if args.json:
        atomic_write_text(args.json, json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
