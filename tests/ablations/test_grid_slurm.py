"""The grid through submitit on a real SLURM cluster started by the test session:
a smoke grid, preemption with requeue and exact resume, and cancellation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ablations import run_grid
from ablations.grid import expand
from model.cell.pipeline import run_cell
from slurm.launch import submit_slurm
from slurm.resources import load_tier
from tests.fixtures_slurm import wait_until
from tests.tiny import tiny_grid_sets

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if r["kind"] == "train"]


def test_slurm_smoke_grid_collects_tables(slurm_env, tmp_path: Path, synthetic_cache: Path,
                                          capsys) -> None:
    runs, out = tmp_path / "runs", tmp_path / "results"
    args = ["--cluster", "slurm", "--wait", "--tier", "cpu", "--only", "albef", "softmask",
            "full", "--seeds", "1", "--runs-root", str(runs), "--results-out", str(out)]
    for item in tiny_grid_sets(synthetic_cache):
        args += ["--set", item]
    assert run_grid.main(args) == 0
    grid = runs / "softmask_ablation"
    assert len(list(grid.glob("*/DONE"))) == 3
    lines = (grid / "submissions.jsonl").read_text().splitlines()
    assert {json.loads(x)["cell"] for x in lines} == {"albef", "softmask", "full"}
    assert all(json.loads(x)["cluster"] == "slurm" for x in lines)
    md = (out / "generated" / "component_ablation.md").read_text()
    assert md.count("(n=1)") >= 3 * 2
    # Collect-only regenerates the same tables without submitting anything.
    capsys.readouterr()
    assert run_grid.main(args[:2] + ["--collect-only"] + args[2:]) == 0
    assert "submitted" not in capsys.readouterr().out


def test_slurm_preemption_requeues_and_resumes_exactly(slurm_env, tmp_path: Path,
                                                       synthetic_cache: Path) -> None:
    sets = tiny_grid_sets(synthetic_cache, epochs=6) + ["train.checkpoint_every=4"]
    (spec,) = expand(preset="tiny", seeds=[0], only=["softmask"], sets=sets,
                     runs_root=tmp_path / "runs")
    (sub,) = submit_slurm([spec], max_parallel=None, tier_override=load_tier("cpu"))
    wait_until(lambda: max(_train_steps(spec.run_dir), default=0) >= 10, 120, "training progress")
    sub.job._interrupt()  # SIGUSR2 -> submitit calls CellJob.checkpoint -> requeue
    result = sub.job.result()  # waits through the requeue
    steps = _train_steps(spec.run_dir)
    assert result["status"] == "done" and result["resumed_from"] is not None
    assert 0 < result["resumed_from"] < max(steps)
    # The resume starts at a checkpoint (every 4 steps) and no step is skipped. Whether the first
    # attempt logged steps past that checkpoint before the signal landed is a race, so the
    # re-run step may appear once or twice.
    assert result["resumed_from"] % 4 == 0
    assert sorted(set(steps)) == list(range(1, max(steps) + 1))
    assert steps.count(result["resumed_from"] + 1) in (1, 2)
    log = "\n".join(p.read_text() for p in (spec.run_dir.parent / ".submitit").rglob("*.out"))
    assert "preempted or timed out" in log
    # The same cell run uninterrupted, in this process, ends with identical metrics.
    reference = run_cell(spec.config, tmp_path / "reference" / spec.run_id,
                         identity=spec.identity(), protocols=spec.protocols_file)
    assert reference["metrics"] == result["metrics"]
    assert reference["last_losses"]["loss/total"] == result["last_losses"]["loss/total"]


def test_slurm_cancelled_cell_loses_nothing_else(slurm_env, tmp_path: Path,
                                                 synthetic_cache: Path) -> None:
    sets = tiny_grid_sets(synthetic_cache)
    specs = expand(preset="tiny", seeds=[0], only=["albef", "focal"], sets=sets,
                   runs_root=tmp_path / "runs")
    long = expand(preset="tiny", seeds=[0], only=["mmda"],
                  sets=tiny_grid_sets(synthetic_cache, epochs=200), runs_root=tmp_path / "runs")
    subs = submit_slurm(specs + long, max_parallel=None, tier_override=load_tier("cpu"))
    victim = subs[-1]
    wait_until(lambda: bool(_train_steps(victim.spec.run_dir)), 120, "the long cell to start")
    victim.job.cancel()
    for s in subs[:-1]:
        assert s.job.result()["status"] == "done"
    out = tmp_path / "results"
    rc = run_grid.main(["--collect-only", "--only", "albef", "focal", "mmda", "--seeds", "1",
                        "--runs-root", str(tmp_path / "runs"), "--results-out", str(out)]
                       + [x for item in sets for x in ("--set", item)])
    assert rc == 0
    table = (out / "generated" / "component_ablation.md").read_text()
    mmda_row = next(line for line in table.splitlines() if line.startswith("| mmda "))
    # The long cell ran under another grid recipe (200 epochs): never compared, and named.
    assert "—" in mmda_row and "excluded" in mmda_row
    assert "mmda s0" in table.splitlines()[0] and "train.epochs 200 vs 2" in table
    # Its own recipe's table shows it cancelled mid-run: no result, marked.
    (variant,) = [p for p in (out / "generated").iterdir() if p.is_dir()]
    table = (variant / "component_ablation.md").read_text()
    mmda_row = next(line for line in table.splitlines() if line.startswith("| mmda "))
    assert "—" in mmda_row and "running" in mmda_row


def test_a_second_submission_of_a_queued_or_running_run_is_skipped(
        slurm_env, tmp_path: Path, synthetic_cache: Path, capsys) -> None:
    """Submitting the same grid twice on SLURM must not train one run twice at once."""
    runs = tmp_path / "runs"
    args = ["--cluster", "slurm", "--tier", "cpu", "--only", "albef", "--seeds", "1",
            "--runs-root", str(runs), "--results-out", str(tmp_path / "out")]
    for item in tiny_grid_sets(synthetic_cache, epochs=6):
        args += ["--set", item]
    assert run_grid.main(args) == 0  # submitted, not waited for
    first = capsys.readouterr().out
    assert "submitted albef__s0__" in first
    assert run_grid.main(args) == 0
    second = capsys.readouterr().out
    assert "skipping albef__s0__" in second and "submitted" not in second
    lines = (runs / "softmask_ablation" / "submissions.jsonl").read_text().splitlines()
    assert len(lines) == 1
    (spec,) = expand(preset="tiny", seeds=[0], only=["albef"],
                     sets=tiny_grid_sets(synthetic_cache, epochs=6), runs_root=runs)
    wait_until(lambda: (spec.run_dir / "DONE").exists(), 300, "the first submission to finish")
