"""The benchmark's cases: what ``cases.yaml`` declares and the synthetic batch of a case.

A *variant* is one row of the cost table (a list of config overrides), a *model* is a preset
plus overrides, and a *case* is one (model, batch, precision) cell with the variants compared
in it. Building a variant goes through the trainer's own ``build_objective`` and
``build_optimizer``, so nothing here re-implements the model.

Kept free of timing and reporting code: ``benchmarks.bench_memory`` (a fresh process per
variant) and ``benchmarks.bench_retrieval`` import this module without pulling those in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from model.build import build_objective
from model.config.experiment import load_experiment
from model.config.schema import ExperimentConfig
from model.engine.optim import build_optimizer
from model.text_masking import SpecialIds
from results.paper import load_paper

DEFAULT_CASES = Path(__file__).with_name("cases.yaml")
REFERENCE = "albef"


@dataclass(frozen=True)
class Variant:
    """One row of the cost table: a name, its display label and its config overrides."""

    name: str
    label: str
    sets: tuple[str, ...]


@dataclass(frozen=True)
class ModelSpec:
    """A model size: preset + overrides, and the token ids that stand in for a tokenizer."""

    name: str
    preset: str
    sets: tuple[str, ...]
    special: SpecialIds


@dataclass(frozen=True)
class TextSpec:
    """Synthetic caption lengths: [CLS] + ~N(mean, std) tokens in [min_len, max_len]."""

    max_len: int = 25
    mean_len: float = 13.0
    std_len: float = 4.0
    min_len: int = 5


@dataclass(frozen=True)
class Case:
    """One (model, batch, precision) cell and the variants compared in it."""

    model: ModelSpec
    batch: int
    precision: str
    variants: tuple[Variant, ...]
    text: TextSpec = field(default_factory=TextSpec)

    @property
    def name(self) -> str:
        """e.g. ``tiny-b32-fp32``."""
        return f"{self.model.name}-b{self.batch}-{self.precision}"


@dataclass(frozen=True)
class Suite:
    """Everything ``cases.yaml`` holds, parsed."""

    variants: dict[str, Variant]
    models: dict[str, ModelSpec]
    grid: dict[str, list[dict[str, Any]]]
    text: TextSpec
    peak: dict[str, dict[str, int]]
    paper: dict[str, Any]
    planning: dict[str, float]
    path: Path = DEFAULT_CASES


def load_suite(path: str | Path = DEFAULT_CASES) -> Suite:
    """Parse ``cases.yaml`` (variants, models, case grid, planning); the paper's cost numbers
    come from results/paper_numbers.yaml."""
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    variants = {k: Variant(k, v["label"], tuple(v["set"])) for k, v in raw["variants"].items()}
    if REFERENCE not in variants:
        raise ValueError(f"{path}: the variants must include the reference '{REFERENCE}'")
    models = {
        k: ModelSpec(k, v["preset"], tuple(v["set"]),
                     SpecialIds(vocab_size=int(v["vocab_size"]), **v["special"]))
        for k, v in raw["models"].items()
    }
    # YAML 1.1 reads "4.0e6" as a string: coerce the planning numbers explicitly.
    planning = {k: float(v) for k, v in raw["planning"].items()}
    return Suite(variants, models, raw["cases"], TextSpec(**raw["text"]), raw["peak"],
                 load_paper().cost, planning, Path(path))


def _pick(available: Sequence[Any], wanted: Sequence[Any] | None, what: str) -> list[Any]:
    """``wanted`` in ``available`` order (all when None); unknown names raise."""
    if wanted is None:
        return list(available)
    unknown = [w for w in wanted if w not in available]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; available: {list(available)}")
    return [a for a in available if a in wanted]


def select_cases(suite: Suite, device_kind: str, presets: Sequence[str] | None = None,
                 batches: Sequence[int] | None = None, precisions: Sequence[str] | None = None,
                 variants: Sequence[str] | None = None) -> list[Case]:
    """Expand the grid of ``device_kind`` ('cpu' or 'cuda'), filtered by the given values.

    A batch or preset given explicitly but absent from the grid is still run (with the
    grid's precisions), so one-off sizes need no YAML edit.
    """
    if device_kind not in suite.grid:
        raise ValueError(f"no cases for device kind {device_kind!r}; have {list(suite.grid)}")
    if device_kind != "cuda" and precisions is not None and "bf16" in precisions:
        raise ValueError("bf16 autocast is CUDA-only (model/engine/step.py); use fp32 on CPU")
    names = _pick(list(suite.variants), variants, "variants")
    if REFERENCE not in names:
        names.insert(0, REFERENCE)  # every ratio needs the reference in the same rounds
    chosen = tuple(suite.variants[n] for n in names)
    cells: list[Case] = []
    for entry in suite.grid[device_kind]:
        if presets is not None and entry["model"] not in presets:
            continue
        for batch in (batches or entry["batch"]):
            for precision in _pick(entry["precision"], precisions, "precisions"):
                cells.append(Case(suite.models[entry["model"]], int(batch), precision,
                                  chosen, suite.text))
    if presets is not None and not cells:
        unknown = [p for p in presets if p not in suite.models]
        if unknown:
            raise ValueError(f"unknown presets {unknown}; available: {list(suite.models)}")
        cells = [Case(suite.models[p], int(b), pr, chosen, suite.text)
                 for p in presets for b in (batches or [16]) for pr in (precisions or ["fp32"])]
    check_configs(cells, suite.path)
    return cells


def check_configs(cases: Sequence[Case], path: Path) -> None:
    """Resolve every (case, variant) config now, so that an impossible one (e.g. batch 1, a
    bad override in ``cases.yaml``) is refused before anything is timed or submitted rather
    than crashing the run halfway."""
    errors = []
    for case in cases:
        for variant in case.variants:
            try:
                experiment_config(case, variant)
            except ValueError as exc:  # ConfigError lists every bad key
                errors.append(f"case {case.name}, variant {variant.name}: {exc}")
    if errors:
        raise ValueError(f"{path}: invalid benchmark configs:\n" + "\n".join(errors))


def experiment_config(case: Case, variant: Variant) -> ExperimentConfig:
    """The resolved config of one variant in one case (batch and precision included)."""
    sets = [*case.model.sets, *variant.sets, f"train.batch_size={case.batch}",
            f"train.precision={case.precision}"]
    return load_experiment(preset=case.model.preset, sets=sets)


def build_variant(case: Case, variant: Variant, device: torch.device, seed: int
                  ) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Objective + optimizer exactly as training builds them; same seed for every variant."""
    cfg = experiment_config(case, variant)
    torch.manual_seed(seed)  # identical initial weights across variants
    objective = build_objective(cfg, case.model.special, seed=seed).to(device)
    objective.train()
    return objective, build_optimizer(objective, cfg.train)


def make_batch(case: Case, device: torch.device, seed: int) -> dict[str, Tensor]:
    """A synthetic pre-training batch: two image views and padded [CLS]-first captions.

    Lengths follow ``case.text`` and the batch is padded to its longest caption, as ALBEF's
    tokenizer call (padding='longest', max_length=25) does; there is no [SEP].
    """
    cfg = experiment_config(case, case.variants[0])
    size, b, t, sp = cfg.model.vision.image_size, case.batch, case.text, case.model.special
    gen = torch.Generator().manual_seed(seed)
    lengths = (torch.randn(b, generator=gen) * t.std_len + t.mean_len).round()
    lengths = lengths.clamp(t.min_len, t.max_len).long()
    width = int(lengths.max())
    first_word = max(sp.pad, sp.cls, sp.mask) + 1  # word ids never collide with specials
    ids = torch.randint(first_word, sp.vocab_size, (b, width), generator=gen)
    attention = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = torch.where(attention.bool(), ids, torch.full_like(ids, sp.pad))
    ids[:, 0] = sp.cls
    batch = {
        "image": torch.randn(b, 3, size, size, generator=gen),
        "image_strong": torch.randn(b, 3, size, size, generator=gen),
        "input_ids": ids,
        "attention_mask": attention,
    }
    return {k: v.to(device) for k, v in batch.items()}
