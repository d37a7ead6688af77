"""Experiment tracking: TensorBoard event files for every run hold the logged scalars; W&B is
opt-in and, in tests, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from model.cell.pipeline import run_cell
from model.config.experiment import experiment_hash, load_experiment
from model.engine.tracking import TB_DIR, Tracker
from tests.tiny import tiny_grid_sets


def _scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(run_dir / TB_DIR))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_a_tiny_run_writes_its_logged_scalars_to_tensorboard(tmp_path: Path,
                                                             synthetic_cache: Path) -> None:
    cfg = load_experiment(preset="tiny", sets=[*tiny_grid_sets(synthetic_cache),
                                               "train.max_steps=4", "train.log_every=2"])
    run_cell(cfg, tmp_path / "run", {"cell": "albef", "seed": 0})
    tb = _scalars(tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    for key in ("loss/total", "loss/itc", "loss/itm", "lr", "data_wait_s", "grad_norm",
                "itm/clean_acc"):
        assert {s: pytest.approx(r[key], rel=1e-6) for r in train
                for s in [r["step"]]} == tb[f"train/{key}"], key
    evaluation = next(r for r in rows if r["kind"] == "eval")
    assert tb["eval/TR@1"][evaluation["step"]] == pytest.approx(evaluation["TR@1"])


def test_tracking_is_configurable_and_not_part_of_the_identity(tmp_path: Path) -> None:
    base = load_experiment(preset="tiny")
    none = load_experiment(preset="tiny", sets=["train.log_to=[]"])
    assert experiment_hash(none) == experiment_hash(base)
    Tracker(tmp_path, ()).log({"loss": 1.0}, 1)  # no backend: nothing written
    assert not (tmp_path / TB_DIR).exists()


def test_wandb_is_opt_in_and_offline_in_tests(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    tracker = Tracker(tmp_path, ("wandb",), {"run_id": "albef__s0__x", "grid": "g"})
    tracker.log({"loss/total": 2.0, "kind": "train"}, 3)
    tracker.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
