"""The loss-term seam (docs/ARCHITECTURE.md "Adding a loss term"), proved on its worked example
``loss.itm_label_smoothing``.

* the option reaches the step: the ITM term equals an independent label-smoothed
  cross-entropy of the ITM head's own logits, recomputed by hand (not with F.cross_entropy);
* its default is ALBEF, bit for bit, and leaves every existing run's recipe hash unchanged,
  while a non-default value is part of the recipe;
* a bad value is refused with the key named;
* the total is the weighted sum of the logged terms (LossConfig.TERMS), and every logged
  ``loss/<term>`` becomes a curve without touching results/.
"""

from __future__ import annotations

import pytest
import torch

from model.config.experiment import load_experiment, recipe_hash
from model.config.loader import ConfigError
from model.config.schema import LossConfig
from model.objective import ObjectiveConfig
from results.collect import curve_order, is_curve_key
from tests.core.test_softmask_method import make_batch, make_cfg, make_objective, run_step


def _smoothed_ce(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """Label smoothing from its definition: target (1 - eps) one-hot + eps / C uniform."""
    logp = logits.double().log_softmax(dim=1)
    classes = logits.shape[1]
    target = torch.full_like(logp, eps / classes)
    target[torch.arange(len(labels)), labels] += 1.0 - eps
    return -(target * logp).sum(dim=1).mean()


@pytest.mark.parametrize("softmask", ["off", "gradcam"])
def test_itm_label_smoothing_reaches_the_itm_term(softmask: str) -> None:
    eps = 0.2
    obj = make_objective(make_cfg(f"loss.itm_label_smoothing={eps}", f"softmask.mode={softmask}"))
    logits: list[torch.Tensor] = []
    handle = obj.student.itm_head.register_forward_hook(
        lambda _m, _a, out: logits.append(out.detach()))
    try:
        out, _ = run_step(obj, make_batch())
    finally:
        handle.remove()
    # The ITM head's calls in order: positives (B), negatives (2B), soft-masked positives (B).
    rows = torch.cat(logits)
    b = make_batch()["input_ids"].shape[0]
    assert rows.shape[0] == (4 * b if softmask != "off" else 3 * b)
    labels = torch.zeros(rows.shape[0], dtype=torch.long)
    labels[:b] = 1
    labels[3 * b:] = 1
    expected = _smoothed_ce(rows, labels, eps)
    torch.testing.assert_close(out.losses["itm"].double(), expected, rtol=1e-5, atol=1e-6)
    plain = _smoothed_ce(rows, labels, 0.0)
    assert abs(float(expected - plain)) > 1e-3  # the option really changes the term


def test_label_smoothing_default_is_albef_and_outside_old_hashes() -> None:
    base = make_cfg()
    explicit = make_cfg("loss.itm_label_smoothing=0.0")
    assert recipe_hash(base) == recipe_hash(explicit)  # omitted at its default: old runs keep ids
    assert recipe_hash(make_cfg("loss.itm_label_smoothing=0.1")) != recipe_hash(base)
    a, _ = run_step(make_objective(base), make_batch())
    b, _ = run_step(make_objective(explicit), make_batch())
    assert torch.equal(a.losses["itm"], b.losses["itm"])
    assert torch.equal(a.loss, b.loss)


@pytest.mark.parametrize("value", ["1.0", "-0.1"])
def test_bad_label_smoothing_names_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match="itm_label_smoothing"):
        load_experiment(preset="tiny", sets=[f"loss.itm_label_smoothing={value}"])


def test_total_is_the_weighted_sum_of_logged_terms() -> None:
    cfg = make_cfg("loss.itc=0.5", "loss.itm=2.0", "loss.mlm=0.25")
    out, _ = run_step(make_objective(cfg), make_batch())
    weights = ObjectiveConfig.of(cfg).weights
    assert set(out.losses) == set(LossConfig.TERMS)
    total = sum(weights[k] * v for k, v in out.losses.items())
    torch.testing.assert_close(out.loss, total)
    retrieval = ObjectiveConfig.of(load_experiment(preset="tiny", sets=["train.mode=retrieval"]))
    assert retrieval.weights["mlm"] == 0.0  # ALBEF's retrieval fine-tuning has no MLM


def test_a_new_loss_term_becomes_a_curve() -> None:
    logged = ["loss/itc", "loss/itm", "loss/mlm", "loss/total", "loss/region", "itm/pos_acc",
              "lr", "temp", "itm/pos_loss"]
    drawn = [k for k in logged if is_curve_key(k)]
    assert curve_order(drawn) == ["loss/total", "loss/itc", "loss/itm", "loss/mlm",
                                  "loss/region", "itm/pos_acc"]
