"""Tables, plots and raw summaries regenerated from fixture run directories.

The fixture grid is written into a temporary directory following the training engine's
run-directory contract, with finished, failed, running, missing and duplicated runs.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import yaml

from results.__main__ import main
from results.collect import collect_runs, load_curves
from results.paper import PAPER_PATH, load_paper
from results.plots import plot_curves, plot_table
from results.raw_format import read_raw, read_raw_curves, write_raw
from results.tables import build_tables, load_specs, write_table

GRID = "ablate"
SEEDS = (0, 1, 2)
# Our TR@1 for seed s of a finished cell is BASE_TR1[cell] + 2 * s: mean BASE + 2, std 2.
BASE_TR1 = {
    "albef": 10.0,
    "softmask": 14.0,
    "softmask_focal": 15.0,
    "softmask_mmda": 16.0,
    "focal_mmda": 17.0,
    "full": 20.0,
    "randmask_p03": 18.0,
    "full_mlm": 19.0,
}
# Cells whose runs are not all finished: seed -> status (a seed not listed has no run dir).
PARTIAL = {
    "softmask": {0: "done", 1: "done", 2: "failed"},
    "focal": {0: "running"},
    "randmask_p05": {0: "failed", 1: "failed", 2: "failed"},
}
# Quoted from docs/METHOD.md §5 (Park & Han, CVPR 2023): cell -> (TR@1, IR@1).
PAPER = {
    "component_ablation": {
        "albef": (73.10, 56.80),
        "softmask": (75.74, 58.24),
        "focal": (75.66, 58.85),
        "mmda": (75.26, 58.85),
        "softmask_focal": (76.06, 59.54),
        "softmask_mmda": (75.98, 59.44),
        "focal_mmda": (76.16, 59.62),
        "full": (76.62, 60.15),
    },
    "masking": {
        "randmask_p03": (75.82, 59.52),
        "randmask_p05": (76.22, 59.74),
        "full": (76.62, 60.15),
    },
    "mlm": {"focal_mmda": (76.16, 59.62), "full": (76.62, 60.15), "full_mlm": (76.21, 59.84)},
}


def _metrics(cell: str, seed: int) -> dict[str, float]:
    """Deterministic tiny-preset metrics of one run."""
    tr1 = BASE_TR1.get(cell, 5.0) + 2.0 * seed
    return {
        "TR@1": tr1,
        "IR@1": tr1 - 3.0,
        "r_mean": tr1 + 30.0,
        "comp/mean": 50.0 + seed,
        "TR@5": tr1 + 10.0,
        "itc/TR@1": tr1 - 1.0,
        "comp/colour": 60.0,
        "loc/pointing": 30.0 + seed,
        "itm/clean_acc": 70.0 + seed,
    }


def make_run(
    root: Path,
    cell: str,
    seed: int,
    status: str,
    *,
    config_hash: str = "abc123",
    recipe_hash: str | None = None,
    preset: str = "tiny",
    created: str = "2025-01-01T00:00:00",
    metrics: dict[str, float] | None = None,
    grid: str = GRID,
) -> Path:
    """Write one run dir following the engine's contract (meta, metrics.jsonl, markers)."""
    run_dir = root / grid / f"{cell}__s{seed}__{config_hash}"
    run_dir.mkdir(parents=True)
    meta = {
        "cell": cell,
        "seed": seed,
        "config_hash": config_hash,
        # The config hash includes the seed, the recipe hash does not (default: the same).
        "recipe_hash": recipe_hash or config_hash,
        "grid": grid,
        "preset": preset,
        "git_sha": "0" * 40,
        "created": created,
    }
    (run_dir / "meta.json").write_text(json.dumps(meta))
    scale = 1.0 + 0.1 * sorted(BASE_TR1).index(cell) if cell in BASE_TR1 else 1.0
    lines = [
        {
            "kind": "train",
            "step": step,
            "epoch": 0,
            "loss/itc": scale / (1 + step),
            "loss/itm": 0.7 * scale,
            "loss/mlm": 2.0 - 0.01 * step,
            "lr": 1e-4,
            "alpha": 0.4,
            "temp": 0.07,
            "time_s": 0.1,
            "loss/total": scale / (1 + step) + 0.7 * scale + 2.0 - 0.01 * step,
        }
        for step in range(0, 50, 5)
    ]
    lines.append({"kind": "eval", "step": 45, "split": "test", "TR@1": 1.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if status in ("done", "failed"):
        result = {
            "cell": cell,
            "seed": seed,
            "config_hash": config_hash,
            "status": "done",
            # A failed run's stray numbers must never reach a table.
            "metrics": metrics
            or (_metrics(cell, seed) if status == "done" else {"TR@1": 99.0, "IR@1": 99.0}),
            "provenance": {
                "checkpoint": "ckpt.pt",
                "checkpoint_sha256": "f" * 64,
                "stage": "zero-shot",
                "image_size": 64,
                "k_test": 16,
                "scoring": "itm",
                "split": "test",
                "n_images": 100,
                "n_texts": 500,
            },
        }
        (run_dir / "result.json").write_text(json.dumps(result))
    if status == "done":
        (run_dir / "DONE").write_text("")
    elif status == "failed":
        (run_dir / "FAILED").write_text("RuntimeError: loss is NaN at step 40\ntraceback...")
    return run_dir


def build_grid(root: Path) -> Path:
    """The fixture grid: 3 seeds, failed/running/missing cells and one rerun config."""
    for cell in BASE_TR1:
        statuses = PARTIAL.get(cell, dict.fromkeys(SEEDS, "done"))
        for seed, status in statuses.items():
            make_run(root, cell, seed, status)
    for cell, statuses in PARTIAL.items():
        if cell not in BASE_TR1:
            for seed, status in statuses.items():
                make_run(root, cell, seed, status)
    # full_mlm s0 was rerun after a config change: the newer run (TR@1 = 40) must win.
    make_run(
        root,
        "full_mlm",
        0,
        "done",
        config_hash="new999",
        created="2025-02-01T00:00:00",
        metrics={**_metrics("full_mlm", 0), "TR@1": 40.0},
    )
    return root


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture grid, built once per module."""
    return build_grid(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def frame(runs_dir: Path) -> pd.DataFrame:
    """Collected runs, expecting every cell of the table specs."""
    cells = [c for spec in load_specs().tables.values() for c in spec.cells]
    return collect_runs(runs_dir, GRID, cells=cells)


@pytest.fixture(scope="module")
def tables(frame: pd.DataFrame) -> dict[str, Any]:
    """All three tables built from the fixture frame."""
    return build_tables(frame)


def _status(frame: pd.DataFrame, cell: str, seed: int) -> str:
    rows = frame[(frame["cell"] == cell) & (frame["seed"] == seed)]
    assert rows["status"].nunique() == 1
    return rows["status"].iloc[0]


def _row(result: Any, cell: str) -> pd.Series:
    return result.summary.set_index("cell").loc[cell]


def _md_row(markdown: str, cell: str) -> list[str]:
    """Cells of the Markdown row whose 'cell' column equals ``cell``."""
    for line in markdown.splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if cell in parts:
            return parts
    raise AssertionError(f"no row for {cell}")


def test_collect_statuses(frame: pd.DataFrame) -> None:
    assert set(frame.columns) >= {
        "grid",
        "cell",
        "seed",
        "run_id",
        "config_hash",
        "preset",
        "status",
        "metric",
        "value",
    }
    assert _status(frame, "albef", 2) == "done"
    assert _status(frame, "softmask", 2) == "failed"
    assert _status(frame, "focal", 0) == "running"
    assert _status(frame, "focal", 1) == "missing"
    assert all(_status(frame, "mmda", s) == "missing" for s in SEEDS)
    failed = frame[(frame["status"] == "failed")]
    assert failed["value"].isna().all() and failed["note"].str.contains("NaN").all()


def test_duplicate_keeps_newest_and_warns(runs_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="results"):
        frame = collect_runs(runs_dir, GRID)
    rows = frame[(frame["cell"] == "full_mlm") & (frame["seed"] == 0)]
    assert set(rows["config_hash"]) == {"new999"}
    assert rows.set_index("metric").loc["TR@1", "value"] == 40.0
    assert "config changed" in caplog.text and "full_mlm__s0__abc123" in caplog.text
    # Seeds 1 and 2 still come from the old config: the table row must say so.
    status = _row(build_tables(frame)["mlm"], "full_mlm")["status"]
    assert status == "done (mixed configs: abc123,new999)"


def test_seeds_of_one_recipe_are_not_mixed_configs(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Every seed has its own config hash (the seed is part of it) but one recipe hash."""
    for seed in SEEDS:
        make_run(tmp_path, "albef", seed, "done", config_hash=f"h{seed}", recipe_hash="r1")
    with caplog.at_level(logging.WARNING, logger="results"):
        row = _row(build_tables(collect_runs(tmp_path, GRID))["component_ablation"], "albef")
    assert row["status"] == "done" and "different configs" not in caplog.text


def test_recipe_hash_ignores_the_seed_only() -> None:
    from model.config.experiment import experiment_hash, load_experiment, recipe_hash

    a, b = (load_experiment(preset="tiny", sets=[f"train.seed={s}"]) for s in (0, 1))
    c = load_experiment(preset="tiny", sets=["train.seed=1", "loss.focal_gamma=2.0"])
    assert experiment_hash(a) != experiment_hash(b) and recipe_hash(a) == recipe_hash(b)
    assert recipe_hash(b) != recipe_hash(c)


def test_mean_std_n_and_failed_not_counted(tables: dict[str, Any]) -> None:
    comp = tables["component_ablation"]
    albef = _row(comp, "albef")
    assert albef["TR@1:mean"] == pytest.approx(12.0)
    assert albef["TR@1:std"] == pytest.approx(2.0)
    assert albef["TR@1:n"] == 3 and albef["n_expected"] == 3
    softmask = _row(comp, "softmask")  # seed 2 failed with TR@1 = 99
    assert softmask["TR@1:n"] == 2 and softmask["TR@1:mean"] == pytest.approx(15.0)
    assert softmask["status"] == "done: s0,s1; failed: s2"
    assert _row(comp, "full")["TR@1:delta"] == pytest.approx(10.0)
    assert _row(comp, "albef")["TR@1:delta"] == 0.0


def test_markdown_values_bold_delta_missing(tables: dict[str, Any]) -> None:
    md = tables["component_ablation"].markdown
    caption = md.splitlines()[0]
    assert "synthetic zero-shot" in caption and "3 seed(s)" in caption
    assert "preset tiny" in caption and "quoted" in caption and "not reproduced" in caption
    assert "ours TR@1 (synthetic zero-shot, tiny)" in md
    assert "paper TR@1 (COCO 5K ft, 4M)" in md and "Δ TR@1 vs albef" in md
    albef = _md_row(md, "albef")
    assert "12.00 ± 2.00 (n=3)" in albef and "ref" in albef
    full = _md_row(md, "full")
    # A 10-point gap over 3 seeds of spread 2 passes Welch's test: marked significant.
    assert "**22.00 ± 2.00 (n=3)**" in full and "+10.00*" in full
    assert full.count("✓") == 3
    assert albef[4] == "12.00 ± 2.00 (n=3)"  # TR@1 column: not the best, so not bold
    assert "**51.00 ± 1.00 (n=3)**" in albef  # comp/mean ties across rows: all bold
    assert "+5.00*" in _md_row(md, "softmask_focal")
    # comp/mean is 50, 51, 52 in every cell: a zero difference is never marked.
    assert "+0.00" in full and "+0.00*" not in full
    mmda = _md_row(md, "mmda")
    assert mmda.count("—") == 10 and "missing" in mmda  # 5 metrics + 5 deltas
    focal = _md_row(md, "focal")
    assert "running: s0; missing: s1,s2" in focal and focal.count("—") == 10
    masking = tables["masking"].markdown
    assert "Δ TR@1 vs SoftMask" in masking and "failed" in _md_row(masking, "randmask_p05")


def test_missing_cells_warned(frame: pd.DataFrame, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="results"):
        build_tables(frame)
    assert "mmda s0 (missing)" in caplog.text and "softmask s2 (failed)" in caplog.text
    assert "focal s0 (running)" in caplog.text


def test_paper_columns_exact(tables: dict[str, Any]) -> None:
    paper = load_paper()
    assert paper.source == (
        "Park & Han, CVPR 2023; COCO 5K test after fine-tuning, 4M-image pretraining"
    )
    for name, rows in PAPER.items():
        result = tables[name]
        assert list(result.summary["cell"]) == list(rows)  # the paper's row order
        for cell, (tr1, ir1) in rows.items():
            assert _row(result, cell)["paper:TR@1"] == tr1
            assert _row(result, cell)["paper:IR@1"] == ir1
            shown = "|".join(_md_row(result.markdown, cell))
            assert f"{tr1:.2f}" in shown and f"{ir1:.2f}" in shown
    assert "**76.62**" in _md_row(tables["component_ablation"].markdown, "full")


def test_latex_structure(tables: dict[str, Any]) -> None:
    tex = tables["component_ablation"].latex
    for token in (
        r"\begin{table}",
        r"\begin{tabular}",
        r"\toprule",
        r"\midrule",
        r"\bottomrule",
        r"\end{tabular}",
        r"\caption{",
        r"\label{tab:component_ablation}",
        r"\checkmark",
        r"$\pm$",
        r"\textbf{22.00 $\pm$ 2.00 (n=3)}",
        "---",
        r"softmask\_focal",
        r"clean\_acc",
        r"$\Delta$ TR@1",
        r"in \%",
    ):
        assert token in tex, token
    body = tex.split(r"\begin{tabular}")[1]
    assert not re.search(r"(?<!\\)[_%#]", body), "unescaped LaTeX special in table body"
    assert tex.count("{") == tex.count("}")
    column_format, *lines = body.splitlines()
    rows = [ln for ln in lines if ln.endswith(r"\\")]
    assert len(rows) == 1 + 8 + 1  # header + the paper's eight rows + the MDE row
    assert all(ln.count("&") == len(column_format.strip("{}")) - 1 for ln in rows)


def test_csv_round_trips(tables: dict[str, Any], tmp_path: Path) -> None:
    result = tables["component_ablation"]
    csv = [p for p in write_table(result, tmp_path) if p.suffix == ".csv"][0]
    back = pd.read_csv(csv)
    assert list(back.columns) == list(result.summary.columns)
    numeric = result.summary.select_dtypes("number").columns
    np.testing.assert_allclose(
        back[numeric].to_numpy(float), result.summary[numeric].to_numpy(float), rtol=1e-12
    )
    assert list(back["status"]) == list(result.summary["status"])


def _bar_heights(png: Path, rgb: tuple[float, float, float]) -> list[int]:
    """Pixel heights of the contiguous column groups drawn in ``rgb``."""
    image = mpimg.imread(png)[..., :3]
    match = np.all(np.abs(image - np.array(rgb)) < 0.02, axis=-1)
    counts = match.sum(axis=0)
    heights, current = [], 0
    for count in [*counts, 0]:
        if count:
            current = max(current, int(count))
        elif current:
            heights.append(current)
            current = 0
    return heights


def test_plots_written_and_bars_differ(
    tables: dict[str, Any], runs_dir: Path, frame: pd.DataFrame, tmp_path: Path
) -> None:
    png = plot_table(tables["component_ablation"], tmp_path / "comp.png", load_paper())
    assert png.stat().st_size > 20_000
    tall = [h for h in _bar_heights(png, (0.1216, 0.4667, 0.7059)) if h > 20]  # C0 = TR@1
    assert len(tall) >= 5 and max(tall) > 1.3 * min(tall)
    curves = load_curves(runs_dir, GRID, runs=frame)
    assert set(curves["metric"]) == {"loss/total", "loss/itc", "loss/itm", "loss/mlm"}
    assert not (curves["run_id"] == "full_mlm__s0__abc123").any()  # superseded config
    out = plot_curves(curves, tmp_path / "curves.png")
    assert out is not None and out.stat().st_size > 20_000
    assert mpimg.imread(out)[..., :3].std() > 0.05


def test_raw_round_trip_gives_identical_tables(
    frame: pd.DataFrame, runs_dir: Path, tmp_path: Path
) -> None:
    curves = load_curves(runs_dir, GRID, runs=frame)
    path = write_raw(frame, tmp_path / "raw" / f"{GRID}.jsonl", curves)
    back = read_raw(path)
    original, rebuilt = build_tables(frame), build_tables(back)
    for name in original:
        assert rebuilt[name].markdown == original[name].markdown
        assert rebuilt[name].latex == original[name].latex
        pd.testing.assert_frame_equal(rebuilt[name].summary, original[name].summary)
    curves_back = read_raw_curves(path)
    assert len(curves_back) == len(curves)
    np.testing.assert_allclose(curves_back["value"].sum(), curves["value"].sum())


def test_cli_runs_and_raw_agree(runs_dir: Path, tmp_path: Path) -> None:
    out_runs, out_raw, raw_dir = tmp_path / "a", tmp_path / "b", tmp_path / "raw"
    assert main(["--runs", str(runs_dir), "--out", str(out_runs), "--raw-dir", str(raw_dir)]) == 0
    raw = raw_dir / f"{GRID}.jsonl"
    assert raw.exists()
    assert main(["--raw", str(raw), "--out", str(out_raw)]) == 0
    for name in ("component_ablation", "masking", "mlm"):
        for ext in ("md", "tex", "csv"):
            assert (out_runs / f"{name}.{ext}").read_text() == (
                out_raw / f"{name}.{ext}"
            ).read_text()
        assert (out_raw / f"{name}.png").stat().st_size > 20_000
    assert (out_raw / "curves.png").exists()
    summary = (out_runs / "summary.md").read_text()
    assert summary.count("paper TR@1 (COCO 5K ft, 4M)") == 3
    assert "Soft vs random masking" in summary


def test_mixed_presets_error_unless_filtered(tmp_path: Path) -> None:
    for seed in (0, 1):
        make_run(tmp_path, "albef", seed, "done")
        make_run(tmp_path, "full", seed, "done", preset="base" if seed else "tiny")
    with pytest.raises(ValueError, match="mix presets"):
        build_tables(collect_runs(tmp_path, GRID))
    assert main(["--runs", str(tmp_path), "--out", str(tmp_path / "o"), "--no-raw"]) == 2
    tiny = build_tables(collect_runs(tmp_path, GRID, preset="tiny"))
    assert "done: s0; missing: s1" in _md_row(tiny["component_ablation"].markdown, "full")


def test_base_preset_header(tmp_path: Path) -> None:
    make_run(tmp_path, "albef", 0, "done", preset="base")
    comp = build_tables(collect_runs(tmp_path, GRID))["component_ablation"]
    assert "ours TR@1 (COCO 5K ft)" in comp.markdown
    assert "comp/mean" not in comp.markdown  # not a base-preset metric
    assert "12.00" not in comp.markdown and "10.00 (n=1)" in comp.markdown
    assert _row(comp, "mmda")["status"] == "missing" and _row(comp, "mmda")["n_expected"] == 1


def test_paper_yaml_matches_specs() -> None:
    paper = yaml.safe_load(PAPER_PATH.read_text())
    specs = load_specs()
    for name, spec in specs.tables.items():
        if not spec.paper_metrics:  # a table of our own diagnostics quotes nothing
            assert name not in paper["tables"]
            continue
        assert list(paper["tables"][name]) == spec.cells


def test_welch_significance_marks_clear_differences_not_noise() -> None:
    from results.tables import welch_p

    reference = np.array([10.0, 12.0, 14.0])
    assert welch_p(np.array([20.0, 22.0, 24.0]), reference) < 0.01
    # Seed noise: overlapping samples whose means differ by less than their spread.
    assert welch_p(np.array([11.0, 13.5, 12.5]), reference) > 0.5
    assert np.isnan(welch_p(np.array([20.0]), reference))   # one seed: no test
    assert np.isnan(welch_p(np.array([5.0, 5.0]), np.array([5.0, 5.0])))  # no spread at all
    # Independent recomputation of Welch's t statistic and its two-sided p-value.
    from scipy import stats

    a, b = np.array([1.0, 2.0, 4.0]), np.array([3.0, 5.0, 9.0, 6.0])
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / np.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    assert welch_p(a, b) == pytest.approx(2 * stats.t.sf(abs(t), dof), rel=1e-9)


def test_significance_needs_two_seeds_on_both_sides(tables: dict[str, Any]) -> None:
    # softmask has 2 finished seeds (14, 16) vs albef's 3 (10, 12, 14): tested, not significant.
    softmask = _row(tables["component_ablation"], "softmask")
    assert 0.05 < softmask["TR@1:p"] < 1.0
    assert np.isnan(_row(tables["component_ablation"], "albef")["TR@1:p"])
    caption = tables["component_ablation"].markdown.splitlines()[0]
    assert "Welch's t-test" in caption and "p < 0.05" in caption
