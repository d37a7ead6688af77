"""The benchmark's tables: cost, breakdown, planning and data wait, in Markdown, LaTeX and CSV.

Every table is rendered from the raw rows alone (``steps.csv``, ``environment.json``,
``data_wait.csv``), so ``rebuild_reports`` can re-render a finished run after a change of
layout or of the paper's numbers without measuring anything again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.cases import REFERENCE, Suite, load_suite
from benchmarks.measure import ratio
from model.atomic import write_text_atomic
from results.render import latex_escape

MAIN_ROWS = ("albef", "ours_wo_softmask", "ours")


# --------------------------------------------------------------------------- tables
# Raw column -> (table header, number format). Order = column order of the cost table.
COST_COLUMNS: dict[str, tuple[str, str]] = {
    "sec_it_median": ("time (s/it)", ".4f"),
    "sec_it_p10": ("p10 (s/it)", ".4f"),
    "sec_it_p90": ("p90 (s/it)", ".4f"),
    "ratio_paired_median": ("time x ALBEF", ".3f"),
    "paper_time_ratio": ("time x ALBEF (paper)", ".3f"),
    "peak_mem_mib": ("memory (MiB)", ".1f"),
    "mem_ratio": ("memory x ALBEF", ".3f"),
    "paper_mem_ratio": ("memory x ALBEF (paper)", ".3f"),
    "gflops": ("GFLOP/step", ".2f"),
    "flops_ratio": ("GFLOP x ALBEF", ".3f"),
    "mfu_pct": ("MFU (%)", ".1f"),
    "status": ("status", ""),
}
MEMORY_KINDS = {
    "cpu_rss_growth": "peak RSS growth over the built model, fresh process",
    "cuda_max_allocated": "torch.cuda.max_memory_allocated, fresh process",
}


def paper_ratios(paper: dict[str, Any]) -> pd.DataFrame:
    """The paper's time and memory ratios to ALBEF, indexed by variant."""
    time_s, mem_gb = pd.Series(paper["time_s"]), pd.Series(paper["memory_gb"])
    return pd.DataFrame({"paper_time_ratio": time_s / time_s[REFERENCE],
                         "paper_mem_ratio": mem_gb / mem_gb[REFERENCE]})


def row_order(variants: Sequence[str]) -> list[str]:
    """The paper's three rows first, then the single components in cases.yaml order."""
    return [v for v in MAIN_ROWS if v in variants] + [v for v in variants if v not in MAIN_ROWS]


def cost_table(rows: pd.DataFrame, paper: dict[str, Any]) -> pd.DataFrame:
    """The paper-style table of one case: numeric columns, 'Method' labels, paper ratios."""
    frame = rows.set_index("variant").join(paper_ratios(paper), how="left")
    frame = frame.loc[row_order(list(frame.index))]
    frame["gflops"] = frame["flops"] / 1e9
    # Noise-free companion of the time ratio: on these models time tracks FLOPs closely.
    frame["flops_ratio"] = frame["flops"] / frame.at[REFERENCE, "flops"]
    frame["mfu_pct"] = frame["mfu"] * 100
    for col in ("peak_mem_mib", "mem_ratio"):
        if col not in frame:
            frame[col] = math.nan
    table = frame[list(COST_COLUMNS)].rename(columns={k: h for k, (h, _) in COST_COLUMNS.items()})
    table.insert(0, "Method", frame["label"].to_numpy())
    return table.reset_index(drop=True)


def render_markdown(table: pd.DataFrame, formats: dict[str, str], caption: str) -> str:
    """Markdown via DataFrame.to_markdown; missing values show as an em dash."""
    floatfmt = [formats.get(c) or "g" for c in table.columns]
    body = table.astype(object).where(table.notna(), None).to_markdown(
        index=False, floatfmt=floatfmt, missingval="—")
    return f"{caption}\n\n{body}\n"


def render_latex(table: pd.DataFrame, formats: dict[str, str], caption: str, label: str) -> str:
    """LaTeX via Styler.to_latex (booktabs rules); cells and headers escaped."""
    styler = table.style.hide(axis="index")
    styler = styler.format({c: "{:" + f + "}" for c, f in formats.items() if c in table and f},
                           na_rep="---")
    text_cols = [c for c in table.columns if table[c].dtype == object]
    styler = styler.format(escape="latex", subset=text_cols, na_rep="---")
    styler = styler.format_index(escape="latex", axis="columns")
    return styler.to_latex(caption=latex_escape(caption), label=label, hrules=True,
                           position="htbp", position_float="centering") + "\n"


def caption_line(rows: pd.DataFrame, env: dict[str, Any]) -> str:
    """Device, software, method and memory definition of one case, in one line."""
    first = rows.iloc[0]
    mem_kind = MEMORY_KINDS.get(str(rows.get("mem_kind", pd.Series([""])).iloc[0]), "not measured")
    cuda = f", CUDA {env['cuda_version']}" if env["device"] == "cuda" else ""
    n_peaks = first.get("peak_measurements", math.nan)
    peak_source = (f"the fastest of {int(n_peaks)} timings in this run of a"
                   if not pd.isna(n_peaks) else "a measured")
    return (f"{first['case']} on {env['device_name']} ({env['threads']} threads): "
            f"median of {int(rows['iters'].max())} interleaved steps; time x ALBEF = median "
            f"of per-round ratios; memory = {mem_kind}; MFU vs {peak_source} "
            f"{int(first['peak_size'])}^3 matmul at {first['peak_flops_per_s'] / 1e9:.1f} "
            f"GFLOP/s; torch {env['torch_version']}{cuda}, fp32 matmul precision "
            f"{env['float32_matmul_precision']}, git {env['git_sha']}.")


def planning_table(df: pd.DataFrame, planning: dict[str, float], device: str) -> pd.DataFrame:
    """Samples/s and projected single-device hours for the paper's schedule (per variant)."""
    samples = float(planning["samples_per_epoch"]) * float(planning["epochs"])
    sec_per_sample = df["sec_it_median"] / df["batch"]
    return pd.DataFrame({
        "case": df["case"], "Method": df["label"], "samples/s": df["samples_per_s"],
        "ms/sample": sec_per_sample * 1e3,
        f"{device}-hours for {samples:.2g} samples": sec_per_sample * samples / 3600,
        f"{device}-days": sec_per_sample * samples / 86400,
    })


def breakdown_table(rows: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Forward / backward / optimizer medians of one case and SoftMask's extra cost."""
    frame = rows.set_index("variant").loc[row_order(list(rows["variant"]))]
    table = pd.DataFrame({"Method": frame["label"], "forward (s)": frame["forward_s"],
                          "backward (s)": frame["backward_s"],
                          "optimizer (s)": frame["optimizer_s"]})
    note = ""
    if {"ours", "ours_wo_softmask"} <= set(frame.index):
        d_fwd = frame.at["ours", "forward_s"] - frame.at["ours_wo_softmask", "forward_s"]
        d_bwd = frame.at["ours", "backward_s"] - frame.at["ours_wo_softmask", "backward_s"]
        note = (f" SoftMask (Grad-CAM pass + masked-pair fusion), Ours minus Ours w/o SoftMask: "
                f"forward {d_fwd * 1e3:+.1f} ms, backward {d_bwd * 1e3:+.1f} ms.")
    return table.reset_index(drop=True), note


# --------------------------------------------------------------------------- outputs
def _formats(columns: dict[str, tuple[str, str]]) -> dict[str, str]:
    return {header: fmt for header, fmt in columns.values()}


def write_cost_tables(df: pd.DataFrame, suite: Suite, env: dict[str, Any], out: Path) -> None:
    """cost_table.{md,tex,csv} and, with phases, breakdown.{md,csv}: one section per case."""
    md, tex, tables, breakdowns, notes = [], [], [], [], []
    for case_name, rows in df.groupby("case", sort=False):
        table = cost_table(rows, suite.paper)
        caption = caption_line(rows, env)
        md.append(f"### {case_name}\n\n" + render_markdown(table, _formats(COST_COLUMNS),
                                                            caption))
        tex.append(render_latex(table, _formats(COST_COLUMNS), caption, f"tab:cost-{case_name}"))
        tables.append(table.assign(case=case_name))
        if rows["forward_s"].notna().any():
            bd, note = breakdown_table(rows)
            breakdowns.append(bd.assign(case=case_name))
            notes.append(f"### {case_name}\n\n" + render_markdown(
                bd, dict.fromkeys(bd.columns[1:], ".4f"), caption + note))
    write_text_atomic(out / "cost_table.md", "\n".join(md))
    write_text_atomic(out / "cost_table.tex", "\n".join(tex))
    write_text_atomic(out / "cost_table.csv", pd.concat(tables).to_csv(index=False))
    if breakdowns:
        write_text_atomic(out / "breakdown.md", "\n".join(notes))
        write_text_atomic(out / "breakdown.csv", pd.concat(breakdowns).to_csv(index=False))


def write_planning(df: pd.DataFrame, suite: Suite, env: dict[str, Any], out: Path) -> None:
    """planning.{md,csv}; a CPU projection is labelled as a formula demonstration."""
    plan = planning_table(df, suite.planning, "GPU" if env["device"] == "cuda" else "CPU")
    write_text_atomic(out / "planning.csv", plan.to_csv(index=False))
    warning = ("" if env["device"] == "cuda" else
               " Measured on CPU: this projection only demonstrates the formula "
               "(seconds per sample x samples); it says nothing about GPU cost.")
    caption = (f"Projected time for {suite.planning['samples_per_epoch']:.2g} samples x "
               f"{int(suite.planning['epochs'])} epochs on one {env['device_name']}.{warning}")
    write_text_atomic(out / "planning.md", render_markdown(
        plan, dict.fromkeys(plan.columns[2:], ".4g"), caption))


# Raw data-wait column -> number format, in table order.
DATA_WAIT_COLUMNS = {"case": "", "variant": "", "data_format": "", "num_workers": "d",
                     "data_steps": "d",
                     "wait_s_median": ".4f", "wait_s_p90": ".4f", "step_s_median": ".3f",
                     "wait_fraction": ".4f", "data_status": ""}


def write_data_wait(waits: pd.DataFrame, env: dict[str, Any], out: Path) -> None:
    """data_wait.{csv,md}: seconds blocked in next(loader) per step, and that share of time."""
    write_text_atomic(out / "data_wait.csv", waits.to_csv(index=False))
    shown = waits[[c for c in DATA_WAIT_COLUMNS if c in waits]]
    caption = (f"Data-loading wait per step on {env['device_name']}: real DataLoader over the "
               "generated synthetic set (data_format json: caption file + PNG files; shards: "
               "the same samples in tar shards), measured while training (wait_fraction = "
               "wait / (wait + step)).")
    write_text_atomic(out / "data_wait.md", render_markdown(shown, DATA_WAIT_COLUMNS, caption))


def rebuild_reports(out_dir: str | Path, suite: Suite | None = None) -> None:
    """Re-render every table of ``out_dir`` from its raw files (steps.csv, environment.json,
    data_wait.csv), e.g. after a change of table layout or paper numbers."""
    out, suite = Path(out_dir), suite or load_suite()
    env = json.loads((out / "environment.json").read_text(encoding="utf-8"))
    df = pd.read_csv(out / "steps.csv")
    write_cost_tables(df, suite, env, out)
    write_planning(df, suite, env, out)
    if (out / "data_wait.csv").exists():
        write_data_wait(pd.read_csv(out / "data_wait.csv"), env, out)


def write_outputs(rows: list[dict[str, Any]], iterations: list[dict[str, Any]],
                  peaks: dict[str, dict[str, float]], env: dict[str, Any], suite: Suite,
                  out: Path) -> None:
    """Raw files and tables of everything measured so far (MFU against the best peak)."""
    for row in rows:
        row.update(peaks[row["precision"]])
        row["mfu"] = ratio(row["achieved_flops_per_s"], row["peak_flops_per_s"])
    df = pd.DataFrame(rows)
    write_text_atomic(out / "steps.csv", df.to_csv(index=False))
    write_text_atomic(out / "iterations.csv", pd.DataFrame(iterations).to_csv(index=False))
    write_text_atomic(out / "environment.json",
                      json.dumps({**env, "peaks": peaks}, indent=2) + "\n")
    write_cost_tables(df, suite, env, out)
    write_planning(df, suite, env, out)
