"""Submit grid runs through submitit: one SLURM job array per resource tier, or local processes.

SLURM: every task of an array gets the same resources, so runs are grouped by tier and each
group is one ``map_array`` call capped by ``slurm_array_parallelism``. Local: submitit's local
executor (subprocesses, same pickling path) with at most ``max_parallel`` jobs alive at a time.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.engine.run_io import git_revision
from slurm.executor import Cluster, make_executor
from slurm.resources import Tier, load_tier, local_thread_share
from slurm.spec import RunSpec

log = logging.getLogger(__name__)


@dataclass
class Submission:
    spec: RunSpec
    job: Any  # submitit.Job


def grid_folder(specs: Sequence[RunSpec]) -> Path:
    """``<runs_root>/<grid>``: holds the run directories, ``.submitit/`` and submissions.jsonl."""
    return specs[0].run_dir.parent


def _record(folder: Path, subs: Sequence[Submission], cluster: str) -> None:
    sha, dirty = git_revision()
    folder.mkdir(parents=True, exist_ok=True)  # the debug executor creates no folder of its own
    with open(folder / "submissions.jsonl", "a") as fh:
        for s in subs:
            fh.write(json.dumps({
                "job_id": s.job.job_id, "cluster": cluster, "cell": s.spec.cell,
                "seed": s.spec.seed, "run_id": s.spec.run_id, "tier": s.spec.tier,
                "git_sha": sha, "git_dirty": dirty, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                # a local job's id is a process id, meaningful on this host only
                "host": socket.gethostname(),
            }) + "\n")


def submit_slurm(specs: Sequence[RunSpec], max_parallel: int | None,
                 tier_override: Tier | None = None) -> list[Submission]:
    """One job array per tier; returns immediately (jobs outlive this process)."""
    from slurm.cell_job import CellJob

    folder = grid_folder(specs)
    by_tier: dict[str, list[RunSpec]] = defaultdict(list)
    for s in specs:
        by_tier[s.tier].append(s)
    # Every tier loads before the first array is submitted: all or nothing.
    tiers = {name: tier_override or load_tier(name) for name in by_tier}
    subs: list[Submission] = []
    for tier_name, group in by_tier.items():
        ex = make_executor("slurm", folder / ".submitit", tiers[tier_name],
                           f"{group[0].grid}:{tier_name}", array_parallelism=max_parallel)
        jobs = ex.map_array(CellJob(), group)
        array = [Submission(s, j) for s, j in zip(group, jobs, strict=True)]
        _record(folder, array, "slurm")  # recorded the moment it exists
        subs += array
    return subs


def run_local(specs: Sequence[RunSpec], cluster: Cluster, max_parallel: int,
              tier: Tier, on_done: Callable[[Submission, BaseException | None], None]
              ) -> list[Submission]:
    """Run through submitit's local (subprocess) or debug (in-process) executor, keeping at most
    ``max_parallel`` jobs alive, each with its share of the cores; ``on_done`` is called as each
    finishes (failures included)."""
    from slurm.cell_job import CellJob

    folder = grid_folder(specs)
    pending, running, finished = list(specs), [], []
    try:
        with local_thread_share(max_parallel):
            while pending or running:
                while pending and len(running) < max(1, max_parallel):
                    spec = pending.pop(0)
                    ex = make_executor(cluster, folder / ".submitit", tier,
                                       f"{spec.grid}:{spec.cell}")
                    sub = Submission(spec, ex.submit(CellJob(), spec))
                    _record(folder, [sub], cluster)
                    running.append(sub)
                time.sleep(0.5 if cluster != "debug" else 0)
                for sub in [s for s in running if s.job.done()]:
                    running.remove(sub)
                    finished.append(sub)
                    on_done(sub, _exception(sub))
    except KeyboardInterrupt:
        _stop(running)
        raise
    return finished


def _stop(running: Sequence[Submission]) -> None:
    """Ctrl-C on a local grid stops its workers too (they would otherwise keep training)."""
    for sub in running:
        try:
            sub.job.cancel(check=False)
        except Exception as exc:  # noqa: BLE001 - report and go on stopping the others
            print(f"could not stop {sub.spec.run_id} (job {sub.job.job_id}): {exc}; "
                  f"stop it with: kill {sub.job.job_id}", file=sys.stderr)
            continue
        print(f"stopped {sub.spec.run_id} (job {sub.job.job_id}); rerunning the grid resumes "
              "it from its last checkpoint", file=sys.stderr)


def _exception(sub: Submission) -> BaseException | None:
    try:
        sub.job.result()
    except Exception as exc:  # noqa: BLE001 - reported per cell, the grid goes on
        return exc
    return None
