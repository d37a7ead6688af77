"""Batching dataset items: stack image views, tokenise captions, gather indices.

Both collate callables are module-level and hold only picklable state, so DataLoader workers can
use them under any start method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from model.data.tokenizer import TextTokenizer

# ALBEF's pre-training text length: [CLS] + at most 24 word pieces.
PRETRAIN_MAX_LENGTH = 25


def _stack_fields(items: Sequence[Mapping[str, Any]], skip: frozenset[str]) -> dict[str, Any]:
    """Stack tensor fields and turn int fields into int64 tensors, key by key.

    Raises:
        ValueError: If the batch is empty or items disagree on their keys.
        TypeError: If a field is neither a tensor nor an int.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    keys = set(items[0])
    for position, item in enumerate(items):
        if set(item) != keys:
            raise ValueError(
                f"batch item {position} has keys {sorted(item)}, item 0 has {sorted(keys)}"
            )
    batch: dict[str, Any] = {}
    for key in sorted(keys - skip):
        values = [item[key] for item in items]
        if all(isinstance(v, torch.Tensor) for v in values):
            batch[key] = torch.stack(values)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            raise TypeError(f"cannot collate field {key!r} of type {type(values[0]).__name__}")
    return batch


class PretrainCollate:
    """Collate image-caption items into a training batch.

    Output: ``image`` (B, 3, H, W), any other views such as ``image_strong``, ``input_ids`` and
    ``attention_mask`` (B, L) int64, ``index`` (B,) and, for retrieval items, ``image_idx`` (B,).

    ALBEF's settings: pre-training ``max_length=25`` (the default) with truncation; retrieval
    training ``max_length=None, truncation=False`` (ALBEF pads to the longest caption and does not
    truncate there).
    """

    def __init__(
        self,
        tokenizer: TextTokenizer,
        max_length: int | None = PRETRAIN_MAX_LENGTH,
        padding: Literal["longest", "max_length"] = "longest",
        truncation: bool = True,
    ) -> None:
        """Args: see :meth:`TextTokenizer.__call__` for ``max_length``, ``padding`` and
        ``truncation``."""
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.padding = padding
        self.truncation = truncation

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Stack the image views and indices and tokenise the captions in one batched call."""
        batch = _stack_fields(items, skip=frozenset({"caption"}))
        if "caption" not in items[0]:
            raise ValueError(f"PretrainCollate needs a 'caption' field, got {sorted(items[0])}")
        captions = [item["caption"] for item in items]
        text = self.tokenizer(
            captions, max_length=self.max_length, padding=self.padding, truncation=self.truncation
        )
        batch["input_ids"] = text["input_ids"]
        batch["attention_mask"] = text["attention_mask"]
        return batch


def collate_eval_images(items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Collate ``RetrievalEvalDataset`` items: ``image`` (B, 3, H, W) and ``index`` (B,)."""
    return _stack_fields(items, skip=frozenset())
