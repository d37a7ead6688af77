"""Bar charts of the ablation tables and training-loss curves (PNG, matplotlib Agg).

Our numbers and the paper's are drawn in separate panels: they come from different data and
scales (e.g. synthetic zero-shot vs COCO 5K fine-tuned), so sharing an axis would invite a
comparison the numbers cannot support.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are only ever written to files

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from results.collect import curve_order  # noqa: E402
from results.paper import PaperNumbers  # noqa: E402
from results.tables import TableResult  # noqa: E402

logger = logging.getLogger(__name__)

# Fixed style so regenerated figures look the same everywhere and stay legible at README width.
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "savefig.dpi": 150,
    "figure.dpi": 100,
}
PAPER_MARKERS = ("D", "s", "^", "o")


def _row_labels(result: TableResult) -> list[str]:
    """Tick labels: the row label, with the cell name when they differ."""
    return [
        lab if lab == cell else f"{lab}\n({cell})"
        for lab, cell in zip(result.summary["label"], result.summary["cell"], strict=True)
    ]


def _draw_ours(ax: plt.Axes, result: TableResult) -> None:
    """Grouped bars of our metrics with std error bars; rows without data are annotated."""
    summary, metrics = result.summary, result.spec.metrics_for(result.context.preset)
    x = np.arange(len(summary))
    width = 0.8 / max(len(metrics), 1)
    top = 0.0
    for i, metric in enumerate(metrics):
        means = summary[f"{metric}:mean"].to_numpy(dtype=float)
        stds = np.nan_to_num(summary[f"{metric}:std"].to_numpy(dtype=float))
        have = ~np.isnan(means)
        pos = x[have] - 0.4 + width * (i + 0.5)
        ax.bar(
            pos,
            means[have],
            width,
            yerr=stds[have],
            capsize=2,
            label=metric,
            color=f"C{i}",
            error_kw={"elinewidth": 0.8},
        )
        top = max(top, float(np.nanmax(means + stds)) if have.any() else 0.0)
    for xi, n_done, status in zip(x, summary["n_done"], summary["status"], strict=True):
        if n_done == 0:
            ax.text(
                xi, 0, f" {status}", rotation=90, ha="center", va="bottom", color="0.4", fontsize=8
            )
    low = min(0.0, float(np.nanmin(summary[[f"{m}:mean" for m in metrics]].to_numpy(float)))
              if summary[[f"{m}:mean" for m in metrics]].notna().any().any() else 0.0)
    # Headroom keeps the legend clear of the tallest bar.
    ax.set_ylim(low * 1.3, (top or 1.0) * 1.3)
    ax.set_xticks(x, _row_labels(result), rotation=30, ha="right")
    ax.set_ylabel("%")
    ax.set_title(f"ours: {result.context.dataset} (mean ± std over seeds)")
    if ax.get_legend_handles_labels()[0]:  # nothing finished yet: no bars, no legend
        ax.legend(loc="upper left", ncol=len(metrics), frameon=False)


def _draw_paper(ax: plt.Axes, result: TableResult, paper: PaperNumbers) -> None:
    """Paper numbers as markers on their own axis, labelled as quoted."""
    summary = result.summary
    x = np.arange(len(summary))
    values = []
    for i, metric in enumerate(result.spec.paper_metrics):
        ys = summary[f"paper:{metric}"].to_numpy(dtype=float)
        values.extend(ys[~np.isnan(ys)])
        ax.plot(
            x,
            ys,
            linestyle="none",
            marker=PAPER_MARKERS[i % len(PAPER_MARKERS)],
            markersize=6,
            markerfacecolor="none",
            color="0.2" if i == 0 else "C3",
            label=f"paper {metric}",
        )
    if values:
        low, high = min(values), max(values)
        ax.set_ylim(low - 0.15 * (high - low + 1), high + 0.35 * (high - low + 1))
    ax.set_xticks(x, _row_labels(result), rotation=30, ha="right")
    ax.set_xlim(-0.5, len(summary) - 0.5)
    ax.set_ylabel("%")
    ax.set_title(f"paper, quoted ({paper.setting}); not reproduced")
    ax.legend(loc="upper left", ncol=2, frameon=False)


def plot_table(result: TableResult, path: Path, paper: PaperNumbers) -> Path:
    """Bar chart of one table: our metrics (left) and the paper's quoted numbers (right)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with plt.rc_context(STYLE):
        if result.spec.paper_metrics:
            fig, (ours, quoted) = plt.subplots(
                1, 2, figsize=(11, 4.2), width_ratios=[3, 2], layout="constrained"
            )
            _draw_paper(quoted, result, paper)
        else:  # a table of our diagnostics only: no quoted panel
            fig, ours = plt.subplots(1, 1, figsize=(11, 4.2), layout="constrained")
        _draw_ours(ours, result)
        fig.suptitle(
            f"{result.spec.title} (preset {result.context.preset or 'unknown'}, "
            f"{len(result.context.seeds)} seed(s))"
        )
        fig.savefig(path)
        plt.close(fig)
    return path


def mean_curves(curves: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds per cell, metric and step."""
    return (
        curves.groupby(["cell", "metric", "step"], as_index=False)["value"]
        .mean()
        .sort_values(["cell", "metric", "step"])
    )


def plot_curves(
    curves: pd.DataFrame,
    path: Path,
    cells: Sequence[str] | None = None,
    keys: Sequence[str] | None = None,
) -> Path | None:
    """One subplot per logged scalar (losses, then ITM by pair type), one line per cell (mean
    over seeds); a key no run logged (e.g. masked pairs without SoftMask) shows "no data"."""
    if curves.empty:
        logger.warning("no training curves to plot for %s", path)
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mean = mean_curves(curves)
    keys = curve_order(mean["metric"]) if keys is None else keys
    present = list(dict.fromkeys(mean["cell"]))
    order = [c for c in (cells or []) if c in present] + [
        c for c in present if c not in (cells or [])
    ]
    with plt.rc_context(STYLE):
        ncols = 2 if len(keys) <= 6 else 3
        nrows = int(np.ceil(len(keys) / ncols))
        fig, axes = plt.subplots(
            nrows, ncols, figsize=(10, 3.2 * nrows), squeeze=False, layout="constrained"
        )
        for ax, key in zip(axes.flat, keys, strict=False):
            _draw_loss(ax, mean[mean["metric"] == key], key, order)
        for ax in list(axes.flat)[len(keys) :]:
            ax.set_visible(False)
        handles = [Line2D([], [], **_line_style(i)) for i in range(len(order))]
        # One shared legend outside the panels keeps lines unobstructed.
        fig.legend(
            handles, order, loc="outside lower center", ncol=min(len(order), 6), frameon=False
        )
        fig.suptitle("Training losses and ITM by pair type (mean over seeds; acc = accuracy, "
                     "shortcut = masked minus clean positive accuracy)")
        fig.savefig(path)
        plt.close(fig)
    return path


def _line_style(i: int) -> dict[str, str]:
    """Colour and linestyle of the i-th cell; tab10 repeats dashed beyond ten cells."""
    return {"color": f"C{i % 10}", "linestyle": "-" if i < 10 else "--"}


def _draw_loss(ax: plt.Axes, data: pd.DataFrame, key: str, order: Sequence[str]) -> None:
    """Lines of one loss for every cell, with a fixed colour/linestyle per cell position."""
    for i, cell in enumerate(order):
        line = data[data["cell"] == cell]
        ax.plot(line["step"], line["value"], linewidth=1.2, label=cell, **_line_style(i))
    if data.empty:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="0.4")
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy" if key.endswith(("_acc", "shortcut")) else "loss")
