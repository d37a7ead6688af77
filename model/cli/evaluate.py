"""Evaluate any checkpoint under one of the paper's retrieval protocols, with one command.

    python -m model.cli.evaluate --checkpoint PATH --protocol coco_finetune \\
        [--config RUN_DIR | RUN_DIR/config.yaml | --preset base] [--set key=value ...] \\
        [--data-root DIR] [--out results/eval/NAME] [--device cuda] [--cache-dir DIR]

PATH may be one of our training checkpoints (``checkpoint.pt``), a slim release
(``python -m model.cli.export``, either naming) or an official ALBEF file (pre-training or retrieval
format, e.g. the released ``ALBEF_4M.pth`` / ``mscoco.pth`` / ``flickr30k.pth``).

The config is, in order of preference: ``--config`` (a run's ``config.yaml`` or its directory),
``--preset`` (``base`` = the paper's model with ``ablations/base.yaml``), else the config recorded
in the checkpoint (ours), else ``--preset base``. The protocol's layers (ablations/protocols.yaml)
are applied on top, then ``--set`` items, then ``--data-root`` rebases every data path that
starts with ``data/`` (the protocols' convention).

Writes ``table.md``, ``table.csv`` and ``result.json`` to ``--out``: TR/IR R@1/5/10 in the
paper's layout, the paper's ALBEF and SoftMask++ rows for the same protocol next to ours (quoted,
not reproduced), and the provenance of every number. Disagreements between the protocol and the
checkpoint (e.g. zero-shot-after-COCO from a model never fine-tuned on COCO) or the settings
(resolution, k_test, split size) are logged as warnings and written into the table caption.
Exit status: 0 done (warnings included, unless ``--fail-on-warning``: then 3), 2 on errors.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model.checkpoints import CheckpointMismatchError, CheckpointReadError
from model.config.experiment import load_experiment
from model.config.loader import ConfigError, replace_path
from model.config.protocols import (
    RECALL_KEYS,
    TASK_METRIC_KEYS,
    ProtocolRegistry,
    eval_image_size,
    load_protocols,
    stage_config,
)
from model.config.schema import ExperimentConfig
from model.config.task import TaskConfig
from model.downstream.run import run_task
from model.engine.run_io import CONFIG, RESULT, write_json_atomic
from model.evaluation.checkpoint import (
    CheckpointInfo,
    evaluate_checkpoint,
    protocol_warnings,
    read_checkpoint_file,
)

log = logging.getLogger("model.cli.evaluate")

# The apps room knows the checkout's layout; the library below is handed these files.
ABLATIONS = Path(__file__).resolve().parents[2] / "ablations"
BASE_FILE = ABLATIONS / "base.yaml"
PROTOCOLS_FILE = ABLATIONS / "protocols.yaml"
PAPER_FILE = ABLATIONS.parent / "results" / "paper_numbers.yaml"  # the paper's quoted rows
DATA_PREFIX = "data/"
_PATH_KEYS = ("data.image_root", "data.eval_file", "data.negatives_file")


def rebase_data_paths(cfg: ExperimentConfig, root: str | Path) -> ExperimentConfig:
    """Every data path that starts with ``data/`` moved under ``root``."""
    def move(value: str | None) -> str | None:
        if value and (value == DATA_PREFIX.rstrip("/") or value.startswith(DATA_PREFIX)):
            return str(Path(root) / value[len(DATA_PREFIX):])
        return value

    for key in _PATH_KEYS:
        section, name = key.split(".")
        cfg = replace_path(cfg, key, move(getattr(getattr(cfg, section), name)), "--data-root")
    return replace_path(cfg, "data.train_files", [move(f) for f in cfg.data.train_files],
                        "--data-root")


def base_config(args: argparse.Namespace, info: CheckpointInfo) -> tuple[ExperimentConfig, str]:
    """The config the protocol is applied to, and where it came from."""
    if args.config:
        path = Path(args.config)
        path = path / CONFIG if path.is_dir() else path
        return load_experiment(files=[path]), str(path)
    if args.preset:
        base = BASE_FILE if args.preset == "base" else None
        return load_experiment(preset=args.preset, base=base), f"preset '{args.preset}'"
    if info.config is not None:
        return (load_experiment(inline=[(f"{info.path} (recorded config)", info.config)]),
                f"config recorded in {info.path.name}")
    log.info("%s records no config of ours: using --preset base", info.path)
    return load_experiment(preset="base", base=BASE_FILE), "preset 'base' (default)"


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def result_rows(registry: ProtocolRegistry, protocol: str, metrics: dict[str, float],
                ours_label: str) -> list[dict[str, Any]]:
    """Table rows: the paper's (quoted) rows, then ours."""
    rows = [{"model": f"{model} (4M)", "source": "quoted from the paper",
             **{k: recalls.get(k) for k in RECALL_KEYS}, "r_mean": None}
            for model, recalls in registry.get(protocol).paper.items()]
    rows.append({"model": ours_label, "source": "this evaluation",
                 **{k: metrics.get(k) for k in RECALL_KEYS}, "r_mean": metrics.get("r_mean")})
    return rows


def caption_lines(registry: ProtocolRegistry, protocol: str, prov: dict[str, Any],
                  warnings: Sequence[str]) -> list[str]:
    p = registry.get(protocol)
    split = p.split_name or prov["split"]
    lines = [
        f"Image-text retrieval on {split} (protocol `{protocol}`: {p.description}). "
        f"Ours: {prov['split']} ({prov['n_images']} images, {prov['n_texts']} captions; "
        f"{prov['images_found']} of {prov['images_listed']} listed images found), "
        f"{prov['image_size']} px, k_test {prov['k_test']}, scoring: {prov['scoring']}. "
        f"Checkpoint {prov['checkpoint']} (sha256 {prov['checkpoint_sha256'][:16]}…, "
        f"{prov['checkpoint_container']}, format {prov['checkpoint_format']}, "
        f"{prov['checkpoint_stage']}).",
    ]
    if p.paper:
        lines.append(f"Paper rows are quoted, not reproduced: {registry.paper_source}.")
    if prov.get("data_kind") == "synthetic":
        lines.append("Ours ran on the SYNTHETIC stand-in data set, not on "
                     f"{p.split_name or p.dataset}: not comparable with the paper rows.")
    lines += [f"**WARNING: {w}**" for w in warnings]
    return lines


def markdown_table(rows: Sequence[dict[str, Any]], caption: Sequence[str], title: str) -> str:
    head = ["model", "source", "TR R@1", "TR R@5", "TR R@10", "IR R@1", "IR R@5", "IR R@10"]
    out = [f"## {title}", "", "| " + " | ".join(head) + " |",
           "|" + "---|" * 2 + "---:|" * 6]
    for row in rows:
        digits = 1 if row["source"].startswith("quoted") else 2
        cells = [row["model"], row["source"], *(_fmt(row[k], digits) for k in RECALL_KEYS)]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", *[f"{line}  " for line in caption]]
    return "\n".join(out) + "\n"


def csv_table(rows: Sequence[dict[str, Any]],
              metrics: Sequence[str] = (*RECALL_KEYS, "r_mean")) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["model", "source", *metrics],
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model.cli.evaluate",
        description="Evaluate a checkpoint (ours or official ALBEF) under a retrieval protocol "
                    "of ablations/protocols.yaml and write a table with the paper's rows.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file to evaluate")
    parser.add_argument("--protocol", required=True,
                        help="protocol name (e.g. coco_finetune, flickr_finetune, "
                             "flickr_zeroshot, coco_zeroshot)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", help="a run's config.yaml, or its run directory")
    source.add_argument("--preset", choices=("base", "tiny"),
                        help="model preset (base adds ablations/base.yaml)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied after the protocol (repeatable)")
    parser.add_argument("--data-root", help="directory that replaces the 'data/' prefix of "
                                            "every data path")
    parser.add_argument("--out", help="output directory (default: results/eval/"
                                      "<checkpoint stem>__<protocol>)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--cache-dir", help="cache the split's features here (large at 384 px)")
    parser.add_argument("--protocols-file", help="protocols.yaml to read (default: "
                                                 "ablations/protocols.yaml)")
    parser.add_argument("--paper-file", help="the paper's numbers (default: "
                                             "results/paper_numbers.yaml)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow full unpickling of the checkpoint (trusted files only)")
    parser.add_argument("--fail-on-warning", action="store_true",
                        help="exit with status 3 when the protocol and checkpoint disagree")
    return parser


def is_task_checkpoint(state: dict[str, Any]) -> bool:
    """A fine-tuned SNLI-VE / NLVR2 / VQA model (ours or ALBEF's): not a pre-training file, and
    not ALBEF's text-assignment file (NLVR2 is fine-tuned from that one)."""
    return any(k.startswith(("cls_head.", "decoder.", "text_decoder.")) for k in state)


def rebase_task_paths(task: TaskConfig, root: str | Path) -> TaskConfig:
    """The task block's ``data/...`` paths moved under ``root`` (as --data-root does)."""
    def move(value: str) -> str:
        if value.startswith(DATA_PREFIX):
            return str(Path(root) / value[len(DATA_PREFIX):])
        return value

    keys = ("val_file", "test_file", "image_root", "vg_root", "answer_list")
    return dataclasses.replace(task, train_files=tuple(move(f) for f in task.train_files),
                               **{k: move(getattr(task, k)) for k in keys})


def evaluate_task(args: argparse.Namespace, registry: ProtocolRegistry, state: dict[str, Any],
                  info: CheckpointInfo, cfg: ExperimentConfig, cfg_source: str
                  ) -> tuple[dict[str, Any], Path]:
    """A task protocol: evaluate a fine-tuned task checkpoint as it is, or fine-tune a
    pre-training checkpoint with the protocol's recipe first (then evaluate)."""
    stage = stage_config(cfg, args.protocol, None, registry, args.sets, source=cfg_source)
    task = registry.get(args.protocol).task_config(stage.data.kind == "synthetic")
    if args.data_root:
        stage, task = rebase_data_paths(stage, args.data_root), rebase_task_paths(task,
                                                                                  args.data_root)
    as_is = is_task_checkpoint(state)
    log.info("%s: %s", info.path, "a fine-tuned task model: evaluated as it is" if as_is else
             "a pre-training checkpoint: fine-tuning with the protocol's recipe first")
    out = Path(args.out) if args.out else (
        Path("results") / "eval" / f"{info.path.stem}__{args.protocol}")
    result = run_task(stage, task, info.path, out, device=args.device, evaluate_only=as_is,
                      trust_pickle=args.trust_pickle)
    p = registry.get(args.protocol)
    label = f"ours: {info.path.name} ({'as is' if as_is else 'fine-tuned here'})"
    rows = [{"model": name, "source": "quoted from the paper", **vals}
            for name, vals in p.paper.items()]
    rows.append({"model": label, "source": "this evaluation", **result.metrics})
    caption = [f"Protocol `{args.protocol}`: {p.description}. Config: {cfg_source}."]
    if p.paper:
        caption.append(f"Paper rows are quoted, not reproduced: {registry.paper_source}.")
    if stage.data.kind == "synthetic":
        caption.append("Ours ran on the SYNTHETIC stand-in, not on "
                       f"{p.split_name or p.dataset}: not comparable with the paper rows.")
    (out / "table.md").write_text(task_markdown_table(rows, caption, p.split_name or p.dataset))
    (out / "table.csv").write_text(csv_table(
        rows, [k for k in TASK_METRIC_KEYS if any(k in r for r in rows)]))
    payload = {"protocol": args.protocol, "metrics": result.metrics, "rows": rows,
               "warnings": [], "caption": caption, "provenance": result.provenance,
               "paper_source": registry.paper_source}
    write_json_atomic(out / RESULT, payload)
    return payload, out


def task_markdown_table(rows: Sequence[dict[str, Any]], caption: Sequence[str], title: str
                        ) -> str:
    """Accuracy (%) per split, the split names as the paper writes them."""
    keys = [k for k in TASK_METRIC_KEYS if any(k in r for r in rows)]
    out = [f"## {title}", "", "| model | source | " + " | ".join(keys) + " |",
           "|---|---|" + "---:|" * len(keys)]
    for row in rows:
        digits = 1 if row["source"].startswith("quoted") else 2
        cells = [_fmt(row.get(k), digits) for k in keys]
        out.append(f"| {row['model']} | {row['source']} | " + " | ".join(cells) + " |")
    return "\n".join([*out, "", *[f"{line}  " for line in caption]]) + "\n"


def evaluate(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """Run one evaluation from parsed arguments; returns (result.json content, out dir)."""
    registry = load_protocols(args.protocols_file or PROTOCOLS_FILE,
                              paper_file=args.paper_file or PAPER_FILE)
    registry.get(args.protocol)
    state, info = read_checkpoint_file(args.checkpoint, trust_pickle=args.trust_pickle)
    cfg, cfg_source = base_config(args, info)
    if registry.get(args.protocol).task is not None:
        return evaluate_task(args, registry, state, info, cfg, cfg_source)
    eval_cfg = stage_config(cfg, args.protocol, None, registry, args.sets, source=cfg_source)
    # The protocol's own settings for the same kind of data (without --set), to compare with.
    protocol_cfg = stage_config(cfg, args.protocol, None, registry, source=cfg_source,
                                synthetic=eval_cfg.data.kind == "synthetic")
    if args.data_root:
        eval_cfg = rebase_data_paths(eval_cfg, args.data_root)
    warnings = protocol_warnings(registry, args.protocol, info, protocol_cfg, eval_cfg)
    for w in warnings:  # before the (long) evaluation, so nobody waits to learn it
        log.warning("!!! %s", w)
    result = evaluate_checkpoint(eval_cfg, info.path, args.device, cache_dir=args.cache_dir,
                                 loaded=(state, info))
    prov = result.provenance
    size_warnings = protocol_warnings(registry, args.protocol, info, protocol_cfg, eval_cfg,
                                      n_images=prov["n_images"])
    for w in size_warnings[len(warnings):]:
        log.warning("!!! %s", w)
    warnings = size_warnings
    prov.update({"protocol": args.protocol, "config_source": cfg_source,
                 "protocol_image_size": eval_image_size(protocol_cfg),
                 "protocol_k_test": protocol_cfg.eval.k_test,
                 "expected_stage": registry.stage_label(args.protocol),
                 "split_name": registry.get(args.protocol).split_name})
    label = f"ours: {info.path.name} ({info.stage_label})"
    rows = result_rows(registry, args.protocol, result.metrics, label)
    caption = caption_lines(registry, args.protocol, prov, warnings)
    out = Path(args.out) if args.out else (
        Path("results") / "eval" / f"{info.path.stem}__{args.protocol}")
    out.mkdir(parents=True, exist_ok=True)
    title = f"Retrieval, {registry.get(args.protocol).split_name or prov['split']}"
    (out / "table.md").write_text(markdown_table(rows, caption, title))
    (out / "table.csv").write_text(csv_table(rows))
    payload = {"protocol": args.protocol, "metrics": result.metrics, "rows": rows,
               "warnings": warnings, "caption": caption, "provenance": prov,
               "paper_source": registry.paper_source}
    write_json_atomic(out / RESULT, payload)
    return payload, out


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        payload, out = evaluate(args)
    except (ConfigError, FileNotFoundError, CheckpointReadError, CheckpointMismatchError,
            ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print((out / "table.md").read_text())
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'result.json'}")
    if payload["warnings"]:
        print(f"{len(payload['warnings'])} WARNING(S): see the caption above", file=sys.stderr)
        if args.fail_on_warning:
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

