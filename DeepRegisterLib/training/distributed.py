"""Training in several processes (GPUs, machines) launched by ``torchrun``: torch.distributed only.

``torchrun`` starts one process per GPU (or CPU worker) and tells each where it stands through
the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). :func:`process_group`
joins that group (NCCL on GPUs, gloo on CPUs); :class:`Ranks` is what the training loop needs to
know of it. A process started any other way runs alone, exactly as before.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Processes other than the main one wait at barriers while it aligns label maps or validates,
# which takes minutes on large data: far beyond the usual 10 minutes. A process that fails
# does not leave the others waiting this long: torchrun stops them all.
GROUP_TIMEOUT = timedelta(hours=2)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Join the group ``torchrun`` launched this process in, for the block; yields the device
    this process trains on (``cuda:LOCAL_RANK`` for a GPU run). Outside torchrun: ``device``."""
    if not launched_by_torchrun():
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=GROUP_TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=GROUP_TIMEOUT)
    try:
        yield device
        dist.barrier()  # leave together: one leaving early closes connections others still use
    finally:
        dist.destroy_process_group()


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group: rank 0 (the main process) validates, logs and
    writes; every rank trains on its own share of each step's batch."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """The initialised process group's ranks; a single process when there is none."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait until every process gets here (nothing to wait for alone)."""
        if self.is_distributed:
            dist.barrier()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over all processes of ``values`` (each process's own when alone)."""
        if not self.is_distributed:
            return values
        total = values.clone()
        dist.all_reduce(total)  # a sum: gloo has no average
        return total / self.world_size

    def from_main(self, value: float, device: torch.device) -> float:
        """The main process's ``value``, for every process: so that all stop at the same step."""
        if not self.is_distributed:
            return value
        shared = torch.tensor([float(value)], dtype=torch.float64, device=device)
        dist.broadcast(shared, src=0)
        return float(shared.item())


@contextmanager
def main_first(ranks: Ranks) -> Iterator[None]:
    """The main process runs the block first, then the others: for work whose result the main
    process caches (aligned label maps), so that the others read the cache."""
    if not ranks.is_main:
        ranks.barrier()
    yield
    if ranks.is_main:
        ranks.barrier()
