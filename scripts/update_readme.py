"""Copy the generated tables into README.md and docs/QUICKSTART.md between their markers
(never edit them by hand).

    python scripts/update_readme.py

README.md: ``<!-- ablation-tables:begin/end -->`` <- results/generated/summary.md,
``<!-- seeds-table:begin/end -->`` <- results/tiny_3seeds/generated/component_ablation.md,
``<!-- cost-table:begin/end -->`` <- the paper-row cost tables (results/benchmarks/cpu-{tiny,mid}),
``<!-- downstream-table:begin/end -->`` <- results/downstream/other_downstream.md.
docs/QUICKSTART.md: ``<!-- cost:begin/end -->`` <- results/benchmarks/paper-cost/paper_cost.md,
``<!-- levers:begin/end -->`` <- the memory-lever tables of results/benchmarks/cpu-levers.
Each section is filled when its files are present.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "results" / "benchmarks"
LEVERS = BENCH / "cpu-levers"
DOCS = {
    REPO / "README.md": {
        "ablation-tables": [REPO / "results" / "generated" / "summary.md"],
        "seeds-table": [REPO / "results" / "tiny_3seeds" / "generated" / "component_ablation.md"],
        "cost-table": [BENCH / "cpu-mid" / "cost_table.md", BENCH / "cpu-tiny" / "cost_table.md"],
        "downstream-table": [REPO / "results" / "downstream" / "other_downstream.md"],
    },
    REPO / "docs" / "QUICKSTART.md": {
        "cost": [BENCH / "paper-cost" / "paper_cost.md"],
        "levers": [LEVERS / "cost_table.md", LEVERS / "fit.md", LEVERS / "zero.md"],
    },
}


def fill(doc: str, name: str, body: str, where: str = "README.md") -> str:
    pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(doc):
        raise SystemExit(f"{where} has no <!-- {name}:begin --> ... end marker pair")
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), doc)


def main() -> int:
    for path, sections in DOCS.items():
        text = path.read_text()
        for name, sources in sections.items():
            parts = [p.read_text() for p in sources if p.is_file()]
            if parts:
                text = fill(text, name, "\n\n".join(parts), path.name)
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
