"""Hand-written ViTs read right with no flag but the file and ``--data`` (issue 20, items 4-6).

Each layout of ``tests/handwritten_vits.py`` (the ORIGINAL modules, plain PyTorch) is trained briefly on the
shared MNIST train_5k under its own input normalisation and head count, saved as a plain state dict, and given to
``vitshrink convert FILE -o OUT --data mnist/test.tar`` (a subprocess: exactly what a user types). Recorded per
layout: the settings the images decided (the table's chosen row), the original module's top-1 and the converted
file's top-1 on the same test images (the file's recorded mean/std applied), and their max |logit diff|.

    nice -n 10 python benchmarks/hand_written.py --steps 300 --eval-images 2000 \\
        --json benchmarks/results/hand_written.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from handwritten_vits import LAYOUTS  # noqa: E402
from resolve_support import MNIST_TEST, MNIST_TRAIN, accuracy, mnist_tensors, train_briefly  # noqa: E402

from vitshrink._atomic import atomic_write_text  # noqa: E402
from vitshrink.io import data_config, load_model, record_of  # noqa: E402

MNIST_STATS = ((0.1307,), (0.3081,))
IMAGENET_GREY = ((0.449,), (0.226,))  # ImageNet's mean/std averaged over RGB
# layout -> (heads, width, normalisation name, (mean, std)): each its own normalisation and head count.
CASES = {
    "torch_encoder": (4, 32, "0.5", ((0.5,), (0.5,))),
    "torch_encoder_prenorm_gelu": (2, 32, "none", ((0.0,), (1.0,))),
    "mha_prenorm": (4, 32, "MNIST statistics", MNIST_STATS),
    "double_projection": (8, 64, "ImageNet (grey)", IMAGENET_GREY),
    "per_head": (2, 32, "0.5", ((0.5,), (0.5,))),
    "linear_patch_avgpool": (4, 32, "none", ((0.0,), (1.0,))),
    "mlp_head": (1, 32, "0.5", ((0.5,), (0.5,))),
}


def _probabilities(out: torch.Tensor) -> torch.Tensor:
    """A head that ends in softmax already gives probabilities; logits are turned into them."""
    is_probability = bool((out >= 0).all()) and torch.allclose(out.sum(1), torch.ones(len(out)), atol=1e-4)
    return out if is_probability else out.softmax(1)


def run_case(name: str, folder: Path, train: tuple, test: tuple, steps: int) -> dict:
    heads, dim, norm_name, (mean, std) = CASES[name]
    torch.manual_seed(0)
    original = LAYOUTS[name](img_size=28, patch_size=7, in_chans=1, num_classes=10, dim=dim, depth=2, heads=heads,
                             mlp_dim=2 * dim)
    started = time.perf_counter()
    train_briefly(original, *train, mean, std, steps=steps)
    train_s = time.perf_counter() - started
    checkpoint, out = folder / f"{name}.pth", folder / f"{name}.safetensors"
    torch.save(original.state_dict(), checkpoint)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "vitshrink", "convert", str(checkpoint), "-o", str(out),
                           "--data", str(MNIST_TEST)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "250"})
    convert_s = time.perf_counter() - started
    row = {"layout": name, "trained_heads": heads, "width": dim, "trained_normalisation": norm_name,
           "trained_mean_std": [mean[0], std[0]], "train_steps": steps, "train_s": round(train_s, 1),
           "convert_s": round(convert_s, 1), "original_top1": accuracy(original, *test, mean, std),
           "convert_exit": done.returncode}
    chosen = [line[2:].split("  ->  ")[0] for line in done.stderr.splitlines() if line.startswith("* ")]
    row["resolved"] = chosen[0] if chosen else None
    tried = re.search(r"the best of (\d+) candidates", " ".join(done.stderr.split()))
    row["candidates_tried"] = int(tried.group(1)) if tried else None
    if done.returncode != 0:
        row["error"] = done.stderr.strip().splitlines()[-1][:400]
        return row
    model = load_model(out)
    cfg = data_config(model)
    row["resolved_mean_std"] = [round(cfg["mean"][0], 4), round(cfg["std"][0], 4)]
    row["resolved_kwargs"] = {k: v for k, v in record_of(model).kwargs.items()
                              if k in ("num_heads", "block_num_heads", "norm_placement", "act_layer", "norm_eps",
                                       "head_act", "global_pool", "fc_norm")}
    row["converted_top1"] = accuracy(model, *test, tuple(cfg["mean"]), tuple(cfg["std"]))
    images = (test[0][:256] - mean[0]) / std[0]
    with torch.no_grad():
        theirs, ours = _probabilities(original(images)), _probabilities(model(images))
    # Same input to both (the training normalisation): the computation alone compared.
    row["max_abs_prob_diff_same_input"] = float((ours - theirs).abs().max())
    row["prediction_agreement_same_input"] = float((ours.argmax(1) == theirs.argmax(1)).float().mean())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-images", type=int, default=2000)
    parser.add_argument("--layouts", default=",".join(CASES))
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "hand_written.json")
    args = parser.parse_args()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    train = mnist_tensors(MNIST_TRAIN)
    test = mnist_tensors(MNIST_TEST, limit=args.eval_images)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.layouts.split(","):
            rows.append(run_case(name, Path(scratch), train, test, args.steps))
            print(json.dumps(rows[-1]), flush=True)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.processor() or platform.machine(), "command": " ".join(sys.argv),
              "eval_images": len(test[1]), "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
