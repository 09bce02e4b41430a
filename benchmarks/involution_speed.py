"""CPU cost of RedNet vs the CIFAR ResNet-56: parameters, MACs (torch's counter: convolutions and linears only,
so the involution's per-pixel multiply-add is not included) and training images/s (SGD step, batch 64,
random 32 px images, 1 thread, best of 3 steps after one warm-up). Usage: ``python benchmarks/involution_speed.py``.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from vitshrink.io import create_model
from vitshrink.measure import count_flops


def train_images_per_second(model: torch.nn.Module, batch: int = 64, steps: int = 3) -> float:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return batch / min(times[1:])


def main() -> None:
    torch.set_num_threads(1)
    for name, kwargs in (("cifar_resnet56", {}), ("rednet_cifar26", {}), ("rednet_cifar26", {"base_chs": 16})):
        model = create_model(name, **kwargs)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        macs = count_flops(model).macs / 1e6
        print(f"{name} {kwargs or ''}: {params:.2f} M params, {macs:.1f} M MACs, "
              f"{train_images_per_second(model):.0f} train img/s")


if __name__ == "__main__":
    main()
