"""Tables never compare different grid recipes, and scale-out never changes one silently.

The newcomer scenario: a committed raw summary of the default grid, then a short partial rerun
(``--only albef --set train.max_steps=4``). The committed rows and tables stay as they were,
the partial result lands in its own raw file and table folder, and no table shows a Δ between
runs of two recipes; ``--replace`` merges it explicitly and says so. Also: the minimum
detectable effect against an independent simulation, the scale-out rule in the dry run, a
resume under another world size (two gloo processes), and the status view without ``--set``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from scipy import stats

import ablations.run_grid as run_grid
from ablations.grid import expand
from model.config.experiment import load_experiment
from model.config.recipe import ScaleOutError, launch_for, run_hash
from model.engine.train import setup
from results.collect import records_to_frame
from results.power import mde, pooled_sd, seeds_needed
from results.tables import build_tables, load_specs
from tests.tiny import tiny_grid_sets

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "results" / "raw" / "softmask_ablation.jsonl"


def _run_lines(path: Path) -> dict[str, dict]:
    """The raw summary's runs by id (placeholder rows of cells without a run left out)."""
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    return {x["run_id"]: x for x in lines if x["record"] == "run" and x["status"] != "missing"}


def _delta_cells(markdown: str) -> list[str]:
    """The Δ column values of every data row of a Markdown table."""
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cols = [i for i, h in enumerate(header) if h.startswith("Δ")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    return [r[i] for r in rows if not r[0].startswith("MDE") for i in cols]


@pytest.fixture
def committed(tmp_path: Path) -> Path:
    """A copy of the committed results (raw summary and generated tables)."""
    out = tmp_path / "results"
    (out / "raw").mkdir(parents=True)
    shutil.copy(COMMITTED, out / "raw")
    shutil.copytree(REPO / "results" / "generated", out / "generated")
    return out


@pytest.mark.slow
def test_a_short_partial_rerun_never_replaces_the_committed_rows(
        committed: Path, tmp_path: Path, synthetic_cache: Path, caplog) -> None:
    raw = committed / "raw" / "softmask_ablation.jsonl"
    before_raw = raw.read_bytes()
    before_tables = {p.name: p.read_bytes() for p in (committed / "generated").iterdir()}
    fp_committed = {r["fingerprint"] for r in _run_lines(raw).values()}
    argv = ["--only", "albef", "--set", f"data.cache_dir={synthetic_cache}", "--set",
            "train.max_steps=4", "--runs-root", str(tmp_path / "runs"), "--results-out",
            str(committed), "--max-parallel", "1"]
    with caplog.at_level(logging.WARNING, logger="results"):
        assert run_grid.main(argv) == 0
    # Every committed row and table is untouched.
    assert raw.read_bytes() == before_raw
    assert {p.name: p.read_bytes() for p in (committed / "generated").iterdir()
            if p.is_file()} == before_tables
    # The partial grid's own raw file and tables, named after what differs.
    variant = "softmask_ablation--train.max_steps=4"
    rows = _run_lines(committed / "raw" / f"{variant}.jsonl")
    assert [r["cell"] for r in rows.values()] == ["albef"]
    (row,) = rows.values()
    assert row["fingerprint"] not in fp_committed and row["recipe"]["train.max_steps"] == 4
    table = (committed / "generated" / variant / "component_ablation.md").read_text()
    assert "preset tiny, 4 steps" in table.splitlines()[0]
    assert set(_delta_cells(table)) <= {"ref", "—"}  # nothing to compare within its recipe
    assert "differs from the grid's raw summary (train.max_steps 4 vs None)" in caplog.text
    # An explicit replacement merges it, says so, and still compares nothing across recipes.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="results"):
        assert run_grid.main([*argv, "--replace"]) == 0
    assert "--replace: runs of recipe" in caplog.text
    merged = _run_lines(raw)
    assert {r["fingerprint"] for r in merged.values() if r["cell"] == "albef"} == \
        {row["fingerprint"]}
    assert len(merged) == 11 and {r["fingerprint"] for r in merged.values()
                                  if r["cell"] != "albef"} == fp_committed
    table = (committed / "generated" / "component_ablation.md").read_text()
    assert set(_delta_cells(table)) <= {"ref", "—"}
    assert "Not shown, trained under another grid recipe: focal s0" in table
    assert "train.max_steps None vs 4" in table


def test_tables_of_mixed_recipes_compare_within_one_only() -> None:
    """Rows of another recipe are listed under the table, never used for Δ or "best"."""
    def run(cell: str, fp: str, steps: int, tr1: float) -> dict:
        return {"grid": "g", "cell": cell, "seed": 0, "run_id": f"{cell}__s0__{fp}",
                "config_hash": fp, "recipe_hash": fp, "fingerprint": fp,
                "recipe": json.dumps({"preset": "tiny", "train.max_steps": steps}),
                "preset": "tiny", "status": "done", "created": pd.Timestamp("2026-01-01"),
                "split": "test", "n_images": 10, "n_texts": 50, "steps": steps, "note": "",
                "metrics": {"TR@1": tr1, "IR@1": tr1}}
    frame = records_to_frame([run("albef", "long", 750, 9.0), run("full", "long", 750, 9.5),
                              run("albef", "short", 40, 2.0), run("softmask", "short", 40, 3.0),
                              run("focal_g1", "long", 750, 10.0)])
    tables = build_tables(frame)
    comp = tables["component_ablation"]
    assert comp.context.recipe.endswith("(recipe long)") and "750 steps" in comp.context.recipe
    summary = comp.summary.set_index("cell")
    assert summary.loc["full", "TR@1:delta"] == pytest.approx(0.5)
    assert np.isnan(summary.loc["softmask", "TR@1:mean"])
    assert summary.loc["softmask", "status"] == "excluded"
    assert "softmask s0 (softmask__s0__short, recipe short): train.max_steps 40 vs 750" \
        in comp.caption
    # A cell no table spec names gets the automatic table, against the reference cell.
    other = tables["other_cells"].summary.set_index("cell")
    assert other.loc["focal_g1", "TR@1:delta"] == pytest.approx(1.0)
    # The short recipe's tables, when asked for, exclude the long runs instead.
    short = build_tables(frame, fingerprint="short")["component_ablation"].summary
    assert short.set_index("cell").loc["softmask", "TR@1:delta"] == pytest.approx(1.0)


def test_minimum_detectable_effect_matches_an_independent_computation() -> None:
    """Pooled spread by hand; the MDE's power checked by simulating the t-test."""
    seeds = {"albef": [8.0, 9.5, 7.0], "softmask": [9.0, 9.0, 12.0], "focal": [7.5, 8.5, 8.0]}
    by_hand = np.sqrt(sum(((np.array(v) - np.mean(v)) ** 2).sum() for v in seeds.values()) / 6)
    assert pooled_sd(list(seeds.values())) == pytest.approx(by_hand)
    effect = mde(by_hand, 3, 3)
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, by_hand, (40000, 3))
    b = rng.normal(effect, by_hand, (40000, 3))
    power = (stats.ttest_ind(a, b, axis=1).pvalue < 0.05).mean()
    assert power == pytest.approx(0.8, abs=0.01)
    assert effect / by_hand == pytest.approx(3.0709, abs=1e-3)  # d for n = 3 + 3
    assert np.isnan(mde(by_hand, 1, 1)) and np.isnan(mde(float("nan"), 3, 3))
    assert seeds_needed(effect, by_hand) == 3 and seeds_needed(effect / 4, by_hand) > 20
    # The tables carry the same number for a cell with 3 seeds against a reference with 3.
    records = [{"grid": "g", "cell": c, "seed": s, "run_id": f"{c}__s{s}__x",
                "config_hash": "x", "recipe_hash": "x", "fingerprint": "f", "recipe": "",
                "preset": "tiny", "status": "done", "created": pd.Timestamp("2026-01-01"),
                "split": "test", "n_images": 10, "n_texts": 50, "steps": 5, "note": "",
                "metrics": {"TR@1": v, "IR@1": v}}
               for c, values in seeds.items() for s, v in enumerate(values)]
    table = build_tables(records_to_frame(records), load_specs())["component_ablation"]
    summary = table.summary.set_index("cell")
    assert summary.loc["softmask", "TR@1:mde"] == pytest.approx(effect)
    assert "| MDE (n=3 vs 3) " in table.markdown and f"{effect:.2f}" in table.markdown


def test_the_dry_run_states_the_launch_and_refuses_an_undocumented_scale_out(
        capsys, tmp_path: Path, monkeypatch) -> None:
    rc = run_grid.main(["--dry-run", "--preset", "base", "--tier", "16gpu", "--only", "albef",
                        "--runs-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "tier 16gpu: 16 rank(s) x train.batch_size=64 = global batch 1024" in err
    assert "train.lr_scaling=linear (lr x 1024/512 = 0.0002)" in err
    # Two ranks of the tiny recipe (written for one): refused, then allowed by a stated rule.
    monkeypatch.setenv("SOFTMASK_SLURM_NODES", "2")
    argv = ["--dry-run", "--tier", "cpu", "--only", "albef", "--runs-root", str(tmp_path)]
    assert run_grid.main(argv) == 2
    assert "choose a rule" in capsys.readouterr().err.lower()
    assert run_grid.main([*argv, "--set", "train.lr_scaling=linear"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("| cpu"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:7] == ["2", "32", "64", "0.001", "0.002", "train.lr_scaling=linear"]
    # World size and the effective rate are part of the run's identity.
    (spec,) = expand(preset="tiny", seeds=[0], only=["albef"], sets=["train.lr_scaling=linear"],
                     runs_root=tmp_path, tier="cpu")
    assert spec.world_size == 2 and spec.config_hash == run_hash(spec.config, 2)
    assert spec.config_hash != run_hash(spec.config, 1)


def test_launch_rules() -> None:
    cfg = load_experiment()  # ALBEF: 8 ranks x 64
    assert launch_for(cfg.train, 8).lr_effective == cfg.train.lr
    with pytest.raises(ScaleOutError, match="global batch 1024"):
        launch_for(cfg.train, 16)
    linear = load_experiment(sets=["train.lr_scaling=linear"]).train
    assert launch_for(linear, 16).lr_effective == pytest.approx(2e-4)  # ALBEF's advice
    assert launch_for(linear, 4).lr_effective == pytest.approx(5e-5)
    none = load_experiment(sets=["train.lr_scaling=none"]).train
    assert launch_for(none, 16).lr_effective == 1e-4 and launch_for(none, 16).global_batch == 1024


def _two_rank_run(rank: int, port: int, cache: str, run_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from model.cell.pipeline import run_cell

    cfg = load_experiment(preset="tiny", sets=[*tiny_grid_sets(cache), "train.max_steps=2",
                                               "train.recipe_world_size=2"])
    run_cell(cfg, run_dir, identity={"cell": "albef", "world_size": 2}, device="cpu")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_resume_under_another_world_size_is_refused(synthetic_cache: Path,
                                                     tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    mp.spawn(_two_rank_run, args=(port, str(synthetic_cache), str(run_dir)), nprocs=2, join=True)
    assert json.loads((run_dir / "meta.json").read_text())["world_size"] == 2
    cfg = load_experiment(preset="tiny", sets=[*tiny_grid_sets(synthetic_cache),
                                               "train.max_steps=2", "train.recipe_world_size=2",
                                               "train.lr_scaling=none"])
    # The same run directory on one process: its checkpoint was written by two ranks.
    with pytest.raises(RuntimeError, match=r"written by a job with 2 rank\(s\) but this job "
                                           r"has 1"):
        setup(cfg, run_dir, device="cpu")
    # A job given another allocation than its run was planned for stops before training.
    with pytest.raises(RuntimeError, match=r"planned for 2 rank\(s\).*this job has 1"):
        setup(cfg, tmp_path / "other", device="cpu", identity={"world_size": 2})


def test_status_lists_what_is_on_disk_without_the_set_flags(capsys, tmp_path: Path) -> None:
    (spec,) = expand(preset="tiny", seeds=[0], only=["albef"], sets=["train.max_steps=40"],
                     runs_root=tmp_path)
    spec.run_dir.mkdir(parents=True)
    (spec.run_dir / "meta.json").write_text(json.dumps(spec.identity()))
    (spec.run_dir / "result.json").write_text(json.dumps({"status": "done", "wall_s": 1.0}))
    (spec.run_dir / "DONE").write_text("now\n")
    assert run_grid.main(["--status", "--only", "albef", "--runs-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Not in this plan (1 run(s) on disk" in out and spec.run_id in out
    assert f"{spec.fingerprint} (1 run(s))" in out
