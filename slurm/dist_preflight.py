"""Distributed preflight: check the process layout before a grid is launched.

Every rank reports what it sees (rank, local rank, world size, host, device, rendezvous
address) and runs two tiny collectives; ``check_report`` then cross-checks the reports: every
rank present once, one task per device, one shared ``MASTER_ADDR:MASTER_PORT``, the requested
world size everywhere, ``all_reduce`` of the ranks = n(n-1)/2 and ``all_gather`` = [0..n-1].

A misconfigured launch (a rank given another world size, a missing rank, an unreachable
master) must fail with a message rather than hang, so the process group is created with a
timeout and every collective is waited on with one.

Entry points::

    python -m slurm.dist_preflight --nprocs 2          # N local processes (gloo on CPU)
    python ablations/run_grid.py --preflight-dist --cluster slurm [--tier T]

The second submits ``PreflightJob`` through ``slurm.executor.make_executor`` with the grid's
tier, i.e. exactly the resources and environment export the cells get.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import queue
import re
import socket
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from model.engine.distributed import cleanup_distributed, init_distributed
from slurm.resources import Tier

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0
# The preflight job's own time limit (minutes): enough for a slow rendezvous, far below a
# cell's limit, so a hung preflight frees the allocation quickly.
JOB_TIMEOUT_MIN = 10
# Spawned processes import torch before they rendezvous; this allowance is on top of the
# rendezvous and collective timeouts.
_SPAWN_STARTUP_S = 60.0
_LAYOUT_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Check:
    """One named check of one rank: passed or failed, with the reason."""

    name: str
    ok: bool
    detail: str = ""


@dataclass
class PreflightResult:
    """What one rank saw and which of its checks passed (picklable: returned by SLURM tasks)."""

    rank: int | None
    local_rank: int | None
    world_size: int | None
    expected_world_size: int | None
    host: str
    device: str
    master_addr: str | None
    master_port: str | None
    backend: str | None = None
    device_uid: str | None = None  # physical identity (CUDA UUID) when known
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def master(self) -> str:
        return f"{self.master_addr or '?'}:{self.master_port or '?'}"

    def failures(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if not c.ok]

    def summary(self) -> str:
        """One line: every failed check with its reason, or how many passed."""
        if self.ok:
            return f"{len(self.checks)} checks passed"
        return "; ".join(self.failures()) or "no checks ran"


def no_report(rank: int | None, reason: str, expected_world_size: int | None = None,
              host: str = "?", check: str = "report") -> PreflightResult:
    """The result standing in for a rank that could not run the checks (crashed, killed,
    never started, or without a usable environment)."""
    return PreflightResult(rank=rank, local_rank=None, world_size=None,
                           expected_world_size=expected_world_size, host=host, device="?",
                           master_addr=None, master_port=None,
                           checks=[Check(check, False, reason)])


# --------------------------------------------------------------------------- one rank


def _error(exc: BaseException) -> str:
    """A one-line reason (pandas tables and logs read badly with multi-line messages)."""
    # Drop torch's C++ source locations ("[/path/pair.h:311]"): noise in a report.
    text = " ".join(re.sub(r"\[/[^\]]*\]", "", str(exc)).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _read_layout(env: Mapping[str, str]) -> tuple[dict[str, Any], list[Check]]:
    """The launcher's variables, parsed; a check fails for each missing or malformed one."""
    values: dict[str, Any] = {key: env.get(key) for key in _LAYOUT_VARS}
    problems = [f"{key} is not set" for key in _LAYOUT_VARS if not env.get(key)]
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        if env.get(key):
            try:
                values[key] = int(env[key])
            except ValueError:
                problems.append(f"{key}={env[key]!r} is not an integer")
                values[key] = None
    rank, world = values["RANK"], values["WORLD_SIZE"]
    if isinstance(rank, int) and isinstance(world, int) and not 0 <= rank < world:
        problems.append(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
    if isinstance(values["LOCAL_RANK"], int) and values["LOCAL_RANK"] < 0:
        problems.append(f"LOCAL_RANK={values['LOCAL_RANK']} is negative")
    detail = "; ".join(problems) or ", ".join(f"{k}={env[k]}" for k in _LAYOUT_VARS)
    return values, [Check("environment", not problems, detail)]


def _world_check(world: int | None, expected: int | None) -> Check:
    if expected is None:
        return Check("world size", world is not None, f"WORLD_SIZE={world} (nothing requested)")
    if world != expected:
        return Check("world size", False, f"WORLD_SIZE={world} but {expected} ranks were "
                     "requested")
    return Check("world size", True, f"{world} as requested")


def _cuda_uid(index: int) -> str | None:
    """The physical GPU's UUID: with per-task CUDA_VISIBLE_DEVICES, indices alone can collide."""
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return str(uuid) if uuid is not None else None


def _select_device(local_rank: int | None, device: str | None
                   ) -> tuple[torch.device | None, str | None, Check]:
    """The rank's device, chosen as ``init_distributed`` does: GPU ``local_rank`` or the CPU."""
    if not torch.cuda.is_available() or device == "cpu":
        return torch.device("cpu"), None, Check("device", True, "cpu")
    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    if local_rank is None or not 0 <= local_rank < count:
        return None, None, Check("device", False, f"LOCAL_RANK={local_rank} but {count} CUDA "
                                 f"device(s) are visible (CUDA_VISIBLE_DEVICES={visible})")
    dev = torch.device("cuda", local_rank)
    torch.cuda.set_device(dev)
    name = torch.cuda.get_device_name(dev)
    return dev, _cuda_uid(local_rank), Check("device", True, f"{dev} ({name})")


def _init_group(backend: str, rank: int, world: int, timeout_s: float) -> Check:
    """Create the default group with the preflight's own short timeout (torch's default would
    leave a misconfigured rank waiting for half an hour); the result is a finding, not a raise."""
    try:
        dist.init_process_group(backend=backend, init_method="env://", rank=rank,
                                world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as exc:  # noqa: BLE001 - any rendezvous failure is the finding itself
        return Check("rendezvous", False, f"no process group (timeout {timeout_s:.0f} s): "
                     f"{_error(exc)} (a rank missing, given another world size, or "
                     "MASTER_ADDR:MASTER_PORT unreachable)")
    return Check("rendezvous", True, f"{backend} group of {dist.get_world_size()}")


def _project_init_check(rank: int, world: int, dev: torch.device, device: str | None
                        ) -> Check:
    """The project's own ``init_distributed`` must resolve the same rank, size and device."""
    try:
        info = init_distributed(device)
    except Exception as exc:  # noqa: BLE001 - reported as this rank's failure
        return Check("init_distributed", False, _error(exc))
    seen = (info.rank, info.world_size, str(info.device))
    want = (rank, world, str(dev))
    if seen != want:
        return Check("init_distributed", False, f"resolved rank/world/device {seen}, "
                     f"expected {want}")
    return Check("init_distributed", True, f"rank {info.rank}/{info.world_size} on {dev}")


def _wait(work: Any, timeout_s: float) -> None:
    work.wait(timeout=datetime.timedelta(seconds=timeout_s))


def _all_reduce_check(rank: int, dev: torch.device, timeout_s: float) -> Check:
    n = dist.get_world_size()
    value = torch.tensor([rank], dtype=torch.int64, device=dev)
    try:
        _wait(dist.all_reduce(value, op=dist.ReduceOp.SUM, async_op=True), timeout_s)
        total = int(value.item())
    except Exception as exc:  # noqa: BLE001 - a hung or broken collective is the finding
        return Check("all_reduce", False, f"did not complete within {timeout_s:.0f} s: "
                     f"{_error(exc)} (another rank missing or given a different world size?)")
    expected = n * (n - 1) // 2
    return Check("all_reduce", total == expected,
                 f"sum of ranks = {total}" + ("" if total == expected else f", expected "
                                              f"{expected}"))


def _all_gather_check(rank: int, dev: torch.device, timeout_s: float) -> Check:
    n = dist.get_world_size()
    mine = torch.tensor([rank], dtype=torch.int64, device=dev)
    parts = [torch.full_like(mine, -1) for _ in range(n)]
    try:
        _wait(dist.all_gather(parts, mine, async_op=True), timeout_s)
        got = [int(p.item()) for p in parts]
    except Exception as exc:  # noqa: BLE001 - a hung or broken collective is the finding
        return Check("all_gather", False, f"did not complete within {timeout_s:.0f} s: "
                     f"{_error(exc)}")
    expected = list(range(n))
    return Check("all_gather", got == expected,
                 f"{got}" + ("" if got == expected else f", expected {expected}"))


_STEPS = ("rendezvous", "init_distributed", "all_reduce", "all_gather")


def _collective_checks(rank: int, world: int, dev: torch.device, device: str | None,
                       backend: str, timeout_s: float, out: list[Check]) -> None:
    """Rendezvous, the project's init path, then the two collectives, appended to ``out`` as
    they finish (each only if the previous one passed: later ones would only add noise)."""
    out.append(_init_group(backend, rank, world, timeout_s))
    if not out[-1].ok:
        return
    try:
        out.append(_project_init_check(rank, world, dev, device))
        out.append(_all_reduce_check(rank, dev, timeout_s))
        if out[-1].ok:
            out.append(_all_gather_check(rank, dev, timeout_s))
    finally:
        cleanup_distributed()


def hard_limit_s(timeout_s: float) -> float:
    """Wall-clock bound of the distributed part of one rank's preflight.

    The rendezvous and each collective have ``timeout_s``; in the worst legitimate case the
    rendezvous and one collective use it all. Gloo's connection set-up retries several times
    over (measured: about 5 x the group timeout when a peer gives up mid-connect), which this
    bound cuts short.
    """
    return 2 * timeout_s + min(5.0, timeout_s)


def _bounded_collectives(rank: int, world: int, dev: torch.device, device: str | None,
                         backend: str, timeout_s: float) -> list[Check]:
    """``_collective_checks`` in a daemon thread, abandoned after ``hard_limit_s``."""
    out: list[Check] = []
    worker = threading.Thread(target=_collective_checks, daemon=True, name="preflight-dist",
                              args=(rank, world, dev, device, backend, timeout_s, out))
    worker.start()
    limit = hard_limit_s(timeout_s)
    worker.join(limit)
    if worker.is_alive():
        step = _STEPS[min(len(out), len(_STEPS) - 1)]
        out.append(Check(step, False, f"still blocked after {limit:.0f} s; abandoned (a rank "
                         "missing, given another world size, or unreachable)"))
    return list(out)


def run_preflight(expected_world_size: int | None = None,
                  timeout_s: float = DEFAULT_TIMEOUT_S,
                  device: str | None = None) -> PreflightResult:
    """Check this process's place in the distributed layout; call it in every rank.

    Reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (exported by torchrun,
    ``spawn_local`` or submitit's ``TorchDistributedEnvironment``), picks the device as
    training does (GPU ``LOCAL_RANK``, NCCL; else CPU, gloo), joins the group and runs one
    ``all_reduce`` and one ``all_gather``. Never raises for a layout problem: each one is a
    failed check with its reason, so every rank's report reaches ``check_report``.
    """
    # NCCL otherwise enforces collective timeouts only in its watchdog; blocking wait makes
    # ``Work.wait(timeout)`` return control with an error instead.
    os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
    values, checks = _read_layout(os.environ)
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    checks.append(_world_check(world, expected_world_size))
    dev, uid, dev_check = _select_device(local, device)
    checks.append(dev_check)
    backend = None
    if dev is not None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    result = PreflightResult(
        rank=rank, local_rank=local, world_size=world, expected_world_size=expected_world_size,
        host=socket.gethostname(), device=str(dev) if dev is not None else "?",
        master_addr=values["MASTER_ADDR"],
        master_port=None if values["MASTER_PORT"] is None else str(values["MASTER_PORT"]),
        backend=backend, device_uid=uid, checks=checks)
    if not all(c.ok for c in checks if c.name != "world size") or dev is None:
        # Without a valid layout the rendezvous can only hang or fail obscurely.
        checks.append(Check("rendezvous", False, "skipped: fix the checks above first"))
        return result
    checks += _bounded_collectives(rank, world, dev, device, backend, timeout_s)
    log.info("preflight rank %s: %s", rank, result.summary())
    return result


# --------------------------------------------------------------------------- verdict


def _cross_rank_problems(results: Sequence[PreflightResult], expected: int | None
                         ) -> list[str]:
    """Problems only visible across ranks: missing or duplicate ranks, disagreement on the
    world size or the master, two ranks on one device."""
    problems: list[str] = []
    reported = [r for r in results if r.rank is not None]
    worlds = {r.world_size for r in reported if r.world_size is not None}
    if len(worlds) > 1:
        problems.append("ranks disagree on the world size: " + ", ".join(
            f"rank {r.rank}: {r.world_size}" for r in reported))
    n = expected if expected is not None else (max(worlds) if worlds else len(results))
    by_rank: dict[int, int] = defaultdict(int)
    for r in reported:
        by_rank[r.rank] += 1
    missing = sorted(set(range(n)) - set(by_rank))
    if missing:
        problems.append(f"no report from rank(s) {missing} of {n}")
    dup = sorted(k for k, c in by_rank.items() if c > 1)
    if dup:
        problems.append(f"rank(s) {dup} reported by more than one process")
    masters = {r.master for r in reported if r.master_addr}
    if len(masters) > 1:
        problems.append(f"ranks disagree on MASTER_ADDR:MASTER_PORT: {sorted(masters)}")
    problems += _shared_devices(reported)
    return problems


def _shared_devices(results: Sequence[PreflightResult]) -> list[str]:
    """GPUs used by more than one rank (CPU ranks share the host by design)."""
    users: dict[tuple[str, str], list[int]] = defaultdict(list)
    for r in results:
        if r.device.startswith("cuda"):
            users[(r.host, r.device_uid or r.device)].append(r.rank)
    return [f"{host}: device {uid} used by ranks {ranks} (one task per GPU expected)"
            for (host, uid), ranks in sorted(users.items()) if len(ranks) > 1]


def _table(results: Sequence[PreflightResult]) -> str:
    import pandas as pd

    rows = [{"rank": r.rank, "local rank": r.local_rank, "world": r.world_size,
             "host": r.host, "device": r.device, "master": r.master,
             "result": "PASS" if r.ok else "FAIL", "checks": r.summary()}
            for r in sorted(results, key=lambda r: (r.rank is None, r.rank or 0))]
    return pd.DataFrame(rows).to_markdown(index=False)


def check_report(results: Sequence[PreflightResult], expected_world_size: int | None = None
                 ) -> tuple[bool, str]:
    """Combine the per-rank results into one verdict: (all passed, Markdown report)."""
    if expected_world_size is None:
        wanted = {r.expected_world_size for r in results if r.expected_world_size is not None}
        expected_world_size = wanted.pop() if len(wanted) == 1 else None
    problems = _cross_rank_problems(results, expected_world_size)
    ok = bool(results) and not problems and all(r.ok for r in results)
    lines = [_table(results)] if results else ["(no rank reported)"]
    if problems:
        lines += ["", "Cross-rank problems:"] + [f"- {p}" for p in problems]
    failed = [r for r in results if not r.ok]
    verdict = (f"PASS: {len(results)} rank(s), every check passed" if ok else
               f"FAIL: {len(failed)} of {len(results)} rank(s) failed a check"
               + (f", {len(problems)} cross-rank problem(s)" if problems else ""))
    return ok, "\n".join(lines + ["", f"preflight {verdict}"])


# --------------------------------------------------------------------------- local spawn


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _local_worker(rank: int, env: dict[str, str], expected: int | None, timeout_s: float,
                  device: str | None, results: Any) -> None:
    """One spawned rank: its variables, then the preflight; the result goes to the parent."""
    os.environ.update(env)
    torch.set_num_threads(1)  # N ranks on a shared machine: no oversubscription
    try:
        result = run_preflight(expected, timeout_s, device)
    except Exception as exc:  # noqa: BLE001 - the parent must get a report, not a silence
        result = no_report(rank, f"preflight raised {_error(exc)}", expected,
                           socket.gethostname())
    results.put((rank, result))


def _rank_env(rank: int, nprocs: int, port: int,
              extra: Mapping[int, Mapping[str, str]] | None) -> dict[str, str]:
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
           "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nprocs), "LOCAL_WORLD_SIZE": str(nprocs)}
    env.update((extra or {}).get(rank, {}))
    return env


def _collect(procs: Sequence[Any], results: Any, deadline: float) -> dict[int, PreflightResult]:
    """Reports by process index until all arrived, all processes ended, or the deadline."""
    got: dict[int, PreflightResult] = {}
    while len(got) < len(procs) and time.monotonic() < deadline:
        try:
            res = results.get(timeout=0.5)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                break
            continue
        index, result = res
        got[index] = result
    return got


def spawn_local(nprocs: int, expected_world_size: int | None = None,
                timeout_s: float = 30.0, device: str | None = None,
                rank_env: Mapping[int, Mapping[str, str]] | None = None
                ) -> list[PreflightResult]:
    """Run the preflight in ``nprocs`` fresh local processes (MASTER_ADDR=127.0.0.1, a free
    port). ``rank_env`` adds or replaces variables of given ranks, e.g. to rehearse a launch
    where one rank is told another world size. Processes still alive after the deadline are
    killed and reported as such."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    expected = nprocs if expected_world_size is None else expected_world_size
    procs = [ctx.Process(target=_local_worker, daemon=True,
                         args=(r, _rank_env(r, nprocs, port, rank_env), expected, timeout_s,
                               device, results)) for r in range(nprocs)]
    for p in procs:
        p.start()
    budget = _SPAWN_STARTUP_S + hard_limit_s(timeout_s)
    got = _collect(procs, results, time.monotonic() + budget)
    reports: list[PreflightResult] = []
    for index, proc in enumerate(procs):
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
            reason = f"no report within {budget:.0f} s; process killed"
        else:
            reason = f"process exited with code {proc.exitcode} without a report"
        reports.append(got[index] if index in got
                       else no_report(index, reason, expected, socket.gethostname()))
    results.close()
    return reports


# --------------------------------------------------------------------------- SLURM / submitit


class PreflightJob:
    """The preflight as a submitit callable: one call per task of a multi-task job.

    Lives in an importable module because submitit pickles it by reference. The distributed
    variables come from SLURM through the same ``TorchDistributedEnvironment.export`` call
    the cells use, so a passing preflight vouches for the cells' layout.
    """

    def __call__(self, expected_world_size: int | None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> PreflightResult:
        import submitit

        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            submitit.helpers.TorchDistributedEnvironment().export(
                set_cuda_visible_devices=False)
        except RuntimeError as exc:  # e.g. MASTER_PORT inherited from the submitting shell
            env = submitit.JobEnvironment()
            return no_report(env.global_rank, f"cannot export the distributed variables: "
                             f"{_error(exc)}", expected_world_size, socket.gethostname(),
                             check="environment")
        return run_preflight(expected_world_size, timeout_s)


def preflight_tier(tier: Tier) -> Tier:
    """The grid's tier with a short time limit: same nodes, tasks, GPUs and CPUs."""
    return dataclasses.replace(tier, timeout_min=min(tier.timeout_min, JOB_TIMEOUT_MIN))


def _task_results(job: Any, ntasks: int, expected: int | None) -> list[PreflightResult]:
    """Every task's result; a task that crashed or was killed becomes a failed report."""
    out: list[PreflightResult] = []
    for task in range(ntasks):
        try:
            out.append(job.task(task).result())
        except Exception as exc:  # noqa: BLE001 - one task's failure must not hide the rest
            out.append(no_report(task, f"job {job.job_id} task {task}: {_error(exc)}",
                                 expected))
    return out


def submit_preflight(cluster: str, folder: str | Path, tier: Tier, name: str,
                     timeout_s: float = DEFAULT_TIMEOUT_S,
                     on_submit: Callable[[Any], None] | None = None) -> list[PreflightResult]:
    """Submit ``PreflightJob`` with ``tier``'s resources and wait for every task's report.

    ``cluster``: "slurm" (the grid's SLURM path) or "local" (submitit's local executor with
    the same number of tasks). ``on_submit`` receives the job once queued (to print its id).
    """
    from slurm.executor import make_executor

    executor = make_executor(cluster, folder, preflight_tier(tier), name)  # type: ignore[arg-type]
    job = executor.submit(PreflightJob(), tier.world_size, timeout_s)
    log.info("preflight job %s: %d task(s) on tier %s", job.job_id, tier.world_size, name)
    if on_submit is not None:
        on_submit(job)
    return _task_results(job, tier.world_size, tier.world_size)


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m slurm.dist_preflight", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nprocs", type=int, default=2, help="local processes to spawn")
    p.add_argument("--world-size", type=int, default=None,
                   help="the world size the ranks must see (default: --nprocs)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds allowed for the rendezvous and for each collective")
    p.add_argument("--device", choices=("auto", "cpu"), default="auto",
                   help="cpu: gloo on the CPU even where CUDA is available")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.nprocs < 1:
        print("error: --nprocs must be at least 1", file=sys.stderr)
        return 2
    results = spawn_local(args.nprocs, args.world_size, args.timeout,
                          None if args.device == "auto" else args.device)
    ok, report = check_report(results, args.world_size or args.nprocs)
    print(report)
    return 0 if ok else 1


if __name__ == "__main__":
    # Re-enter through the package so spawned ranks unpickle ``slurm.dist_preflight`` objects
    # (not ``__main__`` ones).
    from slurm.dist_preflight import main as _main

    sys.exit(_main())
