"""A finite blow-up (the loss far above its early value, never NaN) finishes but is marked
``diverged`` in result.json, the status view and the tables, which never show its numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.cell.pipeline import run_cell
from model.config.experiment import experiment_hash, load_experiment
from model.config.loader import ConfigError
from model.engine.guard import detect_blowup
from results.collect import collect_runs
from results.tables import build_tables
from slurm.status import grid_status
from tests.tiny import tiny_grid_sets


def _rows(losses: list[float]) -> list[dict[str, float]]:
    return [{"step": 10 * i + 1, "loss/total": v} for i, v in enumerate(losses)]


def test_detect_blowup_against_the_early_loss() -> None:
    assert detect_blowup(_rows([13.0, 11.0, 9.0, 6.0, 5.0, 5.5]), 10.0) is None
    hit = detect_blowup(_rows([13.0, 11.0, 9.0, 85.0, 140.0]), 10.0)
    assert hit == {"step": 41, "loss": 140.0, "early_loss": 9.0, "factor": 10.0}
    # A blow-up inside the early window is caught against its smallest value.
    assert detect_blowup(_rows([13.2, 4120.3, 21047.1]), 10.0)["step"] == 11
    assert detect_blowup(_rows([13.0, 400.0]), None) is None  # the check is off


def test_the_factor_is_validated_and_not_part_of_the_run_identity() -> None:
    base = load_experiment(preset="tiny")
    assert experiment_hash(load_experiment(preset="tiny", sets=["train.blowup_factor=3"])) == \
        experiment_hash(base)
    with pytest.raises(ConfigError, match="blowup_factor"):
        load_experiment(preset="tiny", sets=["train.blowup_factor=0.5"])


def test_lr_1_is_marked_diverged_everywhere(tmp_path: Path, synthetic_cache: Path) -> None:
    cfg = load_experiment(preset="tiny", sets=[*tiny_grid_sets(synthetic_cache), "train.lr=1",
                                               "train.warmup_steps=0", "train.max_steps=8"])
    grid = tmp_path / "runs" / "g"
    run_dir = grid / f"albef__s0__{experiment_hash(cfg)}"
    (run_dir).mkdir(parents=True)
    (run_dir / "meta.json").write_text(json.dumps({"cell": "albef", "seed": 0,
                                                   "preset": "tiny"}))
    result = run_cell(cfg, run_dir, {"cell": "albef", "seed": 0, "preset": "tiny"})
    assert result["status"] == "diverged" and (run_dir / "DONE").exists()
    assert result["diverged"]["step"] >= 2 and "finite blow-up" in result["diverged"]["reason"]
    status = grid_status(grid, query_scheduler=False)
    assert status.loc[0, "state"] == "diverged" and "finite blow-up" in status.loc[0, "detail"]
    frame = collect_runs(tmp_path / "runs", "g", cells=["albef"], seeds=[0])
    assert set(frame["status"]) == {"diverged"} and frame["value"].isna().all()
    table = build_tables(frame)["component_ablation"].markdown
    row = next(line for line in table.splitlines() if line.startswith("| albef"))
    assert "diverged" in row
    assert str(round(result["metrics"]["TR@1"], 2)) not in row.split("diverged")[0][-40:]
