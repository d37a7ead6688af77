"""The prepared device check runs end to end on CPU at tiny size (what CI can run of it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.gpu_check import main, plan


def test_cuda_plan_covers_the_paper_cost_table_and_coco5k_retrieval(tmp_path: Path) -> None:
    steps = {s.name: s for s in plan("cuda", tmp_path)}
    assert list(steps) == ["tests", "cost", "retrieval", "parity", "levers"]
    cost = " ".join(steps["cost"].args)
    assert "--preset base" in cost and "--batch 64 128" in cost and "fp32 bf16" in cost
    assert "--images 5000 --k 256" in " ".join(steps["retrieval"].args)
    assert "--steps 200" in " ".join(steps["parity"].args)
    levers = " ".join(steps["levers"].args)
    assert "--preset base" in levers and "albef_ckpt" in levers and "ours_ckpt" in levers
    # The paper-scale plan fits two device calls of 10 minutes (``--only`` splits it), by
    # construction: every step has a time limit.
    assert sum(s.timeout_s for s in steps.values()) <= 1200


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu_writes_every_output(tmp_path: Path) -> None:
    out = tmp_path / "check"
    assert main(["--device", "cpu", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["step"] for r in summary["steps"]] == ["tests", "cost", "retrieval", "parity",
                                                     "levers"]
    assert all(r["status"] == "ok" for r in summary["steps"]), summary
    assert json.loads((out / "environment.json").read_text())
    assert (out / "tests.xml").is_file()  # the gpu tests were collected (and skipped)
    assert (out / "cost" / "cost_table.md").is_file() or any((out / "cost").rglob("*.md"))
    assert any((out / "retrieval").rglob("*"))
    assert (out / "levers" / "cost_table.md").is_file()
    parity = json.loads((out / "parity" / "parity.json").read_text())
    # CPU against CPU with the same seed: the same run twice.
    assert all(v == 0.0 for v in parity["mean_rel_diff_second_half"].values()), parity
