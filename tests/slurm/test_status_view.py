"""Grid status view: planted run directories (finished, failed, DONE without a result,
running, missing), sacct output parsing, and the state of real jobs read from the session's
SLURM cluster (cancelled, failed, requeued)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from ablations.grid import expand
from slurm.status import (
    DiskView,
    SchedulerView,
    classify,
    format_status,
    grid_status,
    main,
    parse_sacct,
    read_disk,
)

GRID = "softmask_ablation"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


def _train_rows(steps: int) -> list[dict]:
    return [{"kind": "train", "step": s, "loss/total": 10.0 - s, "time_s": 1.5 * s}
            for s in range(1, steps + 1)]


def _submit_record(run_id: str, job_id: str, cluster: str = "local") -> dict:
    cell, seed = run_id.split("__s")[0], int(run_id.split("__s")[1].split("__")[0])
    return {"job_id": job_id, "cluster": cluster, "cell": cell, "seed": seed,
            "run_id": run_id, "tier": "cpu", "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _finished(run_dir: Path) -> None:
    run_dir.mkdir(parents=True)
    _write_jsonl(run_dir / "metrics.jsonl", _train_rows(4) + [{"kind": "eval", "step": 4}])
    (run_dir / "result.json").write_text(json.dumps({"status": "done", "wall_s": 42.0}))
    (run_dir / "DONE").write_text("2024-01-01T00:00:00\n")


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A grid directory with one run in each on-disk situation, submitted locally."""
    grid = tmp_path / GRID
    runs = {
        "finished": "albef__s0__aaaa",
        "failed": "softmask__s0__bbbb",
        "failed_over_done": "softmask__s1__cccc",
        "done_no_result": "focal__s0__dddd",
        "done_bad_result": "focal__s1__eeee",
        "running": "mmda__s0__ffff",
        "missing": "full__s0__0000",
    }
    _finished(grid / runs["finished"])
    failed = grid / runs["failed"]
    failed.mkdir(parents=True)
    _write_jsonl(failed / "metrics.jsonl", _train_rows(3))
    (failed / "FAILED").write_text("RuntimeError: loss is nan at step 3\n\nTraceback (most "
                                   "recent call last):\n  File train.py\nRuntimeError: nan\n")
    log_dir = grid / ".submitit" / "1001"
    log_dir.mkdir(parents=True)
    (log_dir / "1001_0_log.out").write_text("starting\nstep 3\nsubmitit ERROR job raised\n")
    # FAILED next to a DONE and a valid result (e.g. another rank died): still failed.
    _finished(grid / runs["failed_over_done"])
    (grid / runs["failed_over_done"] / "FAILED").write_text("OSError: disk full\n")
    no_result = grid / runs["done_no_result"]
    no_result.mkdir(parents=True)
    (no_result / "DONE").write_text("x\n")
    bad_result = grid / runs["done_bad_result"]
    bad_result.mkdir(parents=True)
    (bad_result / "DONE").write_text("x\n")
    (bad_result / "result.json").write_text('{"status": "do')  # torn write
    running = grid / runs["running"]
    running.mkdir(parents=True)
    _write_jsonl(running / "metrics.jsonl", _train_rows(7))
    with (running / "metrics.jsonl").open("a") as fh:
        fh.write('{"kind": "train", "step": 8, "lo')  # a line cut by a killed job
    _write_jsonl(grid / "submissions.jsonl",
                 [_submit_record(run_id, str(1000 + i)) for i, run_id in enumerate(runs.values())])
    return grid


def _by_run(df) -> dict[str, dict]:
    return {row["run_id"]: row for row in df.to_dict("records")}


def test_planted_runs_get_their_states(planted: Path) -> None:
    rows = _by_run(grid_status(planted))
    assert {r: v["state"] for r, v in rows.items()} == {
        "albef__s0__aaaa": "finished",
        "softmask__s0__bbbb": "failed",
        "softmask__s1__cccc": "failed",
        "focal__s0__dddd": "failed",
        "focal__s1__eeee": "failed",
        "mmda__s0__ffff": "running",
        "full__s0__0000": "missing",
    }
    fin = rows["albef__s0__aaaa"]
    assert (fin["last_step"], fin["last_loss"], fin["elapsed_s"]) == (4, 6.0, 42.0)
    assert fin["tail"] == ""
    failed = rows["softmask__s0__bbbb"]
    assert failed["job_id"] == "1001" and failed["cell"] == "softmask" and failed["seed"] == 0
    assert "loss is nan" in failed["detail"]
    assert "RuntimeError: nan" in failed["tail"] and "submitit ERROR job raised" in failed["tail"]
    assert "disk full" in rows["softmask__s1__cccc"]["tail"]
    assert "no result.json" in rows["focal__s0__dddd"]["detail"]
    assert "unreadable" in rows["focal__s1__eeee"]["detail"]
    run = rows["mmda__s0__ffff"]
    assert (run["last_step"], run["last_loss"], run["elapsed_s"]) == (7, 3.0, 10.5)


def test_planned_runs_from_the_grid_expansion(tmp_path: Path) -> None:
    """With the specs, every planned run is listed first (unstarted ones as missing), with
    the plan's recipe; run directories that are not planned follow, marked as such."""
    specs = expand(preset="tiny", seeds=[0, 1], only=["albef"], runs_root=tmp_path)
    grid = specs[0].run_dir.parent
    _finished(specs[0].run_dir)
    (grid / "other__s0__1234").mkdir()
    df = grid_status(grid, specs=specs)
    assert list(df["run_id"]) == [s.run_id for s in specs] + ["other__s0__1234"]
    assert list(df["state"]) == ["finished", "missing", "running"]
    assert list(df["planned"]) == [True, True, False]
    assert list(df["recipe"][:2]) == [specs[0].fingerprint] * 2
    assert df["job_id"].isna().all()
    text = format_status(df)
    assert "Not in this plan (1 run(s)" in text and f"{specs[0].fingerprint} (2 run(s), this " \
        "plan)" in text


def test_local_job_whose_process_is_gone_is_cancelled_not_running(tmp_path: Path) -> None:
    """A local-executor job dies with the grid process that started it; its run directory has
    no terminal marker, so only the process id tells it apart from a live run."""
    import socket
    import subprocess
    import sys

    gone, elsewhere = (subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(2))
    gone.wait()
    elsewhere.wait()
    grid = tmp_path / GRID
    runs = {"mmda__s0__aaaa": (gone.pid, socket.gethostname()),
            "mmda__s1__bbbb": (os.getpid(), socket.gethostname()),
            "mmda__s2__cccc": (elsewhere.pid, "another-host")}
    for run_id, (pid, host) in runs.items():
        _write_jsonl(grid / run_id / "metrics.jsonl", _train_rows(3))
        _write_jsonl(grid / "submissions.jsonl", [{**_submit_record(run_id, str(pid)),
                                                   "host": host}])
    rows = _by_run(grid_status(grid, query_scheduler=False))
    assert rows["mmda__s0__aaaa"]["state"] == "cancelled"
    assert "local process gone" in rows["mmda__s0__aaaa"]["scheduler"]
    assert rows["mmda__s1__bbbb"]["state"] == "running"  # this test's own process
    assert rows["mmda__s2__cccc"]["state"] == "running"  # another host: cannot tell
    assert "scheduler state unknown" not in rows["mmda__s2__cccc"]["detail"]


def test_finished_local_job_reads_completed_not_cancelled(tmp_path: Path) -> None:
    """A local job exits once its run wrote DONE: the row must not say the job was cancelled."""
    import socket
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    grid = tmp_path / GRID
    run_id = "albef__s0__dddd"
    _finished(grid / run_id)
    _write_jsonl(grid / "submissions.jsonl", [{**_submit_record(run_id, str(gone.pid)),
                                               "host": socket.gethostname()}])
    row = _by_run(grid_status(grid, query_scheduler=False))[run_id]
    assert row["state"] == "finished"
    assert "COMPLETED" in row["scheduler"] and "CANCELLED" not in row["scheduler"]


def test_cli_prints_the_table_and_failed_tails(planted: Path, capsys) -> None:
    assert main([str(planted), "--no-scheduler"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| cell")
    assert "7 run(s): 1 finished, 1 running, 4 failed, 1 missing" in out
    assert "## failed: softmask__s0__bbbb (job 1001)" in out and "RuntimeError: nan" in out
    assert "## failed: albef" not in out and "## failed: mmda" not in out


def test_run_grid_status_flag(tmp_path: Path, capsys) -> None:
    from ablations import run_grid

    specs = expand(preset="tiny", seeds=[0], only=["albef", "focal"], runs_root=tmp_path)
    _finished(specs[0].run_dir)
    rc = run_grid.main(["--status", "--only", "albef", "focal", "--seeds", "1",
                        "--runs-root", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "2 run(s): 1 finished, 1 missing" in out
    assert specs[1].run_id in out


def test_sacct_failure_is_unknown_never_finished(tmp_path: Path, monkeypatch, caplog) -> None:
    """SLURM-submitted runs while sacct cannot answer: the disk decides; nothing unfinished
    becomes finished, and a warning says why."""
    grid = tmp_path / GRID
    started, done, absent = "albef__s0__aaaa", "focal__s0__bbbb", "mmda__s0__cccc"
    (grid / started).mkdir(parents=True)
    _write_jsonl(grid / started / "metrics.jsonl", _train_rows(2))
    _finished(grid / done)
    _write_jsonl(grid / "submissions.jsonl",
                 [_submit_record(r, str(7 + i), "slurm") for i, r in
                  enumerate((started, done, absent))])
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))  # no sacct on this PATH
    with caplog.at_level(logging.WARNING, logger="slurm.status"):
        rows = _by_run(grid_status(grid))
    assert any("sacct failed" in rec.getMessage() for rec in caplog.records)
    assert rows[started]["state"] == "running" and rows[started]["scheduler"] == "unknown"
    assert rows[done]["state"] == "finished"
    assert rows[absent]["state"] == "missing"


# Real sacct -D -P -n --format=JobID,State,ExitCode,Elapsed output of the local cluster.
_SACCT = """\
3|FAILED|1:0|00:00:01
3.batch|FAILED|1:0|00:00:01
3.0|FAILED|1:0|00:00:01
4|CANCELLED by 0|0:0|00:00:06
4.batch|CANCELLED|0:15|00:00:06
4.0|CANCELLED|0:9|00:00:10
10|REQUEUED|0:0|00:00:02
10.batch|CANCELLED|0:15|00:00:02
10.0|CANCELLED|0:15|00:00:02
10|RUNNING|0:0|00:00:04
10.batch|RUNNING|0:0|00:00:04
12_0|COMPLETED|0:0|00:00:05
12_0.batch|COMPLETED|0:0|00:00:05
12_[1-3%2]|PENDING|0:0|00:00:00
13|REQUEUED|0:0|00:01:02
13|PENDING|0:0|00:00:00
"""


def test_parse_sacct_attempts_arrays_and_states() -> None:
    views = parse_sacct(_SACCT, ["3", "4", "10", "12_0", "12_2", "12_7", "13", "99"])
    assert views["3"].category == "failed"
    assert views["4"].category == "cancelled" and views["4"].state == "CANCELLED by 0"
    assert (views["10"].category, views["10"].attempts, views["10"].elapsed_s) == (
        "running", 2, 6.0)
    assert views["10"].requeued and "attempt 2" in views["10"].describe()
    assert views["12_0"].category == "finished"
    assert views["12_2"].category == "pending"  # still inside the array's pending range
    assert "12_7" not in views and "99" not in views
    assert views["13"].category == "requeued"


def test_scheduler_cannot_turn_a_failure_into_a_success(tmp_path: Path) -> None:
    completed = SchedulerView("COMPLETED", "0:0", 5.0, 1, False)
    crashed = SchedulerView("FAILED", "1:0", 5.0, 1, False)
    oom = SchedulerView("OUT_OF_MEMORY", "0:125", 5.0, 1, False)
    assert classify(read_disk(tmp_path / "never-created"), completed)[0] == "failed"
    assert classify(DiskView("failed", "boom"), completed) == ("failed", "boom")
    assert classify(DiskView("bad-done", "no result"), completed)[0] == "failed"
    assert classify(DiskView("started"), completed)[0] == "failed"  # ended without DONE
    assert classify(DiskView("started"), oom)[0] == "failed"
    assert classify(DiskView("done"), crashed)[0] == "failed"
    assert classify(DiskView("done"), completed)[0] == "finished"


def test_format_status_of_an_empty_grid(tmp_path: Path) -> None:
    assert "no runs" in format_status(grid_status(tmp_path))


# --------------------------------------------------------------------------- real SLURM


def _wait_state(grid: Path, run_id: str, states: set[str], timeout_s: float) -> dict:
    deadline = time.time() + timeout_s
    row: dict = {}
    while time.time() < deadline:
        row = _by_run(grid_status(grid))[run_id]
        if row["state"] in states:
            return row
        time.sleep(1)
    raise AssertionError(f"{run_id} never reached {states}; last row: {row}")


def _submit(grid: Path, name: str, fn, *args):
    """A real SLURM job through the grid's executor, recorded as the grid does."""
    from slurm.executor import make_executor
    from slurm.resources import load_tier
    from tests.fixtures_slurm import job_python_path

    executor = make_executor("slurm", grid / ".submitit", load_tier("cpu"), name)
    executor.update_parameters(slurm_setup=job_python_path())
    return executor.submit(fn, *args)


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_cancelled_and_crashed_jobs(slurm_env, tmp_path: Path) -> None:
    """A cancelled job is "cancelled" (from sacct), a job that died without a FAILED marker
    is "failed" with the traceback from its submitit log: neither is ever "finished"."""
    from tests.fixtures_slurm import ResumableSquares, wait_until

    grid = tmp_path / GRID
    grid.mkdir()
    victim, crash = "albef__s0__aaaa", "focal__s0__bbbb"
    (grid / victim).mkdir()
    progress = grid / victim / "progress.txt"
    long_job = _submit(grid, "victim", ResumableSquares(), str(progress), 600, 0.5)
    # steps=None: the job raises a TypeError before writing anything.
    bad_job = _submit(grid, "crash", ResumableSquares(), str(tmp_path / "p2.txt"), None, 0.1)
    _write_jsonl(grid / "submissions.jsonl", [_submit_record(victim, long_job.job_id, "slurm"),
                                              _submit_record(crash, bad_job.job_id, "slurm")])
    wait_until(progress.exists, 60, "the long job to start")
    _write_jsonl(grid / victim / "metrics.jsonl", _train_rows(2))
    # Accounting learns of the start a moment after the job writes: poll.
    _wait_state(grid, victim, {"running"}, 30)
    long_job.cancel()
    row = _wait_state(grid, victim, {"cancelled"}, 60)
    assert "CANCELLED" in row["scheduler"] and row["job_id"] == long_job.job_id
    assert row["last_step"] == 2
    row = _wait_state(grid, crash, {"failed", "finished"}, 60)
    assert row["state"] == "failed" and "FAILED" in row["scheduler"]
    assert "TypeError" in row["tail"]
    # Without the scheduler, the disk alone cannot see the cancellation: never "finished".
    offline = _by_run(grid_status(grid, query_scheduler=False))
    assert offline[victim]["state"] == "running" and offline[crash]["state"] == "missing"


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_requeued_job(slurm_env, tmp_path: Path) -> None:
    """A preempted (SIGUSR2) checkpointable job is requeued: sacct shows a second attempt."""
    from tests.fixtures_slurm import ResumableSquares, read_progress, wait_until

    grid = tmp_path / GRID
    run_id = "softmask__s0__cccc"
    (grid / run_id).mkdir(parents=True)
    progress = grid / run_id / "progress.txt"
    job = _submit(grid, "requeue", ResumableSquares(), str(progress), 40, 0.5)
    _write_jsonl(grid / "submissions.jsonl", [_submit_record(run_id, job.job_id, "slurm")])
    wait_until(lambda: len([e for e in read_progress(progress) if e[0] == "step"]) >= 2, 60,
               "the job to start")
    job._interrupt()
    seen: list[tuple[str, str]] = []
    deadline = time.time() + 60
    while time.time() < deadline:
        row = _by_run(grid_status(grid))[run_id]
        seen.append((row["state"], row["scheduler"]))
        if row["state"] == "running" and "attempt 2" in row["scheduler"]:
            break
        time.sleep(0.3)
    job.cancel()
    assert seen[-1][0] == "running" and "attempt 2" in seen[-1][1], seen
    # Between the attempts the run reads "requeued" (REQUEUED, then PENDING again).
    assert "requeued" in {state for state, _ in seen}, seen
