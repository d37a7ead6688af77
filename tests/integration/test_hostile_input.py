"""Hostile and odd input, one test per finding: nothing runs code or writes outside its folder,
every bad value is refused by the dry run with its key and range, bytes and broken shards are
named before a job starts, a resumed run logs what an uninterrupted one logs, and the status
view, raw rows and tables agree on a run's state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import ablations.run_grid as run_grid
from model.cell.pipeline import run_cell
from model.config.experiment import load_experiment
from model.data.shards import ShardError, read_shard_index
from model.engine.run_io import append_jsonl
from model.safe_paths import UnsafePathError
from results.collect import collect_runs
from results.tables import build_tables
from slurm.status import DiskView, SchedulerView, classify, grid_status
from tests.tiny import tiny_grid_sets

REPO = Path(__file__).resolve().parents[2]


def _dry(tmp_path: Path, *extra: str) -> list[str]:
    return ["--dry-run", "--only", "albef", "--runs-root", str(tmp_path / "runs"),
            "--results-out", str(tmp_path / "results"), *extra]


def _nothing_written(tmp_path: Path) -> bool:
    return not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


# ------------------------------------------------------------------------------- security


def _write_shard(path: Path, n: int) -> None:
    """A tar shard of ``n`` samples (caption + a few image bytes; never decoded here)."""
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for ext, data in (("txt", b"a red circle"), ("png", b"\x89PNG not really")):
                member = tarfile.TarInfo(f"{i:05d}.{ext}")
                member.size = len(data)
                tar.addfile(member, __import__("io").BytesIO(data))


def test_a_pipe_url_in_a_shard_index_runs_nothing_unless_allowed(tmp_path: Path,
                                                                 capsys) -> None:
    _write_shard(tmp_path / "00000.tar", 3)
    pwned = tmp_path / "PWNED"
    index = tmp_path / "shards.json"
    index.write_text(json.dumps({"shardlist": [
        {"url": f"pipe:touch {pwned}; cat {tmp_path}/00000.tar", "nsamples": 3}]}))
    with pytest.raises(ShardError, match="is a shell command .* set data.shards.allow_pipe"):
        read_shard_index(index)  # the job's reader (model/engine/data.py) refuses it too
    base = ["--preset", "base", "--set", "data.format=shards", "--set",
            f"data.shards.index={index}"]
    assert run_grid.main(_dry(tmp_path, *base)) == 2
    assert "which every node would run" in capsys.readouterr().err
    assert not pwned.exists()
    # Allowed explicitly: the dry run names the command (it does not run it) ...
    run_grid.main(_dry(tmp_path, *base, "--set", "data.shards.allow_pipe=true"))
    out = capsys.readouterr().out
    assert f"e.g. 'touch {pwned}; cat {tmp_path}/00000.tar'" in out and not pwned.exists()
    # ... and the job's reader would run it: the refusal above is what stops it.
    from model.data.shards import iter_shard

    urls = read_shard_index(index, allow_pipe=True).urls
    assert len(list(iter_shard(urls[0]))) == 3 and pwned.exists()


@pytest.mark.parametrize(("old", "new", "message"), [
    ("grid: softmask_ablation", "grid: ../../../g", "grid '../../../g' is not a safe name"),
    ("  albef:          {overrides: []}", "  ../../../x:     {overrides: []}",
     "cells '../../../x' is not a safe name"),
])
def test_names_that_would_escape_their_folder_are_refused(tmp_path: Path, capsys, old: str,
                                                          new: str, message: str) -> None:
    matrix = tmp_path / "ablations" / "matrix.yaml"
    matrix.parent.mkdir()
    for item in (REPO / "ablations").iterdir():
        if item.suffix == ".yaml" or item.is_dir():
            target = matrix.parent / item.name
            (target.symlink_to(item) if item.is_dir() else target.write_text(item.read_text()))
    matrix.write_text(matrix.read_text().replace(old, new))
    argv = ["--dry-run", "--matrix", str(matrix), "--runs-root", str(tmp_path / "runs")]
    assert run_grid.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not list(tmp_path.parent.glob("g")) \
        and not (tmp_path.parent.parent / "x").exists()


def test_a_symlink_in_a_run_folder_is_never_written_through(tmp_path: Path, capsys,
                                                            synthetic_cache: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    with pytest.raises(UnsafePathError, match="is a symlink"):
        (tmp_path / "m.jsonl").symlink_to(victim)
        append_jsonl(tmp_path / "m.jsonl", {"step": 1})
    sets = tiny_grid_sets(synthetic_cache)
    argv = ["--only", "albef", "--runs-root", str(tmp_path / "runs"), "--results-out",
            str(tmp_path / "out"), *[x for s in sets for x in ("--set", s)]]
    assert run_grid.main(["--dry-run", *argv]) == 0
    run_dir = next((tmp_path / "runs").rglob("albef__s0__*"), None) or (
        tmp_path / "runs" / "softmask_ablation" / _planned_id(sets))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").symlink_to(victim)
    assert run_grid.main(["--dry-run", *argv]) == 2
    assert "metrics.jsonl is a symlink" in capsys.readouterr().err
    cfg = load_experiment(preset="tiny", sets=sets)
    with pytest.raises(UnsafePathError, match="metrics.jsonl is a symlink"):
        run_cell(cfg, run_dir)
    assert victim.read_text() == "keep me\n"


def _planned_id(sets: list[str]) -> str:
    from ablations.grid import expand

    return expand(preset="tiny", seeds=[0], only=["albef"], sets=sets)[0].run_id


def test_a_python_tag_in_a_run_config_is_one_line_and_runs_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    pwned = tmp_path / "PWNED"
    (run / "config.yaml").write_text(f'model: !!python/object/apply:os.system ["touch {pwned}"]\n')
    proc = subprocess.run([sys.executable, "-m", "model.cli.gallery", "--run-dir", str(run)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and "python/object/apply" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not pwned.exists()


# ------------------------------------------------------------------- values refused early


@pytest.mark.parametrize(("setting", "message"), [
    ("model.text.vocab_size=10", "model.text.vocab_size=10: data.kind=synthetic builds"),
    ("model.embed_dim=0", "embed_dim must be >= 1, got 0"),
    ("model.vision.image_size=0", "image_size must be >= patch_size=8 (at least one patch)"),
    ("model.vision.width=0", "width must be >= heads=2"),
    ("model.text.hidden=0", "hidden must be >= heads=2"),
    ("model.text.max_positions=4", "model.text.max_positions=4 must be >= the longest "
                                   "tokenized caption"),
    ("data.synthetic.n_train_images=0", "n_train_images must be >= 1, got 0"),
    ("data.synthetic.n_test_images=0", "n_test_images must be >= 1, got 0"),
])
def test_bad_values_are_refused_by_the_dry_run(tmp_path: Path, capsys, setting: str,
                                               message: str) -> None:
    # an empty data cache: the synthetic vocabulary does not exist yet, whatever ran before
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    assert run_grid.main(_dry(tmp_path, "--set", setting, "--set", cache)) == 2
    err = capsys.readouterr().err
    assert message in err and setting.split("=")[0].rsplit(".", 1)[-1] in err
    assert _nothing_written(tmp_path)


def test_vocab_size_is_checked_against_the_tokenizer_when_the_job_builds_it(
        tmp_path: Path, synthetic_cache: Path) -> None:
    cfg = load_experiment(preset="tiny", sets=[*tiny_grid_sets(synthetic_cache),
                                               "model.text.vocab_size=10"])
    with pytest.raises(ValueError, match="model.text.vocab_size=10 but the tokenizer has"):
        run_cell(cfg, tmp_path / "run")


def test_a_cell_listing_an_override_twice_and_an_empty_matrix_are_refused(
        tmp_path: Path, capsys) -> None:
    matrix = tmp_path / "matrix.yaml"
    for item in ("overrides", "protocols", "protocols.yaml", "base.yaml"):
        (tmp_path / item).symlink_to(REPO / "ablations" / item)
    matrix.write_text("grid: g\nbase: base.yaml\ncells:\n  twice: {overrides: [mmda.yaml, "
                      "mmda.yaml]}\n")
    assert run_grid.main(["--dry-run", "--matrix", str(matrix), "--runs-root",
                          str(tmp_path / "runs")]) == 2
    assert "cells.twice.overrides lists ['mmda.yaml'] more than once" in capsys.readouterr().err
    matrix.write_text("grid: g\ncells: {}\n")
    assert run_grid.main(["--dry-run", "--matrix", str(matrix), "--runs-root",
                          str(tmp_path / "runs")]) == 2
    assert "cells must name at least one cell" in capsys.readouterr().err


@pytest.mark.parametrize(("env", "message"), [
    ({"SOFTMASK_SLURM_NODES": "-1"}, "environment SOFTMASK_SLURM_NODES: nodes must be >= 1"),
    ({"SOFTMASK_SLURM_BOGUS": "1"}, "environment SOFTMASK_SLURM_BOGUS: not a resource setting"),
])
def test_slurm_environment_overrides_are_validated_in_the_dry_run(
        tmp_path: Path, capsys, monkeypatch, env: dict[str, str], message: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert run_grid.main(_dry(tmp_path)) == 2
    assert message in capsys.readouterr().err and _nothing_written(tmp_path)


# ------------------------------------------------------------------------ bytes and paths


def test_a_caption_file_with_bytes_that_are_not_utf8_is_named_with_the_offset(
        tmp_path: Path, capsys) -> None:
    bad = tmp_path / "captions.json"
    bad.write_bytes(b'[{"image": "a.jpg", "caption": "a red \xff circle"}]')
    (tmp_path / "images").mkdir()
    assert run_grid.main(_dry(tmp_path, "--preset", "base", "--set",
                              f"data.train_files=[{bad}]", "--set", f"data.eval_file={bad}",
                              "--set", f"data.image_root={tmp_path}/images")) == 2
    err = capsys.readouterr().err
    assert f"{bad}: not UTF-8 text: invalid byte 0xff at byte offset 38" in err
    proc = subprocess.run([sys.executable, "-m", "model.cli.preflight", str(bad), "--image-root",
                           str(tmp_path / "images")], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "invalid byte 0xff at byte offset 38" in proc.stdout


@pytest.mark.parametrize("where", ["results under a file", "runs root is a file"])
def test_output_paths_are_checked_before_anything_runs(tmp_path: Path, capsys,
                                                       where: str) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    if where == "results under a file":
        argv = ["--only", "albef", "--runs-root", str(tmp_path / "runs"), "--results-out",
                str(a_file / "results")]
        message = f"--results-out {a_file}/results: lies under {a_file}, which is a file"
    else:
        argv = ["--only", "albef", "--runs-root", str(a_file), "--results-out",
                str(tmp_path / "results")]
        message = f"--runs-root {a_file}: is an existing file, not a directory"
    assert run_grid.main(argv) == 2  # not a dry run: nothing may train first
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_shard_counts_and_unreadable_shards_are_found_by_the_dry_run(tmp_path: Path,
                                                                     capsys) -> None:
    _write_shard(tmp_path / "00000.tar", 50)
    (tmp_path / "00001.tar").write_bytes(os.urandom(4096))
    index = tmp_path / "shards.json"
    index.write_text(json.dumps({"shardlist": [{"url": "00000.tar", "nsamples": 500},
                                               {"url": "00001.tar", "nsamples": 10}]}))
    assert run_grid.main(_dry(tmp_path, "--preset", "base", "--set", "data.format=shards",
                              "--set", f"data.shards.index={index}")) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/00000.tar holds 50 sample(s) but the index says 500" in err
    assert f"shard {tmp_path}/00001.tar is not a readable tar archive" in err


# ------------------------------------------------------------- resume logs what it would


_KILL_SCRIPT = """
import os, signal, sys
import torch
torch.set_num_threads(1)  # as the test process: the same float summation order
sys.path.insert(0, {tests!r})
import model.engine.train as T
from model.cell.pipeline import run_cell
from model.config.experiment import load_experiment
kill_at, after_save = {kill_at}, {after_save}
if after_save:
    real_save = T._save
    def _save(tr):
        real_save(tr)
        if tr.state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    T._save = _save
else:
    real_watch = T._watch
    def _watch(tr, out, lr):
        real_watch(tr, out, lr)
        if tr.state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    T._watch = _watch
cfg = load_experiment(preset="tiny", sets={sets!r})
run_cell(cfg, {run_dir!r}, identity={{"cell": "albef"}})
"""


def _lines(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time_s", "data_wait_s")} for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize(("kill_at", "after_save"), [(27, False), (20, True)],
                         ids=["between-checkpoints", "at-a-checkpoint"])
def test_a_resumed_run_logs_exactly_what_an_uninterrupted_run_logs(
        tmp_path: Path, synthetic_cache: Path, kill_at: int, after_save: bool) -> None:
    sets = [*tiny_grid_sets(synthetic_cache, epochs=5), "train.log_every=5",
            "train.checkpoint_every=10", "train.max_steps=40"]
    cfg = load_experiment(preset="tiny", sets=sets)
    whole = run_cell(cfg, tmp_path / "whole", identity={"cell": "albef"})
    script = _KILL_SCRIPT.format(tests=str(REPO / "tests"), kill_at=kill_at,
                                 after_save=after_save, sets=sets,
                                 run_dir=str(tmp_path / "killed"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed, no cleanup
    logged = [r["step"] for r in _lines(tmp_path / "killed") if r["kind"] == "train"]
    assert max(logged) == 25 if not after_save else 20
    resumed = run_cell(cfg, tmp_path / "killed", identity={"cell": "albef"})
    assert resumed["resumed_from"] == 20
    assert _lines(tmp_path / "killed") == _lines(tmp_path / "whole")
    assert resumed["metrics"] == whole["metrics"]  # incl. the last-quarter ITM diagnostics
    clock = ("time_s", "data_wait_s")
    assert {k: v for k, v in resumed["first_losses"].items() if k not in clock} == \
        {k: v for k, v in whole["first_losses"].items() if k not in clock}


# ------------------------------------------------------------------- one verdict per run


def test_a_job_waiting_for_its_requeue_is_requeued_not_failed() -> None:
    waiting = SchedulerView("PENDING", "0:0", 12.0, 2, True)
    assert classify(DiskView("failed", "SIGTERM"), waiting)[0] == "requeued"
    running_again = SchedulerView("RUNNING", "0:0", 30.0, 2, True)
    assert classify(DiskView("failed", "SIGTERM"), running_again)[0] == "running"
    first_attempt = SchedulerView("RUNNING", "0:0", 3.0, 1, False)  # still exiting
    assert classify(DiskView("failed", "boom"), first_attempt)[0] == "failed"


def test_status_raw_rows_and_tables_agree_on_diverged(tmp_path: Path) -> None:
    grid = tmp_path / "runs" / "g"
    run = grid / "albef__s0__abc"
    run.mkdir(parents=True)
    (run / "meta.json").write_text(json.dumps({"cell": "albef", "seed": 0, "preset": "tiny"}))
    (run / "FAILED").write_text("Diverged: training diverged at step 3: non-finite grad_norm "
                                "(learning rate 10); the last good checkpoint is ...\n")
    assert grid_status(grid, query_scheduler=False).loc[0, "state"] == "diverged"
    frame = collect_runs(tmp_path / "runs", "g", cells=["albef"], seeds=[0])
    assert set(frame["status"]) == {"diverged"}
    row = next(x for x in build_tables(frame)["component_ablation"].markdown.splitlines()
               if x.startswith("| albef"))
    assert "diverged" in row and "failed" not in row


def test_the_grid_reports_a_diverged_run_in_one_line(tmp_path: Path, capsys,
                                                     synthetic_cache: Path) -> None:
    sets = [*tiny_grid_sets(synthetic_cache), "train.lr=1", "train.warmup_steps=0",
            "train.max_steps=8"]
    rc = run_grid.main(["--only", "albef", "--runs-root", str(tmp_path / "runs"),
                        "--results-out", str(tmp_path / "out"), "--cluster", "debug",
                        *[x for s in sets for x in ("--set", s)]])
    out = capsys.readouterr().out
    assert rc == 1
    line = next(x for x in out.splitlines() if x.startswith("DIVERGED"))
    assert "finite blow-up at step" in line and "Traceback" not in out
