"""Process-group plumbing for the training loop: plain ``torch.distributed``, nothing else.

:func:`setup` reads torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``/``MASTER_PORT`` or a c10d rendezvous) and initialises the default process
group: ``nccl`` when CUDA is available, ``gloo`` on CPU. Started without torchrun, it makes a
one-process group on an in-memory store, so the loop's collectives work unchanged.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the default process group from torchrun's environment (or a single process)."""
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if use_cuda:
            if local_rank >= torch.cuda.device_count():  # else set_device says only "invalid device ordinal"
                raise RuntimeError(
                    f"LOCAL_RANK {local_rank}, but this node has {torch.cuda.device_count()} visible CUDA device(s): start "
                    "one process per GPU (torchrun --nproc_per_node, launch.sh's NPROC_PER_NODE)"
                )
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
            dist.init_process_group(backend, timeout=timeout, device_id=device)
        else:
            device = torch.device("cpu")
            dist.init_process_group(backend, timeout=timeout)
    else:
        rank, local_rank, world_size = 0, 0, 1
        device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(0)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistInfo(rank, local_rank, world_size, device, backend)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum a small vector of numbers over all ranks (float64, one collective)."""
    t = torch.as_tensor(values, dtype=torch.float64, device=device).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(values: list[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Element-wise maximum of a small vector over all ranks (float64, one collective)."""
    t = torch.as_tensor(values, dtype=torch.float64, device=device).clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    dist.barrier()
