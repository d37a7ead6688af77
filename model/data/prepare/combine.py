"""Join the per-source pre-training files into the "4M" corpus and count it against the paper.

Inputs: the pre-training JSON files written by the ``coco``, ``vg``, ``sbu`` and ``cc3m``
converters (several files per source are allowed, e.g. CC3M train and validation). All of them
must use the same image root, i.e. be converted with per-source ``--image-prefix`` values.

Outputs (in ``--out-dir``, file names start with ``--name``, default ``pretrain_4m``):

* ``pretrain_4m.json``: every entry of every input, in the order given (streamed: memory stays
  small even for 5M+ entries); skipped with ``--manifest-only``;
* ``pretrain_4m_manifest.yaml``: the input files per source with their counts; its
  ``train_files`` list can be used instead of the combined JSON;
* ``pretrain_4m_counts.csv`` and ``pretrain_4m_counts.md``: per source and in total, our
  number of images (distinct image paths) and captions next to the paper's table.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from model.atomic import write_text_atomic
from model.data.jsonio import DataFileError, iter_json_array, write_json_list
from model.data.prepare import PAPER_COUNTS, progress

logger = logging.getLogger(__name__)

SOURCES = ("coco", "vg", "sbu", "cc3m")
# One-line description in ``python -m model.cli.prepare --help``.


@dataclass
class SourceCount:
    """Running counts for one source while its files stream through."""

    files: list[Path] = field(default_factory=list)
    captions: int = 0
    entries: int = 0
    # Hashes of image paths instead of the strings: 3M CC3M paths as str cost ~300 MB, their
    # hashes a third of that. A 64-bit collision among a few million paths is practically
    # impossible, and only the image *count* would be off by one.
    image_hashes: set[int] = field(default_factory=set)


def validate_entry(path: Path, index: int, entry: Any) -> int:
    """Check one pre-training entry and return how many captions it holds."""
    if not isinstance(entry, dict):
        raise DataFileError(
            f"{path}: entry {index} should be an object, got {type(entry).__name__}")
    image, caption = entry.get("image"), entry.get("caption")
    if not isinstance(image, str) or not image:
        raise DataFileError(f"{path}: entry {index} has no non-empty string 'image'")
    if isinstance(caption, str):
        return 1
    if isinstance(caption, list) and all(isinstance(c, str) for c in caption):
        return len(caption)
    raise DataFileError(f"{path}: entry {index}: 'caption' should be a string or list of strings")


def _stream(
    sources: Mapping[str, Sequence[Path]],
    counts: dict[str, SourceCount],
    show_progress: bool | None,
) -> Iterator[dict[str, Any]]:
    """Yield every entry of every file, validating and counting on the way."""
    for source, files in sources.items():
        count = counts.setdefault(source, SourceCount())
        for path in files:
            count.files.append(path)
            entries = iter_json_array(path, f"{source} pre-training file")
            for index, entry in enumerate(
                progress(entries, f"{source}: {path.name}", None, show_progress)
            ):
                count.captions += validate_entry(path, index, entry)
                count.entries += 1
                count.image_hashes.add(hash(entry["image"]))
                yield entry


def counts_table(counts: Mapping[str, SourceCount]) -> pd.DataFrame:
    """Per-source and total counts next to the paper's numbers (ratio = ours / paper)."""
    rows = []
    for source, count in counts.items():
        paper = PAPER_COUNTS.get(source)
        rows.append(
            {
                "source": source,
                "files": len(count.files),
                "images": len(count.image_hashes),
                "captions": count.captions,
                "paper_images": paper.images if paper else None,
                "paper_captions": paper.captions if paper else None,
            }
        )
    table = pd.DataFrame(rows)
    total = table[["files", "images", "captions"]].sum()
    known = table["paper_images"].notna()
    table.loc[len(table)] = {
        "source": "total",
        **total.to_dict(),
        # A paper total is only meaningful when every source has a paper number.
        "paper_images": table["paper_images"].sum() if known.all() else None,
        "paper_captions": table["paper_captions"].sum() if known.all() else None,
    }
    for col in ("images", "captions"):
        paper_col = table[f"paper_{col}"].astype("Float64")
        table[f"paper_{col}"] = paper_col.round().astype("Int64")
        table[f"{col}_vs_paper"] = (table[col] / paper_col).round(3)
    return table


def manifest(name: str, counts: Mapping[str, SourceCount], combined: Path | None) -> str:
    """The YAML manifest: input files per source with counts, and a flat ``train_files`` list."""
    doc: dict[str, Any] = {
        "name": name,
        "combined_file": combined.name if combined else None,
        "sources": {
            source: {
                "files": [str(p) for p in count.files],
                "images": len(count.image_hashes),
                "captions": count.captions,
            }
            for source, count in counts.items()
        },
        "train_files": [str(p) for count in counts.values() for p in count.files],
    }
    return yaml.safe_dump(doc, sort_keys=False)


@dataclass(frozen=True)
class CombineResult:
    """What ``combine`` wrote and the counts table it computed."""

    table: pd.DataFrame
    outputs: dict[str, Path]


def _count_only(
    sources: Mapping[str, Sequence[Path]], counts: dict[str, SourceCount], show: bool | None
) -> None:
    """Run the validating stream without writing anything (``--manifest-only``)."""
    for _ in _stream(sources, counts, show):
        pass


def combine(
    sources: Mapping[str, Sequence[Path]],
    out_dir: Path,
    name: str = "pretrain_4m",
    write_combined: bool = True,
    show_progress: bool | None = None,
) -> CombineResult:
    """Concatenate pre-training files and write the manifest and the counts tables.

    Args:
        sources: Source name (``coco``, ``vg``, ``sbu``, ``cc3m`` or any other) → its files.
        out_dir: Output directory (created if needed).
        name: Stem of the output file names.
        write_combined: Write ``<name>.json``; otherwise only count and write the manifest.
        show_progress: Force progress bars on/off (None: only on a terminal).
    """
    sources = {source: list(files) for source, files in sources.items() if files}
    if not sources:
        raise DataFileError("combine: no input files given (expected e.g. --coco FILE.json)")
    counts: dict[str, SourceCount] = {}
    outputs: dict[str, Path] = {}
    if write_combined:
        outputs["combined"] = out_dir / f"{name}.json"
        write_json_list(outputs["combined"], _stream(sources, counts, show_progress))
    else:
        _count_only(sources, counts, show_progress)
    table = counts_table(counts)
    outputs["manifest"] = out_dir / f"{name}_manifest.yaml"
    write_text_atomic(outputs["manifest"], manifest(name, counts, outputs.get("combined")))
    outputs["csv"] = out_dir / f"{name}_counts.csv"
    write_text_atomic(outputs["csv"], table.to_csv(index=False))
    outputs["markdown"] = out_dir / f"{name}_counts.md"
    write_text_atomic(outputs["markdown"], table.to_markdown(index=False) + "\n")
    return CombineResult(table, outputs)
