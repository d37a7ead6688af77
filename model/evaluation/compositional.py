"""Compositional hard-negative accuracy: does the model prefer the true caption of an image over
the same caption with two colours, two shapes or the spatial relation swapped?

Items come from the synthetic set's ``test_negatives.json``:
``{"image": path relative to image_root, "caption": str, "negatives": {kind: caption}}``.
A bag-of-words model cannot separate a swapped caption from the truth, so the scores measure
binding of attributes to objects. Each (image, caption) pair is scored two ways:

* ``comp/<kind>``: raw ITM class-1 logit of the fusion layers (the retrieval re-ranking score);
* ``comp_itc/<kind>``: cosine similarity of the projected ITC features.

Accuracy is the percentage of items whose true caption scores **strictly** higher than the
negative (a tie is not a win). ``mean`` averages the per-kind accuracies of the swap kinds; the
synthetic set's "random" kind (another scene's caption) is a reference that any matching model
wins, reported as ``comp/random`` but not averaged in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from model.albef import ALBEF
from model.data.captions import pre_caption
from model.data.jsonio import read_json_items
from model.data.tokenizer import TextTokenizer
from model.evaluation.features import EVAL_MAX_LENGTH, eval_mode
from model.evaluation.rerank import itm_match_logit

logger = logging.getLogger(__name__)

NegativeItem = Mapping[str, Any]
# Negative kinds that test matching rather than binding: scored, but kept out of ``mean``.
REFERENCE_KINDS = ("random",)


def load_negative_items(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a hard-negative file (a JSON list of items, see the module doc)."""
    path = Path(path)
    items = read_json_items(path, "hard-negative file")
    for index, item in enumerate(items):
        ok = (isinstance(item, dict) and isinstance(item.get("image"), str)
              and isinstance(item.get("caption"), str) and isinstance(item.get("negatives"), dict)
              and all(isinstance(v, str) for v in item["negatives"].values()))
        if not ok:
            raise ValueError(f"{path}: item {index} needs 'image' (str), 'caption' (str) and "
                             f"'negatives' ({{kind: str}}), got {item!r}")
    return items


def negative_kinds(items: Sequence[NegativeItem]) -> list[str]:
    """Negative kinds in first-seen order (colour, shape, relation for the synthetic set)."""
    kinds: dict[str, None] = {}
    for item in items:
        kinds.update(dict.fromkeys(item["negatives"]))
    return list(kinds)


def load_images(items: Sequence[NegativeItem], image_root: Path,
                 transform: Callable[[Image.Image], Tensor]) -> Tensor:
    """(B, 3, H, W) transformed images of ``items``."""
    images = []
    for item in items:
        with Image.open(image_root / item["image"]) as raw:
            images.append(transform(raw.convert("RGB")))
    return torch.stack(images)


def caption_groups(items: Sequence[NegativeItem], kinds: Sequence[str]
                   ) -> tuple[list[str], Tensor]:
    """Captions laid out item-major as [true, neg_kind0, neg_kind1, ...] (B * (1+K),) and a
    (B, K) bool mask of which negatives exist; a missing one is filled with the true caption
    (scored but never counted)."""
    texts, present = [], []
    for item in items:
        true = item["caption"]
        negatives = item["negatives"]
        texts.append(pre_caption(true, EVAL_MAX_LENGTH))
        texts += [pre_caption(negatives.get(kind, true), EVAL_MAX_LENGTH) for kind in kinds]
        present.append([kind in negatives for kind in kinds])
    return texts, torch.tensor(present, dtype=torch.bool)


def score_pairs(model: ALBEF, images: Tensor, texts: Sequence[str], tokenizer: TextTokenizer
                ) -> tuple[Tensor, Tensor]:
    """Score every image against its own group of captions with ITM and ITC.

    Args:
        model: ALBEF in eval mode, on the images' device.
        images: (B, 3, H, W).
        texts: B * C captions, item-major (C captions per image).
        tokenizer: ALBEF-convention tokenizer (captions padded/truncated to 30 tokens).

    Returns:
        ITM class-1 logits (B, C) and ITC cosine similarities (B, C).
    """
    n_img = images.shape[0]
    per_image = len(texts) // n_img
    tok = tokenizer(list(texts), max_length=EVAL_MAX_LENGTH, padding="max_length",
                    truncation=True)
    ids, mask = tok["input_ids"].to(images.device), tok["attention_mask"].to(images.device)
    image = model.encode_image(images)
    text = model.encode_text(ids, mask)
    # Every caption meets its own image's tokens: one fusion call for the whole batch.
    itm = itm_match_logit(model, image.tokens.repeat_interleave(per_image, dim=0), text.states,
                          mask)
    itc = torch.einsum("bd,bcd->bc", image.feat, text.feat.view(n_img, per_image, -1))
    return itm.view(n_img, per_image), itc


def _accuracies(wins: Tensor, counts: Tensor, kinds: Sequence[str], prefix: str
                ) -> dict[str, float]:
    """wins, counts: (K,) -> ``{prefix/kind: percent, prefix/mean: mean of the swap kinds}``
    (reference kinds such as "random" are reported but not averaged into the mean)."""
    acc = {f"{prefix}/{kind}": 100.0 * float(w) / float(c)
           for kind, w, c in zip(kinds, wins, counts, strict=True) if c > 0}
    swaps = [v for k, v in acc.items() if k.rsplit("/", 1)[1] not in REFERENCE_KINDS]
    acc[f"{prefix}/mean"] = sum(swaps) / len(swaps) if swaps else float("nan")
    return acc


def compositional_accuracy(
    model: ALBEF,
    items: Sequence[NegativeItem],
    image_transform: Callable[[Image.Image], Tensor],
    image_root: str | Path,
    tokenizer: TextTokenizer,
    device: torch.device | str,
    batch_size: int = 64,
) -> dict[str, float]:
    """Hard-negative accuracy per kind, by ITM logit (``comp/...``) and ITC cosine
    (``comp_itc/...``), in percent; ``.../mean`` averages the kinds.

    Args:
        model: ALBEF, already on ``device`` (eval mode inside, restored after).
        items: ``{"image", "caption", "negatives": {kind: caption}}`` items.
        image_transform: The evaluation transform (PIL -> (3, H, W)).
        image_root: Base directory of the items' image paths.
        tokenizer: ALBEF-convention tokenizer.
        device: Where the model runs.
        batch_size: Images per call (each brings 1 + K captions).
    """
    if len(items) == 0:
        raise ValueError("compositional_accuracy got no items")
    kinds = negative_kinds(items)
    if not kinds:
        raise ValueError("no item has any negatives")
    device = torch.device(device)
    wins_itm = torch.zeros(len(kinds), dtype=torch.long)
    wins_itc = torch.zeros_like(wins_itm)
    counts = torch.zeros_like(wins_itm)
    with eval_mode(model):
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            texts, present = caption_groups(chunk, kinds)
            images = load_images(chunk, Path(image_root), image_transform).to(device)
            itm, itc = score_pairs(model, images, texts, tokenizer)
            # Column 0 is the true caption; strict '>' so that a tie counts as a loss.
            wins_itm += ((itm[:, :1] > itm[:, 1:]).cpu() & present).sum(0)
            wins_itc += ((itc[:, :1] > itc[:, 1:]).cpu() & present).sum(0)
            counts += present.sum(0)
    out = {**_accuracies(wins_itm, counts, kinds, "comp"),
           **_accuracies(wins_itc, counts, kinds, "comp_itc")}
    logger.info("compositional accuracy over %d items: %s", len(items),
                ", ".join(f"{k} {v:.1f}" for k, v in out.items()))
    return out
