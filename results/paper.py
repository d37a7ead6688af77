"""The paper's numbers: one file, ``results/paper_numbers.yaml``, read here.

Three kinds of numbers are quoted (never reproduced): the ablation tables' retrieval numbers
(``tables``, keyed by table and cell), the downstream protocols' rows (``protocols``, keyed by
protocol and method; shown by ``python -m model.cli.evaluate`` and the downstream table) and the
computational-cost table (``cost``). Standard library and PyYAML only, so that light modules
(the benchmark's case parser) can read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PAPER_PATH = Path(__file__).with_name("paper_numbers.yaml")


@dataclass(frozen=True)
class PaperNumbers:
    """Quoted numbers: ``tables[table][cell][metric]``, with their source and setting, and the
    cost table ``cost``. The ``protocols`` section is read with the protocol registry
    (``model.config.protocols.load_protocols(..., paper_file=PAPER_PATH)``)."""

    source: str
    setting: str
    tables: dict[str, dict[str, dict[str, float]]]
    cost: dict[str, Any] = field(default_factory=dict)


def load_paper(path: Path = PAPER_PATH) -> PaperNumbers:
    """Parse paper_numbers.yaml into :class:`PaperNumbers`."""
    raw = yaml.safe_load(Path(path).read_text())
    return PaperNumbers(source=raw["source"], setting=raw["setting"], tables=raw["tables"],
                        cost=raw.get("cost") or {})
