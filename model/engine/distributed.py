"""torch.distributed set-up from torchrun, SLURM (submitit) or a single process."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def init_distributed(device: str | None = None, timeout_min: float | None = None) -> DistInfo:
    """Initialise the default process group when more than one process is launched.

    torchrun exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; inside a SLURM job the
    submitit job calls ``submitit.helpers.TorchDistributedEnvironment().export()`` first, which
    exports the same variables from SLURM's. One process needs no group. Backend: NCCL on CUDA,
    gloo on CPU. Each rank uses GPU ``local_rank`` (one task per GPU). ``timeout_min`` bounds
    the rendezvous and every collective (``train.dist_timeout_min``; None = torch's default), so
    a rank that never arrives fails the job instead of holding the allocation.
    """
    rank = _env_int("RANK", default=0)
    world = _env_int("WORLD_SIZE", default=1)
    local = _env_int("LOCAL_RANK", default=0)
    use_cuda = torch.cuda.is_available() and device != "cpu"
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world} but {key} is not set in the environment")
        timeout = None if timeout_min is None else datetime.timedelta(minutes=timeout_min)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://",
                                rank=rank, world_size=world, timeout=timeout)
        log.info("rank %d/%d initialised on %s", rank, world, dev)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (the feature queues and their pointer) to every rank, once.

    Each rank builds its objective under seed + rank, so the queues start as different random
    features; ALBEF's DDP broadcasts rank 0's buffers every step, which makes every rank use rank
    0's queue. The queues are all-gathered at every enqueue afterwards, so one broadcast at
    start-up (after a resume too: every rank then loads rank 0's) gives the same agreement
    without moving the queues every step.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=src)
