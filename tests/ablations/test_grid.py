"""The ablation grid: matrix validation, dry runs, local execution, skip/resume, failures."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

from ablations import run_grid
from ablations.grid import MATRIX_FILE, expand, load_matrix
from model.config.loader import ConfigError
from tests.tiny import tiny_grid_sets

PAPER_CELLS = {"albef", "softmask", "focal", "mmda", "softmask_focal", "softmask_mmda",
               "focal_mmda", "full", "randmask_p03", "randmask_p05", "full_mlm"}


def _copy_matrix(tmp_path: Path) -> Path:
    dst = tmp_path / "ablations"
    shutil.copytree(MATRIX_FILE.parent, dst, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return dst / "matrix.yaml"


def test_matrix_names_every_paper_row_once() -> None:
    matrix = load_matrix()
    assert set(matrix.cells) == PAPER_CELLS
    specs = expand(preset="tiny", seeds=[0])
    # Shared rows are one cell: all configs are distinct.
    assert len({s.config_hash for s in specs}) == len(PAPER_CELLS)
    by_cell = {s.cell: s.config for s in specs}
    assert by_cell["albef"].softmask.mode == "off" and by_cell["albef"].loss.focal_gamma == 0
    assert not by_cell["albef"].mmda.enabled
    full = by_cell["full"]
    assert full.softmask.mode == "gradcam" and full.loss.focal_gamma > 0 and full.mmda.enabled
    assert by_cell["randmask_p03"].softmask.random_p == 0.3
    assert by_cell["full_mlm"].softmask.apply_to == "itm_mlm"


def test_seeds_and_run_dirs_are_keyed_by_config(tmp_path: Path) -> None:
    specs = expand(preset="tiny", seeds=[0, 1], only=["albef"], runs_root=tmp_path)
    assert [s.seed for s in specs] == [0, 1]
    assert specs[0].config.train.seed == 0 and specs[1].config.train.seed == 1
    for s in specs:
        assert s.run_dir.name == f"albef__s{s.seed}__{s.config_hash}"
    again = expand(preset="tiny", seeds=[0, 1], only=["albef"], runs_root=tmp_path)
    assert [s.run_dir for s in again] == [s.run_dir for s in specs]


def test_collect_regenerates_the_planned_seeds_only(tmp_path: Path, monkeypatch) -> None:
    """A one-seed grid's tables never average in seeds 1 and 2 of an earlier --seeds 3 run that
    share its runs root (and the caption says which seeds were asked for)."""
    import results.__main__ as results_cli

    calls: list[list[int]] = []
    monkeypatch.setattr(results_cli, "run", lambda args, plan=None: calls.append(args.seeds) or 0)
    for n in (1, 3):
        assert run_grid.main(["--collect-only", "--seeds", str(n), "--only", "albef",
                              "--runs-root", str(tmp_path / "runs"),
                              "--results-out", str(tmp_path / "out")]) == 0
    assert calls == [[0], [0, 1, 2]]


def test_dry_run_validates_all_cells(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc = run_grid.main(["--dry-run", "--runs-root", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "11 runs validated, nothing submitted" in out  # tiny default: 1 seed per cell
    assert not (tmp_path / "softmask_ablation").exists()


def test_dry_run_rejects_misspelled_key_naming_file(capsys, tmp_path: Path) -> None:
    matrix = _copy_matrix(tmp_path)
    bad = matrix.parent / "overrides" / "focal.yaml"
    bad.write_text("loss:\n  focal_gama: 2.0\n")
    rc = run_grid.main(["--dry-run", "--matrix", str(matrix), "--runs-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(bad) in err and "loss.focal_gama" in err and "did you mean 'loss.focal_gamma'" in err


def test_dry_run_rejects_unknown_set_key(capsys, tmp_path: Path) -> None:
    rc = run_grid.main(["--dry-run", "--set", "train.lrr=1e-3", "--runs-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "--set: unknown key 'train.lrr'" in err and "train.lr" in err


def test_dry_run_rejects_missing_data_path(capsys, tmp_path: Path) -> None:
    rc = run_grid.main(["--dry-run", "--preset", "base", "--seeds", "1", "--only", "albef",
                        "--set", f"data.train_files=[{tmp_path}/nope.json]",
                        "--runs-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{tmp_path}/nope.json" in err and "data.train_files" in err


def test_dry_run_checks_the_shard_index(capsys, tmp_path: Path) -> None:
    base = ["--dry-run", "--preset", "base", "--seeds", "1", "--only", "albef", "--set",
            "data.format=shards", "--runs-root", str(tmp_path)]
    assert run_grid.main([*base, "--set", f"data.shards.index={tmp_path}/none.json"]) == 2
    assert f"shard index {tmp_path}/none.json does not exist" in capsys.readouterr().err
    (tmp_path / "shards.json").write_text(
        '{"shardlist": [{"url": "00000.tar", "nsamples": 4}, {"url": "pipe:cat x", '
        '"nsamples": 4}]}')
    assert run_grid.main([*base, "--set", f"data.shards.index={tmp_path}/shards.json",
                          "--set", "data.shards.allow_pipe=true"]) == 2
    out, err = capsys.readouterr()
    assert "1 of 2 shards not found" in err and f"{tmp_path}/00000.tar" in err
    assert "1 shell command(s) every node will run" in out and "'cat x'" in out


def test_dry_run_names_unreadable_weights_tokenizer_and_tiers(capsys, tmp_path: Path,
                                                              monkeypatch) -> None:
    """Everything a job would fail on later is reported by the dry run, together."""
    monkeypatch.setenv("SOFTMASK_SLURM_TIMEOUT_MIN", "abc")
    rc = run_grid.main(["--dry-run", "--only", "albef", "--tier", "nosuch", "--runs-root",
                        str(tmp_path), "--set", f"model.text.init={tmp_path}/bert",
                        "--set", "model.vision.init=deit_base_patch16_224"])
    err = capsys.readouterr().err
    assert rc == 2 and "nothing was submitted" in err
    assert f"model.text.init: {tmp_path}/bert does not exist" in err
    assert "model.vision.init: 'deit_base_patch16_224' is a hub name" in err
    assert "model.allow_download" in err
    assert "unknown resource tier 'nosuch'" in err
    rc = run_grid.main(["--dry-run", "--only", "albef", "--tier", "cpu", "--runs-root",
                        str(tmp_path)])
    assert rc == 2 and "SOFTMASK_SLURM_TIMEOUT_MIN: expected an integer, got 'abc'" in \
        capsys.readouterr().err
    monkeypatch.delenv("SOFTMASK_SLURM_TIMEOUT_MIN")
    rc = run_grid.main(["--dry-run", "--only", "albef", "--runs-root", str(tmp_path),
                        "--set", "model.vision.init=deit_base_patch16_224",
                        "--set", "model.allow_download=true"])
    assert rc == 0  # allowed to download: the hub name is fine


def test_slurm_without_a_reachable_controller_is_named(capsys, tmp_path: Path,
                                                       monkeypatch) -> None:
    monkeypatch.delenv("SLURM_CONF", raising=False)
    rc = run_grid.main(["--dry-run", "--cluster", "slurm", "--tier", "cpu", "--only", "albef",
                        "--runs-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "--cluster slurm:" in err
    assert "SLURM_CONF is not set" in err or "not on PATH" in err


def test_submission_is_all_or_nothing_across_tiers(tmp_path: Path) -> None:
    from slurm.launch import submit_slurm

    specs = expand(preset="tiny", seeds=[0], only=["albef", "full"], runs_root=tmp_path)
    specs = [dataclasses.replace(s, tier=t) for s, t in zip(specs, ["cpu", "nosuch"],
                                                             strict=True)]
    with pytest.raises(ConfigError, match="unknown resource tier 'nosuch'"):
        submit_slurm(specs, None)
    assert not (tmp_path / "softmask_ablation" / "submissions.jsonl").exists()


def test_dry_run_rejects_bad_matrix_key(capsys, tmp_path: Path) -> None:
    matrix = _copy_matrix(tmp_path)
    text = matrix.read_text().replace("seeds: [0, 1, 2]", "seed: [0, 1, 2]")
    matrix.write_text(text)
    rc = run_grid.main(["--dry-run", "--matrix", str(matrix)])
    err = capsys.readouterr().err
    assert rc == 2 and str(matrix) in err and "'seed'" in err and "seeds" in err


def _grid_args(matrix: Path, runs: Path, out: Path, cache: Path, cells: list[str],
               extra: tuple[str, ...] = ()) -> list[str]:
    args = ["--matrix", str(matrix), "--only", *cells, "--seeds", "1", "--runs-root", str(runs),
            "--results-out", str(out), "--max-parallel", "2"]
    for item in (*tiny_grid_sets(cache), *extra):
        args += ["--set", item]
    return args


@pytest.mark.slow
def test_local_grid_runs_skips_and_reports_failures(capsys, tmp_path: Path,
                                                     synthetic_cache: Path) -> None:
    matrix = _copy_matrix(tmp_path)
    # One cell that passes validation but fails at run time: its initial checkpoint exists but
    # is not a checkpoint (read only when the job starts).
    garbage = tmp_path / "init.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 64)
    matrix.write_text(matrix.read_text() + "  broken: {overrides: [], set: "
                      f"{{train.init_from: {garbage}}}}}\n")
    runs, out = tmp_path / "runs", tmp_path / "results"
    threads_before = os.environ.get("SOFTMASK_THREADS")
    rc = run_grid.main(_grid_args(matrix, runs, out, synthetic_cache, ["albef", "full", "broken"]))
    text_out = capsys.readouterr().out
    # the local jobs' share of the cores is not left behind for a later SLURM submission
    assert os.environ.get("SOFTMASK_THREADS") == threads_before
    assert rc == 1  # the broken cell failed ...
    grid = runs / "softmask_ablation"
    done = {p.parent.name.split("__")[0] for p in grid.glob("*/DONE")}
    assert done == {"albef", "full"}  # ... and lost nobody else's results
    failed = next(grid.glob("broken__*/FAILED")).read_text()
    assert "Traceback" in failed and "Error" in failed
    assert "FAILED broken" in text_out
    result = json.loads(next(grid.glob("full__*/result.json")).read_text())
    assert {"TR@1", "IR@1", "itc/TR@1", "comp/mean"} <= set(result["metrics"])
    assert result["provenance"]["k_test"] == 8 and result["provenance"]["n_images"] == 16
    table = (out / "generated" / "component_ablation.md").read_text()
    assert "missing" in table  # cells never run are marked, not silently dropped
    for name in ("component_ablation", "masking", "mlm"):
        for ext in ("md", "tex", "csv", "png"):
            assert (out / "generated" / f"{name}.{ext}").is_file()
    # Re-running the finished cells submits nothing: they are skipped, not recomputed.
    mtimes = {p: p.stat().st_mtime for p in grid.glob("*/result.json")}
    rc = run_grid.main(_grid_args(matrix, runs, out, synthetic_cache, ["albef", "full"]))
    assert rc == 0
    assert "runs to do" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime for p in grid.glob("*/result.json")} == mtimes


@pytest.mark.slow
def test_a_tiny_cell_runs_on_the_shard_path(capsys, tmp_path: Path,
                                            synthetic_cache: Path) -> None:
    """The albef cell trained from tar shards (generated from the synthetic set) with a loader
    worker, evaluated as on the JSON path; its run identity differs from the JSON cell's."""
    matrix, runs, out = _copy_matrix(tmp_path), tmp_path / "runs", tmp_path / "results"
    shard_sets = ("data.format=shards", "data.shards.streams_per_rank=2",
                  "data.shards.synthetic_maxcount=32", "data.num_workers=1")
    assert run_grid.main(_grid_args(matrix, runs, out, synthetic_cache, ["albef"],
                                    shard_sets)) == 0
    (run_dir,) = (runs / "softmask_ablation").glob("albef__*")
    result = json.loads((run_dir / "result.json").read_text())
    assert {"TR@1", "IR@1", "comp/mean"} <= set(result["metrics"])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    # 128 samples = 2 streams x 4 batches of 16 per epoch, as many as the JSON path, 2 epochs
    assert len(train_rows) == 16 and all(r["data_wait_s"] >= 0 for r in train_rows)
    shards = list((synthetic_cache).glob("synthetic_*/shards_32/*.tar"))
    assert len(shards) == 4  # 128 images, 32 per shard
    capsys.readouterr()


_CHILD_SURVIVES_SIGTERM = """
import subprocess, sys
from ablations.grid import expand
from slurm.cell_job import CellJob
if sys.argv[1] == "checkpoint":
    (spec,) = expand(preset="tiny", seeds=[0], only=["albef"], runs_root=sys.argv[2])
    CellJob().checkpoint(spec)
# Like `scontrol requeue` caught by the requeue's own SIGTERM: the child signals itself.
print(subprocess.run(["sh", "-c", "kill -TERM $$; exit 0"]).returncode)
"""


@pytest.mark.parametrize("mode, code", [("checkpoint", "0"), ("plain", "-15")])
def test_cell_checkpoint_lets_the_requeue_command_outlive_sigterm(tmp_path: Path, mode: str,
                                                                  code: str) -> None:
    """After CellJob.checkpoint, a child started next (submitit's scontrol requeue) is not
    killed by SLURM's SIGTERM; without it, the same child dies (-15), so the check can fail."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _CHILD_SURVIVES_SIGTERM, mode, str(tmp_path)],
                         capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip().splitlines()[-1] == code
