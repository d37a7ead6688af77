"""Distributed preflight: the layout check passes on a sound launch and fails, in bounded time
and with a reason, on a broken one (wrong world size, missing rank, shared GPU, split master).

Local paths spawn real gloo processes on the CPU; the SLURM tests submit ``PreflightJob``
through the grid's executor to the session's real cluster with two tasks.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm.dist_preflight import (
    Check,
    PreflightResult,
    check_report,
    hard_limit_s,
    run_preflight,
    spawn_local,
)

REPO = Path(__file__).resolve().parents[2]


def _result(rank: int, world: int = 2, device: str = "cpu", port: str = "29500",
            host: str = "node1", uid: str | None = None) -> PreflightResult:
    return PreflightResult(rank=rank, local_rank=rank, world_size=world, expected_world_size=2,
                           host=host, device=device, master_addr="node1", master_port=port,
                           backend="gloo", device_uid=uid, checks=[Check("all_reduce", True)])


# --------------------------------------------------------------------------- verdict logic


def test_report_passes_for_a_sound_layout() -> None:
    ok, report = check_report([_result(0), _result(1)])
    assert ok, report
    assert "PASS" in report and "node1:29500" in report


def test_report_flags_a_gpu_shared_by_two_ranks() -> None:
    ok, report = check_report([_result(0, device="cuda:0", uid="GPU-a"),
                               _result(1, device="cuda:0", uid="GPU-a")])
    assert not ok
    assert "device GPU-a used by ranks [0, 1]" in report
    # Same index on two hosts (or two physical GPUs) is fine.
    ok, _ = check_report([_result(0, device="cuda:0", host="a"),
                          _result(1, device="cuda:0", host="b")])
    assert ok


def test_report_flags_split_master_missing_and_duplicate_ranks() -> None:
    ok, report = check_report([_result(0), _result(0, port="29501")], expected_world_size=3)
    assert not ok
    assert "disagree on MASTER_ADDR:MASTER_PORT" in report
    assert "no report from rank(s) [1, 2] of 3" in report
    assert "rank(s) [0] reported by more than one process" in report


def test_report_flags_ranks_disagreeing_on_the_world_size() -> None:
    ok, report = check_report([_result(0, world=2), _result(1, world=3)])
    assert not ok and "ranks disagree on the world size: rank 0: 2, rank 1: 3" in report


# --------------------------------------------------------------------------- one process


def test_missing_launcher_variables_fail_without_waiting(monkeypatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TORCH_NCCL_BLOCKING_WAIT", "1")  # run_preflight's default, kept local
    t0 = time.monotonic()
    result = run_preflight(expected_world_size=2, timeout_s=5)
    assert time.monotonic() - t0 < 5
    assert not result.ok
    assert "MASTER_ADDR is not set" in result.summary()
    assert "rendezvous: skipped" in result.summary()


def test_world_size_other_than_requested_fails_even_if_collectives_pass(monkeypatch) -> None:
    """All ranks agree on WORLD_SIZE=1 but 2 were requested: collectives succeed (a group of
    one), the verdict must still be FAIL, with the reason."""
    from slurm.dist_preflight import free_port

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("TORCH_NCCL_BLOCKING_WAIT", "1")
    result = run_preflight(expected_world_size=2, timeout_s=10, device="cpu")
    by_name = {c.name: c for c in result.checks}
    assert by_name["all_reduce"].ok and by_name["all_gather"].ok
    assert not by_name["world size"].ok
    assert "WORLD_SIZE=1 but 2 ranks were requested" in by_name["world size"].detail
    ok, report = check_report([result], expected_world_size=2)
    assert not ok and "no report from rank(s) [1] of 2" in report


# --------------------------------------------------------------------------- spawned ranks


def test_cli_two_local_gloo_ranks_pass() -> None:
    """``python -m slurm.dist_preflight --nprocs 2``: two spawned processes, exit 0, a PASS
    table."""
    proc = subprocess.run([sys.executable, "-m", "slurm.dist_preflight", "--nprocs", "2",
                           "--timeout", "20", "--device", "cpu"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "preflight PASS: 2 rank(s)" in out
    rows = [line for line in out.splitlines() if "127.0.0.1:" in line]
    assert len(rows) == 2 and all("PASS" in r and "| cpu " in r for r in rows)
    assert len({r.split("127.0.0.1:")[1].split()[0] for r in rows}) == 1  # one shared port


def test_rank_told_another_world_size_fails_in_bounded_time() -> None:
    """Rank 1 believes the world has 3 ranks: both ranks must report failure (no hang)."""
    timeout_s = 2.0
    t0 = time.monotonic()
    results = spawn_local(2, timeout_s=timeout_s, device="cpu",
                          rank_env={1: {"WORLD_SIZE": "3"}})
    elapsed = time.monotonic() - t0
    # Bounded, not fast: spawning two interpreters that import torch is slow on a loaded machine.
    assert elapsed < 120 + hard_limit_s(timeout_s), elapsed
    ok, report = check_report(results, expected_world_size=2)
    assert not ok
    assert "ranks disagree on the world size: rank 0: 2, rank 1: 3" in report
    by_rank = {r.rank: r for r in results}
    assert "WORLD_SIZE=3 but 2 ranks were requested" in by_rank[1].summary()
    # Rank 0 was told the right size; it fails because its peer never joins properly.
    assert not by_rank[0].ok
    assert any(c.name in ("rendezvous", "all_reduce", "all_gather") and not c.ok
               for c in by_rank[0].checks)
    assert "preflight FAIL" in report


# --------------------------------------------------------------------------- real SLURM


def _cpu_preflight_args(runs: Path) -> list[str]:
    # Two ranks of the tiny recipe (written for one): the plan states its scale-out rule.
    return ["--preflight-dist", "--cluster", "slurm", "--tier", "cpu", "--only", "albef",
            "--seeds", "1", "--runs-root", str(runs), "--set", "train.lr_scaling=none"]


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_preflight_job_with_two_tasks_passes(slurm_env, tmp_path: Path, monkeypatch,
                                                   capsys) -> None:
    """``run_grid.py --preflight-dist`` on the cpu tier with 2 tasks x 1 CPU: one SLURM job,
    two ranks rendezvousing through submitit's TorchDistributedEnvironment."""
    from ablations import run_grid

    monkeypatch.setenv("SOFTMASK_SLURM_TASKS_PER_NODE", "2")
    monkeypatch.setenv("SOFTMASK_SLURM_CPUS_PER_TASK", "1")
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)  # sbatch exports the caller's environment
    assert run_grid.main(_cpu_preflight_args(tmp_path / "runs")) == 0
    out = capsys.readouterr().out
    assert "preflight PASS: 2 rank(s)" in out
    rows = [line for line in out.splitlines() if line.startswith("|") and "PASS" in line]
    assert len(rows) == 2
    assert len(list((tmp_path / "runs").rglob(".preflight/*/*_log.out"))) == 2


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_preflight_reports_an_unusable_environment(slurm_env, tmp_path: Path,
                                                         monkeypatch, capsys) -> None:
    """A MASTER_PORT leaking from the submitting shell breaks the export in every task (the
    cells would crash the same way): non-zero exit and the reason per rank."""
    from ablations import run_grid

    monkeypatch.setenv("SOFTMASK_SLURM_TASKS_PER_NODE", "2")
    monkeypatch.setenv("SOFTMASK_SLURM_CPUS_PER_TASK", "1")
    monkeypatch.setenv("MASTER_PORT", "1234")
    assert run_grid.main(_cpu_preflight_args(tmp_path / "runs")) == 1
    out = capsys.readouterr().out
    assert out.count("MASTER_PORT is already set") == 2
    assert "preflight FAIL" in out
