"""Is bf16 autocast safe for involution? bf16-vs-fp32 error of the operator and of whole models, on CPU.

Operator: relative L2 error (vs float64) of a 7x7 involution (64 channels, 16x16 maps, post-ReLU input)
and of a 7x7 convolution of the same size, both on bf16-rounded inputs. Models: logits and parameter
gradients of ``rednet_cifar26`` (random init) and the trained ResNet-56 teacher (../shared/data) on 64 real
CIFAR-10 test images, under CPU bf16 autocast vs float32, BatchNorm in training mode (batch statistics,
as during training). Usage: ``python benchmarks/involution_bf16.py`` (about a minute on 2 cores).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from vitshrink.data import sample_images
from vitshrink.io import create_model, data_config
from vitshrink.models.involution import Involution, involution_weighted_sum

CKPT = Path(__file__).resolve().parents[2] / "shared" / "data" / "checkpoints" / "cifar10_resnet56_akamaster.th"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def operator_errors() -> dict[str, float]:
    torch.manual_seed(0)
    inv = Involution(64, 7, 1).eval()
    conv = torch.nn.Conv2d(64, 64, 7, padding=3, bias=False).eval()
    x = torch.relu(torch.randn(8, 64, 16, 16))
    with torch.no_grad():
        kernel = inv.generate_kernel(x)
        ref = involution_weighted_sum(x.double(), kernel.double(), 7)
        xb, kb = x.bfloat16(), kernel.bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            conv_bf16 = conv(x)
        return {
            "involution, bf16 inputs (fp32 accumulation, ours)": rel(involution_weighted_sum(xb, kb, 7), ref),
            "involution, bf16 inputs, bf16 accumulation": rel(_bf16_accumulate(xb, kb, 7), ref),
            "conv 7x7 under bf16 autocast": rel(conv_bf16, F.conv2d(x.double(), conv.weight.double(), padding=3)),
        }


def _bf16_accumulate(x: torch.Tensor, kernel: torch.Tensor, k: int) -> torch.Tensor:
    # The naive alternative: every partial sum rounded to bf16.
    pad = (k - 1) // 2
    b, c, h, w = x.shape
    g = kernel.shape[1]
    xp = F.pad(x, (pad,) * 4).view(b, g, c // g, h + 2 * pad, w + 2 * pad)
    out = torch.zeros(b, g, c // g, h, w, dtype=x.dtype)
    for u in range(k):
        for v in range(k):
            out = out + kernel[:, :, None, u * k + v] * xp[..., u:u + h, v:v + w]
    return out.view(b, c, h, w)


def model_errors(name: str, images: torch.Tensor, targets: torch.Tensor, state: dict | None) -> dict[str, float]:
    results = {}
    grads = {}
    for bf16 in (False, True):
        torch.manual_seed(1)
        model = create_model(name)
        if state is not None:
            model.load_state_dict(state)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(images)
        F.cross_entropy(logits.float(), targets).backward()
        grads[bf16] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[bf16] = logits.detach().float()
    return {"logits rel err": rel(results[True], results[False]),
            "top-1 agreement": float((results[True].argmax(1) == results[False].argmax(1)).float().mean()),
            "grad rel err": rel(grads[True], grads[False])}


def main() -> None:
    torch.set_num_threads(2)
    for label, value in operator_errors().items():
        print(f"{label}: {value:.4f}")
    images = sample_images(data_config(create_model("cifar_resnet56")), None, n=64)
    targets = torch.arange(64) % 10  # only the loss needs targets; the gradient comparison is what counts
    state = None
    if CKPT.exists():
        raw = torch.load(CKPT, weights_only=True, map_location="cpu")["state_dict"]
        state = {k.removeprefix("module."): v for k, v in raw.items()}
    for name, weights in (("rednet_cifar26", None), ("cifar_resnet56", state)):
        errs = model_errors(name, images, targets, weights)
        print(name, "trained" if weights else "random init", ", ".join(f"{k} {v:.4f}" for k, v in errs.items()))


if __name__ == "__main__":
    main()
