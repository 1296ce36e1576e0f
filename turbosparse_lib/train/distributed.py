"""One process, or DDP under ``torchrun`` (gloo on CPU, nccl on GPU): the few collectives the loop needs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """DDP under torchrun (WORLD_SIZE set), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return Dist(dist.get_rank(), dist.get_world_size(), True)
    return Dist(dist.get_rank(), dist.get_world_size(), False)


def all_mean(x: float, d: Dist) -> float:
    if d.world == 1:
        return x
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / d.world


def barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()
