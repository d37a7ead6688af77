"""The paper's "other downstream tasks" at CPU scale: SNLI-VE, NLVR2 and VQA stand-ins fine-tuned
from the tiny grid's pre-trained cells, next to the paper's quoted table.

For each cell (default: ``albef`` = ALBEF, ``full`` = SoftMask++) and seed it takes the grid's
finished pre-training run (``python ablations/run_grid.py`` first) and runs the task protocols of
ablations/protocols.yaml through the grid's own stage runner (``run_downstream``: stage
directories under the run, resumable, a finished stage is not redone). Cells run in parallel
processes, one thread each.

Also reported, so the numbers can be read: chance, and a **question-only prior** per task (the
most frequent training label / answer for the exact same statement or question, from the
generated files; no image): what the text alone can give.

Writes ``results/downstream/``: ``other_downstream.{md,csv,tex,png}`` (rows = methods; per
task and split a "paper" column, quoted, and an "ours" column, measured) and ``raw.json`` (every
number with its provenance). CLI:
``python -m benchmarks.downstream_tasks [--cells albef full] [--seeds 0] [--workers 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from results.render import latex_escape, latex_symbols, write_files  # noqa: E402

TASK_PROTOCOLS = ("snli_ve", "nlvr2", "vqa")
# Our split name -> the paper column it stands in for.
COLUMNS = {("snli_ve", "val"): "SNLI-VE val", ("snli_ve", "test"): "SNLI-VE test",
           ("nlvr2", "dev"): "NLVR2 dev", ("nlvr2", "test-P"): "NLVR2 test-P",
           ("vqa", "test-dev"): "VQA test-dev", ("vqa", "test-std"): "VQA test-std",
           # Ours: a local split whose answers are known, scored with the VQA accuracy.
           ("vqa", "test"): "VQA local test"}
CELL_METHOD = {"albef": "ALBEF", "full": "SoftMask++"}
CHANCE = {"snli_ve": 100 / 3, "nlvr2": 50.0}


def _run_cell(cell: str, seed: int, matrix: str, protocols: Sequence[str]) -> dict[str, Any]:
    """One pre-trained cell through the task stages (in a worker process, one thread)."""
    import torch

    from ablations.grid import expand
    from model.cell.stages import run_downstream
    from model.config.protocols import load_protocols, stage_config
    from model.downstream.data import resolve_task_files
    from model.downstream.tasks import task_spec
    from model.engine.resume import checkpoint_path
    from model.engine.run_io import read_run

    torch.set_num_threads(int(os.environ.get("SOFTMASK_THREADS", "1")))
    (spec,) = expand(matrix, only=[cell], seeds=[seed])
    if not read_run(spec.run_dir).finished:
        raise FileNotFoundError(f"{spec.run_dir}: cell {cell} seed {seed} has no finished "
                                "pre-training run; run `python ablations/run_grid.py` first")
    registry = load_protocols(spec.protocols_file)
    stages = run_downstream(spec.config, spec.run_dir, checkpoint_path(spec.run_dir),
                            list(protocols), spec.identity(), registry=registry)
    stand_ins = {}
    for name in protocols:
        stage_cfg = stage_config(spec.config, name, None, registry)
        task = registry.get(name).task_config(stage_cfg.data.kind == "synthetic")
        stand_ins[name] = resolve_task_files(stage_cfg, task, task_spec(task.name)).image_root
    return {"cell": cell, "seed": seed, "run_id": spec.run_id,
            "priors": question_only_priors(stand_ins),  # test split; the dev/val one is alike
            "stages": {name: {"metrics": s.metrics, "provenance": s.provenance}
                       for name, s in stages.items()}}


def _prior_accuracy(train: list[tuple[str, str]], test: list[tuple[str, str]]) -> float:
    """Accuracy (%) of answering each test text with its most frequent training label."""
    by_text: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for text, label in train:
        by_text[text][label] += 1
        overall[label] += 1
    fallback = overall.most_common(1)[0][0]
    hits = sum((by_text[t].most_common(1)[0][0] if t in by_text else fallback) == y
               for t, y in test)
    return 100.0 * hits / len(test)


def _pairs(path: Path, text: str, label: str) -> list[tuple[str, str]]:
    data = json.loads(path.read_text())
    out = []
    for e in data:
        y = e[label][0] if isinstance(e[label], list) else e[label]
        out.append((e[text], str(y)))
    return out


@cache  # the table asks per column and per task: the protocols file is read once
def _registry() -> Any:
    """ablations/protocols.yaml with the paper's rows of results/paper_numbers.yaml."""
    from ablations.grid import PROTOCOLS_FILE
    from model.config.protocols import load_protocols
    from results.paper import PAPER_PATH

    return load_protocols(PROTOCOLS_FILE, paper_file=PAPER_PATH)


def _task_of(protocol: str) -> Any:
    """The registered task (model/downstream/tasks/) a protocol of ablations/protocols.yaml runs."""
    from model.downstream.tasks import task_spec

    return task_spec(_registry().get(protocol).task_config(True).name)


def question_only_priors(stage_dirs: dict[str, Path]) -> dict[str, float]:
    """Per task, the question-only prior on the test split, from the stand-in files a stage
    used (recorded in its result)."""
    from model.data.synthetic_tasks import TaskFiles

    priors = {}
    for name in stage_dirs:
        spec = _task_of(name)
        text, label = spec.text_and_label
        files = TaskFiles(stage_dirs[name], spec.stand_in.name)
        # the files the task trains on (VQA: train + val)
        train_files, _val, _answers = spec.stand_in_files(files)
        train = [pair for f in train_files for pair in _pairs(f, text, label)]
        priors[name] = _prior_accuracy(train, _pairs(files.split("test"), text, label))
    return priors


def _paper_rows() -> dict[str, dict[str, float]]:
    registry = _registry()
    rows: dict[str, dict[str, float]] = defaultdict(dict)
    for name in TASK_PROTOCOLS:
        for method, values in registry.get(name).paper.items():
            for split, v in values.items():
                rows[method][COLUMNS[(name, split)]] = v
    return rows


def _relative(value: Any, root: str) -> Any:
    """Paths under the working directory written relative to it (results are shared)."""
    if isinstance(value, str):
        return value.replace(root + os.sep, "").replace(root, ".")
    if isinstance(value, dict):
        return {k: _relative(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v, root) for v in value]
    return value


PAPER_ORDER = ("OSCAR", "UNITER", "UNIMO", "VILLA", "VinVL (6M)", "ViLT", "ALBEF", "TCL",
               "CODIS", "SoftMask++")
TEST_COLUMNS = ("SNLI-VE test", "NLVR2 test-P", "VQA local test")


def _ours(runs: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    ours: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        method = CELL_METHOD.get(run["cell"], run["cell"])
        for name, stage in run["stages"].items():
            for split, value in stage["metrics"].items():
                ours[method][COLUMNS[(name, split)]].append(value)
    return ours


def build_table(runs: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows = methods; columns = (task split, "paper" | "ours"); cells are strings (ours:
    mean, or mean ± std over seeds)."""
    paper, ours = _paper_rows(), _ours(runs)
    priors = runs[0]["priors"] if runs else {}
    columns = list(COLUMNS.values())
    index = [*(m for m in PAPER_ORDER if m in paper), *(m for m in ours if m not in paper),
             "question-only prior", "chance"]
    frame = pd.DataFrame("", index=index, columns=pd.MultiIndex.from_product(
        [columns, ["paper", "ours"]]))
    for method, values in paper.items():
        for column, v in values.items():
            frame.loc[method, (column, "paper")] = f"{v:.1f}"
    for method, values in ours.items():
        for column, vs in values.items():
            frame.loc[method, (column, "ours")] = _mean_std(vs)
    for name, v in priors.items():  # measured on the test split only
        column = COLUMNS[(name, _test_splits(name)[-1])]
        frame.loc["question-only prior", (column, "ours")] = f"{v:.1f}"
    for name, v in CHANCE.items():
        for split in _test_splits(name):
            frame.loc["chance", (COLUMNS[(name, split)], "ours")] = f"{v:.1f}"
    keep = [c for c in frame.columns if (frame[c] != "").any()]
    return frame[keep]


def _mean_std(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.1f}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.1f} ± {std:.1f}"


def _test_splits(name: str) -> list[str]:
    """The columns ours fill for a task: the paper's split names its spec declares (VQA: the
    local split only)."""
    return list(_task_of(name).splits)


def _eval_sizes() -> dict[str, tuple[int, int]]:
    """(val / dev, test) examples of each stand-in, from the protocols' synthetic sizes."""
    out = {}
    for name in TASK_PROTOCOLS:
        sizes = _registry().get(name).task_config(True).synthetic
        per_item = _task_of(name).stand_in.per_item
        out[name] = (per_item * sizes.val, per_item * sizes.test)
    return out


def caption(runs: list[dict[str, Any]]) -> str:
    seeds = sorted({r["seed"] for r in runs})
    train = {name: stage["provenance"].get("train_examples")
             for run in runs[:1] for name, stage in run["stages"].items()}
    ev = _eval_sizes()
    return (
        "Other downstream tasks. \"paper\": the paper's table (4M pre-training images; VinVL "
        "6M), quoted, not reproduced. \"ours\": this harness at CPU scale, accuracy in %, "
        f"mean ± std over {len(seeds)} pre-training seed(s) {seeds} of the tiny grid's cells "
        "(albef = ALBEF, full = SoftMask++), each fine-tuned with ALBEF's task recipe on a "
        "SYNTHETIC stand-in (generated shapes scenes): VE 3 statements per image "
        f"({ev['snli_ve'][0]} val / {ev['snli_ve'][1]} test), NLVR2 statements about two scenes "
        f"({ev['nlvr2'][0]} dev / {ev['nlvr2'][1]} test-P pairs), VQA 3 questions per image "
        f"scored with the VQA accuracy on a local split ({ev['vqa'][1]} questions; not EvalAI's "
        "test-dev). Not comparable with the paper's numbers. Question-only prior: the most "
        "frequent training label of the identical text, no image (test split); with chance it "
        "says how much of ours needs the image. Training examples: "
        + ", ".join(f"{k} {v}" for k, v in sorted(train.items())) + ".")


def write_outputs(frame: pd.DataFrame, runs: list[dict[str, Any]], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    flat = frame.copy()
    flat.columns = [f"{c} ({k})" for c, k in frame.columns]
    text = caption(runs)
    md = ["### Other downstream tasks (generated)", "",
          flat.to_markdown(disable_numparse=True), "", text, ""]
    # Cells hold numbers and "±" only; the caption is free text (underscores, %, quotes).
    tex = latex_symbols(flat.to_latex(caption=latex_escape(text), label="tab:other_downstream"))
    write_files({out / "other_downstream.md": "\n".join(md),
                 out / "other_downstream.csv": flat.to_csv(),
                 out / "other_downstream.tex": tex})
    _plot(runs, out / "other_downstream.png")
    root = str(Path.cwd())
    write_files({out / "raw.json": json.dumps(_relative(runs, root), indent=1, sort_keys=True)
                 + "\n"})
    return [out / f"other_downstream.{e}" for e in ("md", "csv", "tex", "png")]


def _plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Ours per method (mean and seeds), with the question-only prior and chance marked."""
    ours = _ours(runs)
    columns = [c for c in COLUMNS.values() if any(c in v for v in ours.values())]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / max(1, len(ours))
    for i, (method, values) in enumerate(ours.items()):
        xs = [j + (i - (len(ours) - 1) / 2) * width for j in range(len(columns))]
        means = [sum(values[c]) / len(values[c]) if values.get(c) else 0.0 for c in columns]
        ax.bar(xs, means, width, label=f"ours: {method}")
        for x, c in zip(xs, columns, strict=True):
            ax.scatter([x] * len(values.get(c, [])), values.get(c, []), s=8, color="black",
                       zorder=3)
    priors = runs[0]["priors"] if runs else {}
    for j, column in enumerate(columns):
        task = next(n for (n, _), c in COLUMNS.items() if c == column)
        prior = priors.get(task) if column in TEST_COLUMNS else None  # measured on test
        for value, style in ((prior, ":"), (CHANCE.get(task), "--")):
            if value is not None:
                ax.hlines(value, j - 0.45, j + 0.45, colors="grey", linestyles=style)
    ax.set_xticks(range(len(columns)), columns, fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Downstream stand-ins at CPU scale (dotted: question-only prior, dashed: chance)",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.downstream_tasks",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", nargs="+", default=["albef", "full"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--protocols", nargs="+", default=list(TASK_PROTOCOLS))
    parser.add_argument("--matrix", default="ablations/matrix.yaml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="results/downstream")
    parser.add_argument("--from-raw", action="store_true",
                        help="re-render the table from <out>/raw.json without training")
    args = parser.parse_args(argv)
    if args.from_raw:
        runs = json.loads((Path(args.out) / "raw.json").read_text())
    else:
        jobs = [(c, s) for c in args.cells for s in args.seeds]
        with ProcessPoolExecutor(max_workers=max(1, min(args.workers, len(jobs)))) as pool:
            futures = [pool.submit(_run_cell, c, s, args.matrix, args.protocols)
                       for c, s in jobs]
            runs = [f.result() for f in futures]
    frame = build_table(runs)
    for path in write_outputs(frame, runs, Path(args.out)):
        print(f"wrote {path}")
    print((Path(args.out) / "other_downstream.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
