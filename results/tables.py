"""Paper-style ablation tables (Markdown, LaTeX, CSV) from a collected run frame.

Table layouts live in ``table_specs.yaml`` and the paper's numbers in ``paper_numbers.yaml``.
Our numbers are mean ± std over the finished seeds, always with n; cells without a finished
run show "—" and a status. Paper numbers sit in separate, explicitly labelled columns: they are
quoted (COCO 5K fine-tuned, 4M-image pretraining), never produced by this harness.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from results.collect import placeholder_record, records_to_frame, select_runs
from results.paper import PaperNumbers, load_paper
from results.power import ALPHA, POWER, mde, pooled_sd, seeds_needed
from results.recipes import (
    Excluded,
    choose_fingerprint,
    describe_recipe,
    recipes_in,
    split_by_recipe,
)
from results.render import CHECK, DASH, latex_escape, latex_symbols, write_files

logger = logging.getLogger(__name__)

SPECS_PATH = Path(__file__).with_name("table_specs.yaml")
SIG_MARK = "*"
SIG_LEVEL = 0.05
@dataclass(frozen=True)
class RowSpec:
    """One table row: the run cell it reads, its display label and its checkmarks."""

    cell: str
    label: str | None
    flags: tuple[str, ...]


@dataclass(frozen=True)
class TableSpec:
    """Layout of one paper table (see table_specs.yaml)."""

    name: str
    title: str
    rows: tuple[RowSpec, ...]
    reference: str
    flags: tuple[str, ...] = ()
    label_header: str | None = None
    metrics: dict[str, list[str]] | None = None
    paper_metrics: tuple[str, ...] = ("TR@1", "IR@1")
    decimals: int = 2
    # Bold marks the highest value per column: off for tables whose columns are diagnostics
    # without a "better" direction (e.g. the ITM shortcut index).
    bold: bool = True

    @property
    def cells(self) -> list[str]:
        """Cells of the rows, in table order."""
        return [row.cell for row in self.rows]

    def metrics_for(self, preset: str | None) -> list[str]:
        """Our metric columns for a preset; the paper's metrics if the preset is unknown."""
        return list((self.metrics or {}).get(preset or "", self.paper_metrics))

    def row_label(self, cell: str) -> str:
        """Display name of a cell's row (its label, or the cell name)."""
        return next((r.label or r.cell for r in self.rows if r.cell == cell), cell)


@dataclass(frozen=True)
class Specs:
    """All table specs plus the preset -> dataset description map."""

    tables: dict[str, TableSpec]
    datasets: dict[str, str]
    # The grid's reference cell: its recipe is the tables' default, and the automatic
    # "other cells" table (cells no spec names) shows Δ against it.
    reference: str = "albef"
    default_metrics: dict[str, list[str]] | None = None


@dataclass(frozen=True)
class TableContext:
    """What our numbers in a table are: preset, dataset description, requested seeds, and the
    grid recipe they all share (with the runs of other recipes left out)."""

    preset: str | None
    dataset: str
    seeds: tuple[int, ...]
    eval_note: str
    recipe: str = ""
    excluded: tuple[Excluded, ...] = ()


@dataclass(frozen=True)
class TableResult:
    """A rendered table: numeric summary (the CSV) and its Markdown and LaTeX forms."""

    spec: TableSpec
    context: TableContext
    summary: pd.DataFrame
    caption: str
    markdown: str
    latex: str


def load_specs(path: Path = SPECS_PATH) -> Specs:
    """Parse table_specs.yaml into :class:`Specs`."""
    raw = yaml.safe_load(Path(path).read_text())
    defaults = raw.get("defaults", {})
    tables = {}
    for name, body in raw["tables"].items():
        rows = tuple(
            RowSpec(r["cell"], r.get("label"), tuple(r.get("flags", []))) for r in body["rows"]
        )
        if body["reference"] not in [r.cell for r in rows]:
            raise ValueError(
                f"{path}: table {name!r} reference {body['reference']!r} is not one of its rows"
            )
        tables[name] = TableSpec(
            name=name,
            title=body.get("title", name),
            rows=rows,
            reference=body["reference"],
            flags=tuple(body.get("flags", [])),
            label_header=body.get("label_header"),
            metrics=body.get("metrics", defaults.get("metrics")),
            paper_metrics=tuple(body.get("paper_metrics", defaults.get("paper_metrics", []))),
            decimals=int(body.get("decimals", defaults.get("decimals", 2))),
            bold=bool(body.get("bold", True)),
        )
    first = next(iter(tables.values()), None)
    reference = str(defaults.get("reference") or (first.reference if first else "albef"))
    return Specs(tables=tables, datasets=dict(raw.get("datasets", {})), reference=reference,
                 default_metrics=defaults.get("metrics"))


def table_context(frame: pd.DataFrame, spec: TableSpec, datasets: dict[str, str]) -> TableContext:
    """Check the table's runs share one preset and describe what they measured.

    Raises:
        ValueError: if runs of different presets would land in one table.
    """
    rows = frame[frame["cell"].isin(spec.cells)]
    runs = rows[rows["status"] != "missing"].drop_duplicates(["cell", "seed"])
    presets = sorted(p for p in runs["preset"].dropna().unique())
    if len(presets) > 1:
        which = {
            p: sorted(f"{c} s{s}" for c, s in zip(g["cell"], g["seed"], strict=True))
            for p, g in runs.groupby("preset")
        }
        raise ValueError(
            f"table {spec.name!r} would mix presets {presets}: {which}; "
            f"filter to one preset (--preset)"
        )
    preset = presets[0] if presets else None
    done = runs[runs["status"] == "done"]
    evals = {
        f"{s} split, {int(i)} images / {int(t)} texts"
        for s, i, t in zip(done["split"], done["n_images"], done["n_texts"], strict=True)
        if not (pd.isna(s) or pd.isna(i) or pd.isna(t))
    }
    if len(evals) > 1:
        logger.warning("table %s: runs were evaluated differently: %s", spec.name, sorted(evals))
    return TableContext(
        preset=preset,
        dataset=datasets.get(preset or "", preset or "unknown"),
        seeds=tuple(sorted(int(s) for s in rows["seed"].unique())),
        eval_note="; ".join(sorted(evals)) if evals else "",
    )


def _status_text(statuses: dict[int, str]) -> str:
    """'done' when every requested seed finished, else which seeds are in which state."""
    kinds = set(statuses.values())
    if len(kinds) <= 1:
        return kinds.pop() if kinds else "missing"
    parts = [
        f"{kind}: " + ",".join(f"s{s}" for s, k in sorted(statuses.items()) if k == kind)
        for kind in ("done", "diverged", "failed", "running", "excluded", "missing")
        if kind in kinds
    ]
    return "; ".join(parts)


def _cell_row(frame: pd.DataFrame, cell: str, metrics: list[str]) -> dict[str, Any]:
    """Mean, sample std and n over the finished seeds of one cell, per metric."""
    rows = frame[frame["cell"] == cell]
    statuses = dict(zip(rows["seed"].astype(int), rows["status"], strict=True))
    done = rows[rows["status"] == "done"]
    status = _status_text(statuses)
    # The recipe hash is the config hash without the seed (records from older raw files may
    # lack it: those are not compared).
    recipes = done["recipe_hash"] if "recipe_hash" in done else pd.Series(dtype=object)
    hashes = sorted(h for h in recipes.dropna().unique() if h)
    if len(hashes) > 1:
        # Seeds of one row should share a recipe; a partial rerun after a config change
        # would otherwise be averaged with stale seeds unnoticed.
        logger.warning("cell %s averages seeds of different configs: %s", cell, hashes)
        status += " (mixed configs: " + ",".join(hashes) + ")"
    out: dict[str, Any] = {
        "status": status,
        "n_expected": len(statuses),
        "n_done": int(done["seed"].nunique()),
    }
    for metric in metrics:
        values = _seed_values(done, metric)
        out[f"{metric}:mean"] = float(values.mean()) if len(values) else np.nan
        # Sample std (ddof=1) estimates the seed-to-seed spread; undefined for one seed.
        out[f"{metric}:std"] = float(values.std(ddof=1)) if len(values) > 1 else np.nan
        out[f"{metric}:n"] = len(values)
    return out


def _seed_values(done: pd.DataFrame, metric: str) -> np.ndarray:
    """One value per finished seed of one cell's rows."""
    return done.loc[done["metric"] == metric, "value"].dropna().to_numpy(dtype=float)


def welch_p(values: np.ndarray, reference: np.ndarray) -> float:
    """Two-sided Welch's t-test p-value of two seed samples; NaN below 2 seeds a side or when
    both samples are constant (no spread to test against)."""
    if len(values) < 2 or len(reference) < 2:
        return float("nan")
    if np.ptp(values) == 0 and np.ptp(reference) == 0:
        return float("nan")
    with warnings.catch_warnings():
        # Near-identical seeds (e.g. 99.5, 99.5, 100.0) make scipy warn about precision; the
        # p-value is still the test's answer (large), so the warning is noise in the tables.
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(values, reference, equal_var=False).pvalue)


def _significance(frame: pd.DataFrame, cell: str, reference: str, metric: str) -> float:
    """Welch p-value of ``cell`` vs ``reference`` over their finished seeds (NaN for the
    reference itself)."""
    if cell == reference:
        return float("nan")
    done = frame[frame["status"] == "done"]
    return welch_p(_seed_values(done[done["cell"] == cell], metric),
                   _seed_values(done[done["cell"] == reference], metric))


def summarise(
    frame: pd.DataFrame, spec: TableSpec, paper: PaperNumbers, preset: str | None
) -> pd.DataFrame:
    """Numeric table: one row per spec row with our stats, Δ vs the reference and paper numbers.

    Columns: cell, label, one bool per flag, status, n_expected, n_done, then per metric
    ``<m>:mean``, ``<m>:std``, ``<m>:n``, ``<m>:delta`` and per paper metric ``paper:<m>``.
    """
    metrics = spec.metrics_for(preset)
    quoted = paper.tables.get(spec.name, {})
    rows = []
    for row in spec.rows:
        flags = {flag: flag in row.flags for flag in spec.flags}
        stats = _cell_row(frame, row.cell, metrics)
        numbers = {
            f"paper:{m}": float(quoted.get(row.cell, {}).get(m, np.nan)) for m in spec.paper_metrics
        }
        rows.append({"cell": row.cell, "label": row.label or row.cell, **flags, **stats, **numbers})
    table = pd.DataFrame(rows)
    ref = table.loc[table["cell"] == spec.reference].iloc[0]
    done = frame[frame["status"] == "done"]
    for metric in metrics:
        # Difference of means; NaN whenever either side has no finished seed.
        table[f"{metric}:delta"] = table[f"{metric}:mean"] - ref[f"{metric}:mean"]
        table[f"{metric}:p"] = [_significance(frame, cell, spec.reference, metric)
                                for cell in table["cell"]]
        # One seed spread for the table (results/power.py): each cell's seeds around its mean.
        spread = pooled_sd([_seed_values(done[done["cell"] == c], metric) for c in spec.cells])
        table[f"{metric}:mde"] = [
            np.nan if cell == spec.reference else mde(spread, int(n), int(ref[f"{metric}:n"]))
            for cell, n in zip(table["cell"], table[f"{metric}:n"], strict=True)]
        table[f"{metric}:sd_pooled"] = spread
    order = ["cell", "label", *spec.flags, "status", "n_expected", "n_done"]
    order += [f"{m}:{s}" for m in metrics
              for s in ("mean", "std", "n", "delta", "p", "mde", "sd_pooled")]
    return table[order + [f"paper:{m}" for m in spec.paper_metrics]]


def _fmt_stat(mean: float, std: float, n: int, dec: int) -> str:
    """'12.30 ± 0.40 (n=3)'; no ± for a single seed; '—' without data."""
    if n == 0 or np.isnan(mean):
        return DASH
    if n == 1 or np.isnan(std):
        return f"{mean:.{dec}f} (n={n})"
    return f"{mean:.{dec}f} ± {std:.{dec}f} (n={n})"


def _fmt_delta(is_reference: bool, delta: float, p: float, dec: int) -> str:
    """'+1.20', with SIG_MARK when Welch's p < SIG_LEVEL; 'ref' for the reference row."""
    if is_reference:
        return "ref"
    if np.isnan(delta):
        return DASH
    return f"{delta:+.{dec}f}" + (SIG_MARK if not np.isnan(p) and p < SIG_LEVEL else "")


def _best_mask(values: pd.Series, dec: int) -> pd.Series:
    """Rows holding the best (highest) value as displayed; ties are all marked."""
    shown = values.round(dec)
    return shown == shown.max() if shown.notna().any() else pd.Series(False, index=values.index)


def display_frame(
    summary: pd.DataFrame, spec: TableSpec, ctx: TableContext, paper: PaperNumbers
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Display strings (unicode, no markup) and a same-shape bool frame marking bold cells."""
    dec, metrics = spec.decimals, spec.metrics_for(ctx.preset)
    ref = spec.row_label(spec.reference)
    cols: dict[str, pd.Series] = {}
    bold: dict[str, pd.Series] = {}
    if spec.label_header:
        cols[spec.label_header] = summary["label"]
    cols["cell"] = summary["cell"]
    for flag in spec.flags:
        cols[flag] = summary[flag].map({True: CHECK, False: ""})
    for m in metrics:
        header = f"ours {m} ({ctx.dataset})"
        cols[header] = pd.Series(
            [
                _fmt_stat(mu, sd, n, dec)
                for mu, sd, n in zip(
                    summary[f"{m}:mean"], summary[f"{m}:std"], summary[f"{m}:n"], strict=True
                )
            ]
        )
        if spec.bold:
            bold[header] = _best_mask(summary[f"{m}:mean"], dec)
    for m in metrics:
        cols[f"Δ {m} vs {ref}"] = pd.Series(
            [
                _fmt_delta(cell == spec.reference, d, p, dec)
                for cell, d, p in zip(summary["cell"], summary[f"{m}:delta"],
                                      summary[f"{m}:p"], strict=True)
            ]
        )
    cols["status"] = summary["status"]
    for m in spec.paper_metrics:
        header = f"paper {m} ({paper.setting})"
        cols[header] = summary[f"paper:{m}"].map(lambda v: DASH if np.isnan(v) else f"{v:.{dec}f}")
        bold[header] = _best_mask(summary[f"paper:{m}"], dec)
    shown = pd.DataFrame(cols)
    mask = pd.DataFrame({c: bold.get(c, pd.Series(False, index=shown.index)) for c in shown})
    footer = _mde_row(summary, spec, metrics, list(shown.columns), ref, dec)
    shown = pd.concat([shown, pd.DataFrame([footer])], ignore_index=True)
    mask = pd.concat([mask, pd.DataFrame([dict.fromkeys(shown.columns, False)])],
                     ignore_index=True)
    return shown, mask.astype(bool)


def _mde_row(summary: pd.DataFrame, spec: TableSpec, metrics: list[str], columns: list[str],
             ref_label: str, dec: int) -> dict[str, str]:
    """The last row: under each Δ column, the minimum detectable effect at the usual seed
    count of the rows (results/power.py), or "—" where it cannot be computed (one seed)."""
    others = summary[summary["cell"] != spec.reference]
    row = dict.fromkeys(columns, "")
    counts = [int(n) for m in metrics for n in others[f"{m}:n"] if n]
    n = max(set(counts), key=counts.count) if counts else 0
    ref = summary.loc[summary["cell"] == spec.reference].iloc[0]
    label = f"MDE (n={n} vs {int(ref[f'{metrics[0]}:n']) if metrics else 0})"
    row["cell"] = label
    for m in metrics:
        values = others.loc[others[f"{m}:n"] == n, f"{m}:mde"].dropna()
        row[f"Δ {m} vs {ref_label}"] = f"{values.iloc[0]:.{dec}f}" if len(values) else DASH
    return row


def caption_text(spec: TableSpec, ctx: TableContext, paper: PaperNumbers, note: str = "") -> str:
    """One-line caption: what was run (recipe: preset, steps, data, launch), seeds, how Δ is
    tested and how large a Δ the seeds can detect, what was left out, and that paper columns
    are quoted."""
    seeds = ",".join(str(s) for s in ctx.seeds) or "none"
    evaluated = f" ({ctx.eval_note})" if ctx.eval_note else ""
    paper_note = (f" Paper columns are quoted, not reproduced ({paper.source})."
                  if spec.paper_metrics else "")
    return (
        f"{spec.title}. Ours: {ctx.dataset}{evaluated}; {ctx.recipe}; "
        f"{len(ctx.seeds)} seed(s) requested ({seeds}); "
        f"mean ± std over finished seeds with n, metrics in %, Δ vs "
        f"{spec.row_label(spec.reference)}{', best per column in bold' if spec.bold else ''}; "
        f"{SIG_MARK} marks a Δ whose two-sided Welch's t-test over the seeds gives "
        f"p < {SIG_LEVEL} (needs >= 2 finished seeds in both rows). {_power_note(ctx)}"
        f"{paper_note}{_excluded_note(ctx)}" + (f" {note}" if note else "")
    )


def _power_note(ctx: TableContext) -> str:
    if len(ctx.seeds) < 2:
        return ("With one seed per cell no Δ can be tested: nothing can be concluded from "
                "these differences (run --seeds 3 or more).")
    return (f"The MDE row is the smallest true Δ a two-sided t-test at p < {ALPHA} detects "
            f"with probability {POWER} at these seed counts, from the pooled within-cell seed "
            f"spread: an unmarked Δ below it is no evidence of no effect.")


def _excluded_note(ctx: TableContext) -> str:
    if not ctx.excluded:
        return ""
    listed = "; ".join(e.describe() for e in ctx.excluded)
    return f" Not shown, trained under another grid recipe: {listed}."


def to_markdown(shown: pd.DataFrame, mask: pd.DataFrame, caption: str) -> str:
    """Markdown table via DataFrame.to_markdown with **bold** best cells and a caption line."""
    marked = shown.mask(mask & shown.ne(DASH), "**" + shown + "**")
    # disable_numparse keeps our strings (e.g. "76.10", "+0.40") exactly as formatted.
    table = marked.to_markdown(index=False, disable_numparse=True)
    return f"*{caption}*\n\n{table}\n"


def to_latex(shown: pd.DataFrame, mask: pd.DataFrame, caption: str, label: str) -> str:
    """LaTeX table via Styler.to_latex (booktabs rules, \\textbf on the best cells)."""
    styler = shown.style.hide(axis="index")
    styler = styler.format(latex_symbols, escape="latex")
    styler = styler.format_index(latex_symbols, escape="latex", axis=1)
    styler = styler.apply(lambda _: mask.map(lambda b: "textbf: --rwrap;" if b else ""), axis=None)
    align = "".join("c" if set(shown[c]) <= {CHECK, ""} else "l" for c in shown)
    body = styler.to_latex(
        column_format=align,
        hrules=True,
        position_float="centering",
        caption=latex_escape(caption),
        label=f"tab:{label}",
    )
    return "% needs \\usepackage{booktabs,amssymb}\n" + body


def build_table(
    frame: pd.DataFrame, spec: TableSpec, specs: Specs, paper: PaperNumbers, note: str = "",
    recipe: str = "", excluded: Sequence[Excluded] = (),
) -> TableResult:
    """Summarise and render one table, warning about every cell/seed without a finished run.

    ``frame`` holds the runs of one grid recipe (``recipe`` describes it); ``excluded`` are the
    runs of other recipes, named in the caption."""
    ctx = table_context(frame, spec, specs.datasets)
    ctx = replace(ctx, recipe=recipe, excluded=tuple(e for e in excluded if e.cell in spec.cells))
    summary = summarise(frame, spec, paper, ctx.preset)
    rows = frame[frame["cell"].isin(spec.cells) & (frame["status"] != "done")]
    gaps = rows.drop_duplicates(["cell", "seed"])
    if not gaps.empty:
        listed = ", ".join(
            f"{c} s{s} ({st})"
            for c, s, st in zip(gaps["cell"], gaps["seed"], gaps["status"], strict=True)
        )
        logger.warning("table %s: no finished run for %s", spec.name, listed)
    shown, mask = display_frame(summary, spec, ctx, paper)
    caption = caption_text(spec, ctx, paper, note)
    return TableResult(
        spec=spec,
        context=ctx,
        summary=summary,
        caption=caption,
        markdown=to_markdown(shown, mask, caption),
        latex=to_latex(shown, mask, caption, spec.name),
    )


def other_cells_spec(frame: pd.DataFrame, specs: Specs) -> TableSpec | None:
    """An automatic table of the cells with runs that no table spec names (a new ablation
    cell is never only in the raw file), against the grid's reference cell."""
    named = {c for spec in specs.tables.values() for c in spec.cells}
    present = frame.loc[frame["status"] != "missing", "cell"]
    others = sorted(set(present) - named - {specs.reference})
    if not others:
        return None
    return TableSpec(
        name="other_cells", title=f"Other cells (in no table spec; Δ vs {specs.reference})",
        rows=tuple(RowSpec(c, None, ()) for c in [specs.reference, *others]),
        reference=specs.reference, metrics=specs.default_metrics, paper_metrics=())


def _mark_excluded(frame: pd.DataFrame, excluded: Sequence[Excluded]) -> pd.DataFrame:
    """Placeholder rows (status "excluded") for cell/seeds whose only runs are of another
    recipe, so the status column says why they have no numbers."""
    have = set(zip(frame.loc[frame["status"] != "missing", "cell"],
                   frame.loc[frame["status"] != "missing", "seed"], strict=True))
    marks = {(e.cell, e.seed) for e in excluded} - have
    if not marks:
        return frame
    extra = records_to_frame([placeholder_record(None, c, s, "excluded", "another grid recipe")
                              for c, s in sorted(marks)])
    rest = frame[~((frame["status"] == "missing")
                   & pd.Series(list(zip(frame["cell"], frame["seed"], strict=True)),
                               index=frame.index).isin(marks))]
    return pd.concat([rest, extra], ignore_index=True)


def build_tables(
    frame: pd.DataFrame, specs: Specs | None = None, paper: PaperNumbers | None = None,
    note: str = "", fingerprint: str | None = None,
) -> dict[str, TableResult]:
    """Every table of the specs, plus "other cells" when there are any, from one collected
    frame, for one grid recipe: ``fingerprint`` (a grid's own plan) or the reference cell's
    (results/recipes.py). Runs of other recipes are never compared; each table's caption
    lists the ones it leaves out and what differs."""
    specs = specs or load_specs()
    paper = paper or load_paper()
    target = choose_fingerprint(frame, specs.reference, fingerprint)
    ours, excluded = split_by_recipe(frame, target)
    settings = recipes_in(frame).get(target or "", {})
    presets = sorted(ours.loc[ours["status"] != "missing", "preset"].dropna().unique())
    recipe = describe_recipe(settings, target, _steps(ours), ",".join(presets) or None)
    ours = _mark_excluded(ours, excluded)
    tables = dict(specs.tables)
    extra = other_cells_spec(ours, specs)
    if extra is not None:
        tables[extra.name] = extra
    cells = [cell for spec in tables.values() for cell in spec.cells]
    # Every table cell gets a row per seed (as "missing" if it never ran), whoever built frame.
    ours = select_runs(ours, cells=cells)
    return {name: build_table(ours, spec, specs, paper, note, recipe, excluded)
            for name, spec in tables.items()}


def _steps(frame: pd.DataFrame) -> list[int]:
    """Training steps of the finished runs (result.json train_steps), when recorded."""
    if "steps" not in frame:
        return []
    done = frame[frame["status"] == "done"].drop_duplicates("run_id")
    return sorted({int(v) for v in done["steps"].dropna()})


def write_table(result: TableResult, out_dir: Path) -> list[Path]:
    """Write ``<name>.md``, ``<name>.tex`` and ``<name>.csv`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = result.spec.name
    return write_files({out_dir / f"{name}.md": result.markdown,
                        out_dir / f"{name}.tex": result.latex,
                        out_dir / f"{name}.csv": result.summary.to_csv(index=False)})


def write_summary(results: dict[str, TableResult], path: Path, paper: PaperNumbers) -> Path:
    """Concatenate every table's Markdown under a heading (pasted into the README), then how
    many seeds the paper's effect sizes would need at the measured seed spread."""
    parts = [f"### {r.spec.title}\n\n{r.markdown}" for r in results.values()]
    note = (
        f"Paper columns: {paper.source}. Status lists seeds per state "
        f'(done/diverged/failed/running/excluded/missing); "{DASH}" means no finished seed.\n'
    )
    plan = seed_plan(results, paper)
    return write_files({Path(path): "\n".join(parts) + "\n" + note
                        + (f"\n{plan}" if plan else "")})[0]


def seed_plan(results: dict[str, TableResult], paper: PaperNumbers) -> str:
    """Seeds per cell needed to detect the paper's Δs (vs each table's reference row) at the
    pooled seed spread measured here (results/power.py), one line per table and metric."""
    lines = []
    for r in results.values():
        ours = set(r.spec.metrics_for(r.context.preset))
        quoted = paper.tables.get(r.spec.name, {})
        ref = quoted.get(r.spec.reference, {})
        for m in [m for m in r.spec.paper_metrics if m in ours and m in ref]:
            effects = sorted(abs(v[m] - ref[m]) for c, v in quoted.items()
                             if c != r.spec.reference and m in v and v[m] != ref[m])
            if not effects:
                continue
            sd = float(r.summary[f"{m}:sd_pooled"].iloc[0])
            lines.append(_plan_line(r.spec.name, m, sd, effects, r.spec.reference))
    if not lines:
        return ""
    head = (f"#### Seeds needed for the paper's effect sizes\n\nSeeds per cell for a "
            f"two-sided t-test at p < {ALPHA} to detect, with probability {POWER}, a Δ as large "
            f"as the paper's (if the effects were as large on this benchmark as on "
            f"{paper.setting}), at the seed spread measured here:\n")
    return head + "\n" + "\n".join(lines) + "\n"


def _plan_line(table: str, metric: str, sd: float, effects: list[float], ref: str) -> str:
    lo, hi = effects[0], effects[-1]
    if not np.isfinite(sd):
        return (f"- {table}, {metric}: paper Δ vs {ref} {lo:.2f}–{hi:.2f} points; seed spread "
                f"unknown with one seed per cell (run --seeds 3 to measure it).")
    need = [seeds_needed(e, sd) for e in (hi, lo)]
    text = "–".join(str(n) if n is not None else ">200" for n in dict.fromkeys(need))
    return (f"- {table}, {metric}: pooled seed SD {sd:.2f}; paper Δ vs {ref} {lo:.2f}–{hi:.2f} "
            f"points: {text} seeds per cell.")
