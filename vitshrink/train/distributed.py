"""``torchrun`` set-up: the process group, this rank's device, and sums/gathers across ranks.

Only the student is wrapped in DDP (the task's ``prepare_distributed``); teachers stay plain frozen modules.
Only rank 0 writes files and prints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from vitshrink.errors import UserError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float], device: torch.device) -> list[float]:
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (a list of one when not distributed)."""
        if self.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


def init_distributed(device_name: str) -> Dist:
    """The process group of a ``torchrun`` launch (gloo on CPU, nccl on CUDA), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns)


def select_device(name: str, ddp: Dist) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` (this rank's GPU under torchrun)."""
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(ddp.local_rank)
    return torch.device("cuda", ddp.local_rank)
