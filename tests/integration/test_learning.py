"""A tiny pre-training run on the synthetic set learns: zero-shot retrieval far above chance, and
ITM matches image and text instead of sitting at its class prior."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.cell.pipeline import run_cell
from model.config.experiment import load_experiment


@pytest.mark.slow
def test_tiny_albef_pretraining_lifts_zero_shot_retrieval(tmp_path: Path,
                                                           synthetic_cache: Path) -> None:
    cfg = load_experiment(preset="tiny", sets=[f"data.cache_dir={synthetic_cache}",
                                               "data.num_workers=0"])
    result = run_cell(cfg, tmp_path / "albef", identity={"cell": "albef", "seed": 0})
    m, p = result["metrics"], result["provenance"]
    n_images, n_texts = p["n_images"], p["n_texts"]
    chance_tr, chance_ir = 100 * 5 / n_texts, 100 / n_images  # 5 captions per image
    # "Far above chance": at least 4x in both directions (measured in the default run: 16x, 11x).
    assert m["TR@1"] > 4 * chance_tr, m
    assert m["IR@1"] > 4 * chance_ir, m
    assert result["last_losses"]["loss/itc"] < result["first_losses"]["loss/itc"] - 1.0
    # ITM learned to match, not just the 1:2 class prior (whose clean-pair loss is 0.6365 and
    # whose positive accuracy is 0): measured in the default run, clean loss ~0.2.
    assert m["itm/clean_loss"] < 0.5, m
    assert m["itm/pos_acc"] > 50.0, m
    # ...and it tells a test image's caption from another scene's (a prior-only head ties at
    # chance here: every logit is the same).
    assert m["comp/random"] > 80.0, m
