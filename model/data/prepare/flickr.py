"""Flickr30K with Karpathy's split → retrieval caption files.

Input: Karpathy's ``dataset_flickr30k.json`` (same format as ``dataset_coco.json`` but without
``filepath``/``cocoid``); the images are expected in one folder, ``flickr30k-images/`` by default.

Outputs (in ``--out-dir``): ``flickr_train.json`` (train, plus restval if the file has any; one
entry per caption with ``image_id``), ``flickr_val.json`` and ``flickr_test.json`` (1K images each,
one entry per image with its caption list, in split order). Flickr30K is not part of the 4M
pre-training corpus, so no pre-training file is written.
"""

from __future__ import annotations

from pathlib import Path

from model.data.prepare import (
    ConvertOptions,
    PrepareSummary,
    caption_transform,
    note_raw_captions,
)
from model.data.prepare.coco import (
    build_split_entries,
    karpathy_split_stats,
    read_karpathy,
    write_karpathy_outputs,
)

DEFAULT_IMAGE_DIR = "flickr30k-images"
# One-line description in ``python -m model.cli.prepare --help``.


def prepare_flickr(
    karpathy: Path,
    out_dir: Path,
    image_dir: str = DEFAULT_IMAGE_DIR,
    options: ConvertOptions | None = None,
) -> PrepareSummary:
    """Convert Flickr30K + Karpathy split into ``flickr_{train,val,test}.json``.

    Args:
        karpathy: Karpathy's ``dataset_flickr30k.json``.
        out_dir: Output directory (created if needed).
        image_dir: Folder (relative to the image root) holding the ``<id>.jpg`` files.
        options: Image-path prefix, caption cleaning, progress bars (:class:`ConvertOptions`).
    """
    options = options or ConvertOptions()
    transform = caption_transform(options.clean_captions, options.max_words)
    images = read_karpathy(karpathy, "flickr30k", image_dir.strip("/"), options.show_progress)
    summary = PrepareSummary("flickr30k", stats=karpathy_split_stats(images))
    entries, skipped = build_split_entries(images, transform, options.image_prefix)
    summary.stats["skipped_empty_captions"] = skipped
    summary.outputs = write_karpathy_outputs(entries, out_dir, "flickr", pretrain=False)
    note_raw_captions(summary, options.clean_captions)
    return summary
