"""Divergence guard: a planted non-finite value stops the run with step, term, lr and the last
good checkpoint named; the checkpoint is kept; the status view reads ``diverged``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import model.engine.train as train_module
from model.cell.pipeline import run_cell
from model.config.experiment import load_experiment
from model.engine.guard import Diverged, DivergenceGuard, total_grad_norm
from model.engine.resume import checkpoint_path
from model.negatives import negative_weights, sample_hard_negatives
from model.objective import StepOutput
from slurm.status import grid_status
from tests.tiny import synthetic_train_sets


def test_guard_records_the_first_bad_step_and_its_terms_only() -> None:
    guard = DivergenceGuard(["itc", "itm", "grad_norm"], torch.device("cpu"))
    ok = torch.tensor(1.0)
    guard.update(1, {"itc": ok, "itm": ok, "grad_norm": ok}, lr=1e-3)
    guard.check()
    guard.update(2, {"itc": ok, "itm": torch.tensor(math.nan), "grad_norm": ok}, lr=2e-3)
    guard.update(3, {"itc": torch.tensor(math.inf), "itm": ok, "grad_norm": ok}, lr=3e-3)
    with pytest.raises(Diverged, match="step 2: non-finite itm \\(learning rate 0.002\\)") as err:
        guard.check(Path("run/checkpoint.pt"), 1)
    assert err.value.step == 2 and err.value.terms == ["itm"]
    assert "run/checkpoint.pt (step 1)" in str(err.value)


def test_grad_norm_is_the_l2_norm_of_all_gradients_and_changes_nothing() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    c = torch.nn.Parameter(torch.zeros(1))  # no gradient: skipped
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0, 0.0])
    assert total_grad_norm([a, b, c]).item() == pytest.approx(5.0)
    assert a.grad.tolist() == [3.0, 0.0] and b.grad.tolist() == [0.0, 4.0, 0.0]


def test_non_finite_similarities_still_draw_valid_negatives() -> None:
    sim = torch.full((4, 4), math.nan)
    weights = negative_weights(sim)
    assert torch.isfinite(weights).all() and (weights.sum(1) > 0).all()
    assert torch.equal(weights.diagonal(), torch.zeros(4))
    neg_img, neg_txt = sample_hard_negatives(sim, sim, torch.Generator().manual_seed(0))
    assert (neg_img != torch.arange(4)).all() and (neg_txt != torch.arange(4)).all()


@pytest.mark.parametrize("bad_step", [7])
def test_planted_nan_stops_the_run_and_keeps_the_last_good_checkpoint(
        synthetic_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        bad_step: int) -> None:
    real_step = train_module.train_step
    calls = {"n": 0}

    def step_with_a_nan(*args, **kwargs) -> StepOutput:
        out = real_step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == bad_step:
            out.losses["mlm"] = torch.tensor(math.nan)
        return out

    monkeypatch.setattr(train_module, "train_step", step_with_a_nan)
    cfg = load_experiment(preset="tiny", sets=synthetic_train_sets(
        str(synthetic_cache), "train.max_steps=12", "train.log_every=5",
        "train.checkpoint_every=3"))
    run_dir = tmp_path / "grid" / "albef__s0__abc"
    with pytest.raises(Diverged) as err:
        run_cell(cfg, run_dir, identity={"cell": "albef", "seed": 0})
    message = str(err.value)
    assert f"step {bad_step}: non-finite mlm (learning rate" in message
    assert "learning rate" in message and "(step 6)" in message
    # The step-9 checkpoint would hold a state after the failure: it was never written.
    state = torch.load(checkpoint_path(run_dir), map_location="cpu", weights_only=False)
    assert state["state"]["global_step"] == 6
    assert (run_dir / "FAILED").read_text().startswith("Diverged: training diverged")
    row = grid_status(tmp_path / "grid", query_scheduler=False).iloc[0]
    assert row["state"] == "diverged" and f"step {bad_step}" in row["detail"]
