"""The one place text output is made safe and written: LaTeX escaping of free text, the LaTeX
form of the display symbols, and atomic writes of a table's files.

Used by the ablation tables (results/tables.py), the cost tables (benchmarks/report.py) and the
downstream table (benchmarks/downstream_tasks.py), so a caption is escaped the same way
everywhere and a reader never sees a half-written table.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from model.atomic import write_text_atomic

DASH = "—"
CHECK = "✓"
# Unicode used in display strings and its LaTeX form (applied after escaping the specials).
LATEX_SYMBOLS = {"±": r"$\pm$", DASH: "---", CHECK: r"\checkmark", "Δ": r"$\Delta$"}
# LaTeX's special characters in text mode (Styler escapes cells, not captions).
LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_symbols(text: str) -> str:
    """Replace the display symbols by their LaTeX form (on already escaped text)."""
    for symbol, latex in LATEX_SYMBOLS.items():
        text = text.replace(symbol, latex)
    return text


def latex_escape(text: str) -> str:
    """Free text (a caption) as LaTeX: specials escaped one character at a time (no double
    escaping), then the display symbols."""
    return latex_symbols("".join(LATEX_SPECIALS.get(ch, ch) for ch in text))


def write_files(texts: Mapping[Path, str]) -> list[Path]:
    """Write each file atomically (a crash leaves the old file or the new one, never half)."""
    for path, text in texts.items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
    return list(texts)
