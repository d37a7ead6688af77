"""Results are merged, never overwritten; malformed raw lines are reported with file and line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from results.__main__ import main
from results.raw_format import RawFileError, read_raw, read_raw_lines
from tests.results.test_tables_and_plots import GRID, _metrics, make_run


def _raw(tmp_path: Path) -> Path:
    """A raw summary from a two-cell grid (albef and softmask, seed 0)."""
    runs = tmp_path / "runs_full"
    make_run(runs, "albef", 0, "done")
    make_run(runs, "softmask", 0, "done", metrics={**_metrics("softmask", 0), "TR@1": 33.0})
    assert main(["--runs", str(runs), "--grid", GRID, "--seeds", "0", "--out",
                 str(tmp_path / "gen0"), "--raw-dir", str(tmp_path / "raw")]) == 0
    return tmp_path / "raw" / f"{GRID}.jsonl"


def _row(markdown: str, label: str) -> str:
    return next(line for line in markdown.splitlines() if line.startswith(f"| {label} "))


def test_a_partial_grid_keeps_every_other_row_and_table_row(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    before = {json.loads(x)["run_id"]: json.loads(x) for x in raw.read_text().splitlines()
              if json.loads(x)["record"] == "run"}
    # A later partial grid: only albef, rerun under a new config, with new numbers.
    partial = tmp_path / "runs_partial"
    make_run(partial, "albef", 0, "done", config_hash="new1", created="2025-03-01T00:00:00",
             metrics={**_metrics("albef", 0), "TR@1": 50.0})
    assert main(["--runs", str(partial), "--grid", GRID, "--seeds", "0", "--out",
                 str(tmp_path / "gen1"), "--raw-dir", str(tmp_path / "raw")]) == 0
    after = {json.loads(x)["run_id"]: json.loads(x) for x in raw.read_text().splitlines()
             if json.loads(x)["record"] == "run"}
    assert after["albef__s0__new1"]["metrics"]["TR@1"] == 50.0
    assert "albef__s0__abc123" not in after  # replaced: one row per cell and seed
    assert after["softmask__s0__abc123"] == before["softmask__s0__abc123"]  # kept as it was
    table = (tmp_path / "gen1" / "component_ablation.md").read_text()
    assert "33.00" in _row(table, "softmask")  # the kept row is still in the table
    assert "50.00" in _row(table, "albef")
    curves = [json.loads(x) for x in raw.read_text().splitlines()
              if json.loads(x)["record"] == "curve"]
    assert {c["run_id"] for c in curves} == {"albef__s0__new1", "softmask__s0__abc123"}


def test_no_merge_overwrites_only_when_asked(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    partial = tmp_path / "runs_partial"
    make_run(partial, "albef", 0, "done")
    assert main(["--runs", str(partial), "--grid", GRID, "--seeds", "0", "--no-merge",
                 "--out", str(tmp_path / "gen"), "--raw-dir", str(tmp_path / "raw")]) == 0
    runs = [json.loads(x) for x in raw.read_text().splitlines()]
    softmask = [r for r in runs if r.get("cell") == "softmask" and r["record"] == "run"]
    assert softmask[0]["status"] == "missing"


BAD_LINES = {
    "not json": "{truncated",
    "no metrics": {"record": "run", "cell": "x", "seed": 0, "run_id": "x__s0__1",
                   "status": "done", "metrics": {}},
    "nan": {"record": "run", "cell": "y", "seed": 0, "run_id": "y__s0__1", "status": "done",
            "metrics": {"TR@1": float("nan")}},
    "string metric": {"record": "run", "cell": "z", "seed": 0, "run_id": "z__s0__1",
                      "status": "done", "metrics": {"TR@1": "high"}},
    "array": [1, 2, 3],
}


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_each_bad_raw_line_is_named_with_file_and_line(tmp_path: Path, kind: str) -> None:
    raw = _raw(tmp_path)
    bad = BAD_LINES[kind]
    text = raw.read_text() + (bad if isinstance(bad, str) else json.dumps(bad)) + "\n"
    raw.write_text(text)
    line_no = len(text.splitlines())
    with pytest.raises(RawFileError) as err:
        read_raw(raw)
    assert f"{raw}:{line_no}:" in str(err.value)
    frame = read_raw(raw, skip_bad=True)
    assert frame.attrs["skipped_lines"] == 1


def test_conflicting_duplicate_names_both_lines(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    lines = raw.read_text().splitlines()
    first = next(i for i, x in enumerate(lines) if '"cell": "albef"' in x and '"run"' in x)
    dup = json.loads(lines[first])
    dup["metrics"]["TR@1"] = 99.0
    raw.write_text("\n".join([*lines, json.dumps(dup, sort_keys=True)]) + "\n")
    with pytest.raises(RawFileError, match=rf":{len(lines) + 1}: run .* also on line "
                                           rf"{first + 1} with different content"):
        read_raw_lines(raw)
    runs, _, skipped = read_raw_lines(raw, skip_bad=True)
    assert skipped == 2 and all(r["cell"] != "albef" for r in runs)  # neither wins


def test_cli_exits_nonzero_on_bad_lines_and_captions_say_what_was_skipped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raw = _raw(tmp_path)
    raw.write_text(raw.read_text() + "{truncated\n")
    with caplog.at_level(logging.ERROR):
        assert main(["--raw", str(raw), "--out", str(tmp_path / "g")]) == 2
    assert f"{raw}:" in caplog.text and "--skip-bad" in caplog.text
    assert main(["--raw", str(raw), "--out", str(tmp_path / "g"), "--skip-bad"]) == 0
    caption = (tmp_path / "g" / "component_ablation.md").read_text().splitlines()[0]
    assert "1 malformed raw line(s) were skipped" in caption
