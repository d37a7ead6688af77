"""``python -m model.cli.prepare snli-ve | nlvr2 | vqa``: the command line of
model/data/prepare/tasks.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from model.cli.prepare.common import (
    new_subparser,
)
from model.data.prepare import PrepareSummary
from model.data.prepare import tasks as source
from model.data.prepare.tasks import prepare_nlvr2, prepare_snli_ve, prepare_vqa


def _common(parser: argparse.ArgumentParser, source: str) -> None:
    parser.add_argument(f"--{source}-dir", type=Path, required=True,
                        help="folder holding the official annotation files")
    parser.add_argument("--out-dir", type=Path, required=True, help="output directory")
    parser.add_argument("--image-prefix", default="", help="prefix of every written image path")
    parser.add_argument("--image-root", type=Path,
                        help="check that every referenced image exists under this folder")
    parser.add_argument("--allow-missing-images", action="store_true",
                        help="drop entries whose images are missing (counted) instead of failing")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``snli-ve``, ``nlvr2`` and ``vqa`` on ``python -m model.cli.prepare``."""
    ve = new_subparser(subparsers, "snli-ve", "SNLI-VE jsonl -> ve_{train,dev,test}.json",
                       source.__doc__, _run_ve)
    _common(ve, "ve")
    nlvr = new_subparser(subparsers, "nlvr2", "NLVR2 json lines -> nlvr_{train,dev,test}.json",
                         source.__doc__, _run_nlvr)
    _common(nlvr, "nlvr")
    vqa = new_subparser(subparsers, "vqa", "VQA v2 (+ VG-QA) -> vqa_*.json, vg_qa.json, "
                        "answer_list.json", source.__doc__, _run_vqa)
    _common(vqa, "vqa")
    vqa.add_argument("--vg-qa", type=Path, help="Visual Genome question_answers.json")
    vqa.add_argument("--vg-prefix", default="", help="prefix of the VG image paths")
    vqa.add_argument("--answer-list", type=Path, help="answer list to use (JSON list)")
    vqa.add_argument("--top-answers", type=int, default=3128,
                     help="without --answer-list: the most frequent training answers kept")


def _run_ve(args: argparse.Namespace) -> PrepareSummary:
    return prepare_snli_ve(args.ve_dir, args.out_dir, args.image_prefix, args.image_root,
                           args.allow_missing_images)


def _run_nlvr(args: argparse.Namespace) -> PrepareSummary:
    return prepare_nlvr2(args.nlvr_dir, args.out_dir, args.image_prefix, args.image_root,
                         args.allow_missing_images)


def _run_vqa(args: argparse.Namespace) -> PrepareSummary:
    return prepare_vqa(args.vqa_dir, args.out_dir, args.image_prefix, args.vg_qa,
                       args.vg_prefix, args.answer_list, args.top_answers, args.image_root,
                       args.allow_missing_images)

