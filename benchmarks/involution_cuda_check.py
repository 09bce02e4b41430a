"""Device check (needs CUDA): involution and CiT on the GPU, fp32 and under bf16 autocast, against CPU float64.

Prints one line per check and exits 1 if a check fails. Usage: ``python benchmarks/involution_cuda_check.py``
(about a minute including CUDA start-up).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from vitshrink.io import create_model
from vitshrink.models.involution import Involution


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    dev = torch.device("cuda")
    ok = True
    torch.manual_seed(0)
    module = Involution(64, 7, 2).eval()
    x = torch.randn(8, 64, 32, 32)
    with torch.no_grad():
        ref = module.double()(x.double())
        module = module.float().to(dev)
        fp32 = module(x.to(dev))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = module(x.to(dev))
    for label, out, bound in (("involution fp32 (TF32 off)", fp32, 1e-5), ("involution bf16 autocast", bf16, 1e-2)):
        err = rel(out, ref)
        ok &= err <= bound
        print(f"{label}: rel err vs CPU float64 {err:.2e} (bound {bound:g})")
    for name, kwargs in (("rednet_cifar26", {}), ("cit_tiny_patch4_32", {})):
        torch.manual_seed(1)
        model = create_model(name, **kwargs).to(dev).train()
        images, targets = torch.randn(64, 3, 32, 32, device=dev), torch.randint(0, 10, (64,), device=dev)
        losses = {}
        for bf in (False, True):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf):
                out = model(images)
            logits = out[0] if isinstance(out, tuple) else out
            loss = F.cross_entropy(logits.float(), targets)
            loss.backward()
            model.zero_grad()
            losses[bf] = float(loss)
        gap = abs(losses[True] - losses[False]) / losses[False]
        ok &= gap <= 0.02 and all(torch.isfinite(torch.tensor(list(losses.values()))))
        print(f"{name} train step: loss fp32 {losses[False]:.4f} bf16 {losses[True]:.4f} (rel gap {gap:.1e})")
    print("device:", torch.cuda.get_device_name(0), "| all checks passed" if ok else "| FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    sys.exit(main())
