"""Copy the generated tables into README.md between their markers (never edit them by hand).

    python scripts/update_readme.py

Sections: ``<!-- ablation-tables:begin/end -->`` <- results/generated/summary.md,
``<!-- seeds-table:begin/end -->`` <- results/tiny_3seeds/generated/component_ablation.md and
``<!-- cost-table:begin/end -->`` <- results/benchmarks/*/cost_table.md and
``<!-- downstream-table:begin/end -->`` <- results/downstream/other_downstream.md (each when
present).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = {
    "ablation-tables": [REPO / "results" / "generated" / "summary.md"],
    "seeds-table": [REPO / "results" / "tiny_3seeds" / "generated" / "component_ablation.md"],
    "cost-table": sorted((REPO / "results" / "benchmarks").glob("*/cost_table.md")),
    "downstream-table": [REPO / "results" / "downstream" / "other_downstream.md"],
}


def fill(readme: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(readme):
        raise SystemExit(f"README.md has no <!-- {name}:begin --> ... end marker pair")
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), readme)


def main() -> int:
    path = REPO / "README.md"
    text = path.read_text()
    for name, sources in SECTIONS.items():
        parts = [p.read_text() for p in sources if p.is_file()]
        if parts:
            text = fill(text, name, "\n\n".join(parts))
    path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
