"""Optimizer-state memory per rank with and without ``train.zero`` (ZeroRedundancyOptimizer).

    python -m benchmarks.bench_zero --preset base --world 2 --out results/benchmarks/cpu-levers

Builds the preset's objective on ``--world`` CPU ranks (gloo), gives every trainable parameter
a gradient of zeros (the AdamW state is created by the first ``step``; no forward pass is
needed to size it), steps once, and counts the bytes of the optimizer state each rank holds:
AdamW's exp_avg / exp_avg_sq (and step counters). Without ZeRO every rank holds all of it; with
ZeRO each holds its shard's. Writes ``zero.md`` and ``zero.csv``.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.build import build_objective
from model.config.experiment import load_experiment
from model.engine.optim import build_optimizer
from model.text_masking import SpecialIds
from results.render import write_files

VOCAB = 30522  # BERT's WordPiece vocabulary: the embedding table's AdamW state is part of it


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state on this rank."""
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer wraps the local one
    return sum(t.numel() * t.element_size() for s in inner.state.values()
               for t in s.values() if torch.is_tensor(t))


def _rank(rank: int, world: int, port: int, preset: str, zero: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        cfg = load_experiment(preset=preset, sets=[f"model.text.vocab_size={VOCAB}",
                                                   f"train.zero={str(zero).lower()}"])
        torch.manual_seed(0)
        objective = build_objective(cfg, SpecialIds(pad=0, cls=101, mask=103, vocab_size=VOCAB))
        optimizer = build_optimizer(objective.student, cfg.train)
        params = [p for p in objective.student.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        row = torch.tensor([state_bytes(optimizer), sum(p.numel() for p in params)],
                           dtype=torch.float64)
        rows = [torch.zeros_like(row) for _ in range(world)]
        dist.all_gather(rows, row)
        if rank == 0:
            torch.save(torch.stack(rows), out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(preset: str, world: int) -> pd.DataFrame:
    """One row per (zero, rank): optimizer-state bytes and the model's trainable parameters."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for zero in (False, True):
            out = str(Path(tmp) / f"{zero}.pt")
            mp.spawn(_rank, args=(world, _free_port(), preset, zero, out), nprocs=world)
            for rank, (nbytes, nparams) in enumerate(torch.load(out).tolist()):
                rows.append({"preset": preset, "world": world, "zero": zero, "rank": rank,
                             "optimizer_state_mib": nbytes / 2**20, "params": int(nparams)})
    return pd.DataFrame(rows)


def report(frame: pd.DataFrame) -> str:
    full = frame[~frame["zero"]]["optimizer_state_mib"].max()
    shown = frame.assign(**{"fraction of full": frame["optimizer_state_mib"] / full})
    world, params = int(frame["world"].iloc[0]), int(frame["params"].iloc[0])
    caption = (f"AdamW state per rank, {frame['preset'].iloc[0]} preset ({params / 1e6:.1f}M "
               f"trainable parameters, vocabulary {VOCAB}), {world} CPU ranks (gloo); measured "
               "after one optimizer step. Without ZeRO every rank holds the whole state; with "
               "train.zero each holds its shard (parameters are assigned whole, so shards differ "
               f"a little from 1/{world}).")
    return caption + "\n\n" + shown.to_markdown(index=False, floatfmt=".3f") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_zero",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/cpu-levers"))
    args = parser.parse_args(argv)
    frame = measure(args.preset, args.world)
    text = report(frame)
    write_files({args.out / "zero.md": text, args.out / "zero.csv": frame.to_csv(index=False)})
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
