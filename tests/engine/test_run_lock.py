"""One trainer per run directory: the lock, its stale case, the trainer's refusal and the
grid's skip of runs that something is working on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ablations import run_grid
from ablations.grid import expand
from model.cell.pipeline import run_cell
from model.config.experiment import load_experiment
from model.engine.run_lock import RunLock, RunLocked, lock_holder
from tests.tiny import tiny_grid_sets

REPO = Path(__file__).resolve().parents[2]
_HOLD = """
import sys, time
from model.engine.run_lock import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def _holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_is_exclusive_names_its_holder_and_is_released(tmp_path: Path) -> None:
    with RunLock(tmp_path):
        assert f"pid {os.getpid()}" in (lock_holder(tmp_path) or "")
        with pytest.raises(RunLocked, match=rf"pid {os.getpid()} on "):
            RunLock(tmp_path).__enter__()
    assert lock_holder(tmp_path) is None
    with RunLock(tmp_path):  # free again
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    assert f"pid {proc.pid}" in (lock_holder(tmp_path) or "")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert lock_holder(tmp_path) is None  # the lock file is still there, the lock is not
    with RunLock(tmp_path):
        pass


def test_a_second_trainer_on_one_run_stops_before_touching_it(tmp_path: Path,
                                                               synthetic_cache: Path) -> None:
    cfg = load_experiment(preset="tiny", sets=[*tiny_grid_sets(synthetic_cache),
                                               "train.max_steps=2"])
    run_dir = tmp_path / "run"
    proc = _holder(run_dir)
    try:
        with pytest.raises(RunLocked, match=rf"pid {proc.pid}"):
            run_cell(cfg, run_dir)
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # no FAILED, no metrics
    finally:
        proc.kill()
        proc.wait()
    assert run_cell(cfg, run_dir)["status"] == "done"  # the holder is gone: it runs


def test_the_grid_skips_a_run_that_is_being_trained(tmp_path: Path, capsys,
                                                     synthetic_cache: Path) -> None:
    runs = tmp_path / "runs"
    sets = tiny_grid_sets(synthetic_cache)
    (spec,) = expand(preset="tiny", seeds=[0], only=["albef"], sets=sets, runs_root=runs)
    proc = _holder(spec.run_dir)
    try:
        assert set(run_grid.alive_runs([spec])) == {spec.run_id}
        args = ["--only", "albef", "--runs-root", str(runs), "--no-preflight",
                "--results-out", str(tmp_path / "out"), *sum((["--set", s] for s in sets), [])]
        run_grid.main(args)
        out = capsys.readouterr().out
        assert f"skipping {spec.run_id}: trained by pid {proc.pid}" in out
        assert not (spec.run_dir / "DONE").exists()
    finally:
        proc.kill()
        proc.wait()
    time.sleep(0.1)
    assert run_grid.alive_runs([spec]) == {}


def test_alive_runs_with_a_submitted_run_beside_a_new_one(tmp_path: Path,
                                                          synthetic_cache: Path) -> None:
    """A second invocation adding a cell to a folder with earlier submissions: the new run has
    no job id yet (a missing value in the status frame) and must not break the liveness check
    (it crashed the grid before any job was submitted)."""
    from slurm.launch import grid_folder

    runs = tmp_path / "runs"
    sets = tiny_grid_sets(synthetic_cache)
    old, new = expand(preset="tiny", seeds=[0], only=["albef", "softmask"], sets=sets,
                      runs_root=runs)
    grid_dir = grid_folder([old])
    grid_dir.mkdir(parents=True, exist_ok=True)
    record = {"job_id": "999999", "cluster": "slurm", "cell": old.cell, "seed": 0,
              "run_id": old.run_id, "tier": "cpu", "time": "2026-01-01T00:00:00"}
    (grid_dir / "submissions.jsonl").write_text(json.dumps(record) + "\n")
    assert run_grid.alive_runs([old, new]) == {}  # job 999999 is in no queue
