"""Two-process gloo DDP on CPU: queues, all-gathered momentum features, parameter sync.

Each rank builds the same tiny objective (as ``model.engine.train.setup`` does: same weights,
step generator seeded with seed + rank), wraps it in ``DistributedDataParallel`` with
``broadcast_buffers=False`` and trains on its own random batches through ``train_step``.
After every step:

* the feature queues and their pointer are identical on both ranks;
* the columns written by the step hold the all-gathered momentum features, rank 0's batch
  first, then rank 1's (docs/ALBEF.md §1.5);
* student and momentum parameters are identical across ranks.

A second phase runs SoftMask's Grad-CAM (``torch.autograd.grad`` inside the forward) under DDP.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from model.engine.distributed import cleanup_distributed, init_distributed
from model.engine.optim import build_optimizer
from model.engine.step import train_step
from tests.tiny import NO_DROPOUT, random_batch, tiny_config, tiny_objective

WORLD = 2
B = 4  # per-rank batch
K = 32  # queue: a multiple of the global batch B * WORLD; 5 steps wrap it once


def _gather(x: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return out


def _assert_same_on_all_ranks(x: torch.Tensor, what: str) -> None:
    parts = _gather(x)
    assert all(torch.equal(parts[0], p) for p in parts[1:]), f"{what} differs across ranks"


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _momentum_features(obj, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's (B, d) image and text features, recomputed without dropout."""
    teacher = obj.teacher
    was_training = teacher.training
    teacher.eval()
    with torch.no_grad():
        tokens = teacher.visual_encoder.forward_features(batch["image"])
        v = F.normalize(teacher.vision_proj(tokens[:, 0]), dim=-1)
        states = teacher.text_encoder(batch["input_ids"], batch["attention_mask"])
        t = F.normalize(teacher.text_proj(states[:, 0]), dim=-1)
    teacher.train(was_training)
    return v, t


def _train_and_check(rank: int, sets: tuple[str, ...], steps: int, check_columns: bool) -> None:
    cfg = tiny_config(*sets, batch_size=B, queue_size=K)
    obj = tiny_objective(*sets, seed=cfg.train.seed + rank, init_seed=0, batch_size=B,
                         queue_size=K)
    torch.manual_seed(cfg.train.seed + rank)  # dropout streams differ per rank, as in setup()
    model = DistributedDataParallel(obj, broadcast_buffers=False)
    optimizer = build_optimizer(obj, cfg.train)
    g = torch.Generator().manual_seed(1000 + rank)  # different data on every rank
    for step in range(steps):
        batch = random_batch(batch_size=B, generator=g)
        ptr = int(obj.queue.queue_ptr)
        assert ptr == (step * B * WORLD) % K
        out = train_step(model, optimizer, batch, alpha=0.4)
        assert torch.isfinite(out.loss)
        _assert_same_on_all_ranks(obj.queue.queue_ptr, "queue_ptr")
        _assert_same_on_all_ranks(obj.queue.image_queue, "image_queue")
        _assert_same_on_all_ranks(obj.queue.text_queue, "text_queue")
        _assert_same_on_all_ranks(_flat(obj.student.parameters()), "student parameters")
        _assert_same_on_all_ranks(_flat(obj.teacher.parameters()), "momentum parameters")
        images = _gather(batch["image"])
        assert not torch.equal(images[0], images[1])  # the ranks really saw different data
        if check_columns:
            # The teacher is not touched by the optimizer step, so recomputing its features
            # now gives exactly what this step enqueued (dropout is off in this phase).
            v, t = _momentum_features(obj, batch)
            cols = slice(ptr, ptr + B * WORLD)
            torch.testing.assert_close(obj.queue.image_queue[:, cols], torch.cat(_gather(v)).T)
            torch.testing.assert_close(obj.queue.text_queue[:, cols], torch.cat(_gather(t)).T)
            # rank order: rank 0's batch in the first B columns
            if rank == 0:
                torch.testing.assert_close(obj.queue.image_queue[:, ptr:ptr + B], v.T)
    assert int(obj.queue.queue_ptr) == (steps * B * WORLD) % K


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size) == (rank, WORLD) and dist.is_initialized()
    try:
        # ALBEF, dropout off so enqueued features can be recomputed exactly; wraps the queue
        _train_and_check(rank, NO_DROPOUT, steps=K // (B * WORLD) + 1, check_columns=True)
        # SoftMask: Grad-CAM's autograd.grad inside the DDP forward; dropout on
        _train_and_check(rank, ("softmask.mode=gradcam",), steps=2, check_columns=False)
    finally:
        cleanup_distributed()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_ddp_keeps_queues_and_parameters_in_sync() -> None:
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)


def test_a_rank_whose_peer_never_arrives_fails_within_the_timeout() -> None:
    """``train.dist_timeout_min`` bounds the rendezvous: a lone rank 0 of a 2-rank world gives
    up after the timeout (3 s here) instead of holding its allocation for torch's 30 minutes."""
    code = (
        "import time\n"
        "from model.engine.distributed import init_distributed\n"
        "t0 = time.time()\n"
        "try:\n"
        "    init_distributed('cpu', timeout_min=0.05)\n"
        "except Exception as exc:\n"
        "    print(f'gave up after {time.time() - t0:.1f} s: {type(exc).__name__}')\n"
        "    raise SystemExit(3)\n"
    )
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "gave up after" in proc.stdout and time.time() - start < 120
