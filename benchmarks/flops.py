"""vitshrink's MAC count (attention matmuls included) vs torch's FlopCounterMode alone vs the analytic formula.

    python benchmarks/flops.py [--json benchmarks/results/flops_cpu.json]

Prints a table and writes JSON. Random weights (the count depends on shapes only).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitshrink.io import create_model  # noqa: E402
from vitshrink.measure import count_flops  # noqa: E402


def vit_analytic_macs(img: int, patch: int, dim: int, depth: int, mlp_ratio: float, classes: int) -> int:
    n = (img // patch) ** 2 + 1  # tokens incl. class token
    block = n * dim * 3 * dim + 2 * n * n * dim + n * dim * dim + 2 * n * dim * int(dim * mlp_ratio)
    patch_embed = (img // patch) ** 2 * dim * 3 * patch * patch
    return depth * block + patch_embed + dim * classes


def torch_counter_macs(model: torch.nn.Module, size: int) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    return counter.get_total_flops() // 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/flops_cpu.json"))
    args = parser.parse_args()
    rows = []
    for name, size, dims in (("deit_tiny_patch16_224", 224, (16, 192, 12, 4.0)),
                             ("deit_tiny_patch16_224", 448, (16, 192, 12, 4.0)),
                             ("vit_small_patch16_224", 224, (16, 384, 12, 4.0)),
                             ("resnet18", 224, None)):
        kwargs = {"img_size": size} if dims else {}
        model = create_model(name, **kwargs)
        ours = count_flops(model, (3, size, size)).macs
        plain = torch_counter_macs(model, size)
        analytic = vit_analytic_macs(size, *dims, 1000) if dims else None
        rows.append({"model": name, "img_size": size, "vitshrink_gmacs": ours / 1e9, "torch_counter_gmacs": plain / 1e9,
                     "analytic_gmacs": analytic / 1e9 if analytic else None})
    print(f"{'model':<24}{'px':>5}{'vitshrink GMACs':>17}{'FlopCounterMode':>17}{'analytic':>10}")
    for r in rows:
        analytic = f"{r['analytic_gmacs']:.4f}" if r["analytic_gmacs"] else "-"
        print(f"{r['model']:<24}{r['img_size']:>5}{r['vitshrink_gmacs']:>17.4f}{r['torch_counter_gmacs']:>17.4f}{analytic:>10}")
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", *sys.argv]), "machine": platform.platform(),
              "torch": torch.__version__, "note": "MACs at batch 1; GFLOPs = 2 x GMACs", "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
