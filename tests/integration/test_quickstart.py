"""docs/QUICKSTART.md, walked as a new user would: its command blocks run in order, in a copy
of the checkout, against a real single-node SLURM cluster, with generated files in the real
formats standing in for the downloads (COCO's Karpathy split file and JPEG images) and for the
weights (a BERT directory and a DeiT file), up to the dry run and the status view of the
paper-scale grid. A command that stops working, or a block edited into something that fails,
fails this test."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.mutations import scratch_copy
from tests.data.test_converters import (
    _COCO_IMAGES,
    _coco_filename,
    _coco_folder,
    _jpeg,
    _karpathy_coco,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "docs" / "QUICKSTART.md"
WALKED = ("$DATA", "$WEIGHTS", "$RUNS")  # a block using these is part of the walk


def walked_blocks(text: str) -> list[str]:
    """The ```bash blocks that use the walk's variables, in document order (the set-up block,
    which defines them, is the one the test replaces)."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [b for b in blocks if any(v in b for v in WALKED) and "export " not in b]


def fake_downloads(datasets: Path, weights: Path) -> None:
    """COCO's Karpathy file and images in their real layout; weights where the doc puts them."""
    _karpathy_coco(datasets / "raw" / "coco" / "dataset_coco.json")
    for i, (split, cocoid, _n) in enumerate(_COCO_IMAGES):
        _jpeg(datasets / "images" / "coco" / _coco_folder(split) / _coco_filename(split, cocoid),
              shade=20 * i)
    bert = weights / "bert-base-uncased"
    bert.mkdir(parents=True)
    (bert / "config.json").write_text("{}")
    (bert / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    (weights / "deit_base_patch16_224.pth").write_bytes(b"stand-in")


def test_the_walk_blocks_are_found() -> None:
    joined = "\n".join(walked_blocks(QUICKSTART.read_text()))
    for step in ("train.max_steps=20", "prepare coco", "prepare combine", "preflight",
                 "--dry-run", "--status"):
        assert step in joined, f"QUICKSTART lost its '{step}' step"


def test_quickstart_walk_until_the_paper_grid_dry_run(slurm_env, tmp_path: Path) -> None:
    root = scratch_copy(tmp_path / "checkout")
    datasets, weights = tmp_path / "datasets", tmp_path / "weights"
    fake_downloads(datasets, weights)
    (root / "data").symlink_to(datasets)
    script = "set -euo pipefail\n" + "\n".join(walked_blocks(QUICKSTART.read_text()))
    env = {**os.environ, "DATA": "data", "WEIGHTS": str(weights), "RUNS": str(tmp_path / "runs"),
           "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-c", script], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # 1. the smoke run trained, evaluated and wrote its own tables
    smoke = tmp_path / "runs" / "smoke-results" / "generated" / "component_ablation.md"
    assert smoke.exists() and "albef" in smoke.read_text()
    assert not (root / "results" / "generated").exists() or \
        (root / "results" / "generated" / "component_ablation.md").read_text() == \
        (REPO / "results" / "generated" / "component_ablation.md").read_text()
    # 2. the converters and the preflight saw the generated downloads
    assert (datasets / "ann" / "pretrain_4m.json").exists()
    # 3.-4. the paper-scale grid validated on the cluster, nothing submitted, all missing
    assert "dry run: 33 runs validated, nothing submitted" in out
    assert "8 rank(s)" in out
    assert not list((tmp_path / "runs").glob("softmask_ablation/*/DONE"))
    assert len(re.findall(r"\| missing\s+\|", out)) == 33  # --status before any job exists
