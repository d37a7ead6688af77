"""Test-time occlusion of one named object (docs/METHOD.md §6): how much the match depends on
each object the caption names, measured with ground-truth boxes, not the model's own Grad-CAM.

For every item of the boxes file (an image, its caption naming both objects, the objects'
boxes) each object is occluded in turn: the pixels whose centres lie in its box take the mean
colour of a 2-pixel ring around the box (pixels inside any object's box excluded). Metrics, in
percent or percentage points:

* ``occ/match_clean`` / ``occ/match_occluded``: mean ITM match probability of the caption with
  the clean image / with one object hidden (averaged over both objects);
* ``occ/drop``: their difference; ``occ/drop_gap``: mean over images of the absolute difference
  between the drops of the two objects (0 = the match relies on both equally);
* ``occ/tr1``: text-retrieval R@1 of the occluded images against every caption of the split
  (ITC top-k, then ITM re-ranking, as ``TR@1``);
* ``occ/itc_rank_increase``: mean increase of the best own caption's ITC rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from model.albef import ALBEF
from model.data.captions import pre_caption
from model.data.tokenizer import TextTokenizer
from model.evaluation.features import (
    EVAL_MAX_LENGTH,
    RetrievalFeatures,
    eval_mode,
    extract_features,
)
from model.evaluation.rerank import rerank_itm

RING = 2  # pixels of background around a box whose mean colour fills it


def box_pixels(box: Sequence[float], height: int, width: int) -> np.ndarray:
    """(H, W) bool: pixels whose centre lies inside ``box`` = (x0, y0, x1, y1)."""
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    x0, y0, x1, y1 = box
    return (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)


def occlude(image: np.ndarray, boxes: Sequence[Sequence[float]], which: int) -> np.ndarray:
    """``image`` (H, W, 3 uint8) with object ``which``'s box filled with its surroundings'
    mean colour (the ring of RING pixels around it, outside every object's box)."""
    h, w = image.shape[:2]
    inside = [box_pixels(b, h, w) for b in boxes]
    anywhere = np.logical_or.reduce(inside)
    x0, y0, x1, y1 = boxes[which]
    grown = box_pixels((x0 - RING, y0 - RING, x1 + RING, y1 + RING), h, w)
    ring = grown & ~anywhere
    source = ring if ring.any() else ~anywhere
    fill = image[source].mean(axis=0) if source.any() else image.reshape(-1, 3).mean(axis=0)
    out = image.copy()
    out[inside[which]] = np.round(fill).astype(np.uint8)
    return out


def _views(items: Sequence[dict[str, Any]], image_root: Path,
           transform: Callable[[Image.Image], Tensor]) -> tuple[Tensor, Tensor, list[int]]:
    """Clean views (N, 3, H, W), occluded views (2N, ...: object 1 then 2 of every image) and
    each occluded view's item index."""
    clean, occluded, owner = [], [], []
    for index, item in enumerate(items):
        with Image.open(image_root / item["image"]) as raw:
            pixels = np.asarray(raw.convert("RGB"))
        clean.append(transform(Image.fromarray(pixels)))
        boxes = [o["box"] for o in item["objects"]]
        for which in range(len(boxes)):
            occluded.append(transform(Image.fromarray(occlude(pixels, boxes, which))))
            owner.append(index)
    return torch.stack(clean), torch.stack(occluded), owner


def _match_probability(model: ALBEF, images: Tensor, captions: Sequence[str],
                       tokenizer: TextTokenizer, device: torch.device, batch: int) -> Tensor:
    """ITM match probability (class 1) of each (image, caption) pair, (N,)."""
    out = []
    for start in range(0, len(captions), batch):
        tok = tokenizer(list(captions[start:start + batch]), max_length=EVAL_MAX_LENGTH,
                        padding="longest")
        ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
        img = model.encode_image(images[start:start + batch].to(device))
        txt = model.encode_text(ids, mask)
        logits = model.itm_logits(model.fuse(txt.states, mask, img.tokens).hidden)
        out.append(logits.float().softmax(dim=1)[:, 1].cpu())
    return torch.cat(out)


def _own_rank(scores: np.ndarray, own: Sequence[int]) -> int:
    """0-based rank of the best-placed own caption in a row of scores (higher first)."""
    order = np.argsort(-scores, kind="stable")
    return int(np.flatnonzero(np.isin(order, list(own)))[0])


def occlusion_scores(model: ALBEF, items: Sequence[dict[str, Any]],
                     transform: Callable[[Image.Image], Tensor], image_root: str | Path,
                     tokenizer: TextTokenizer, device: torch.device | str, k_test: int,
                     texts: Sequence[str], img2txt: dict[int, list[int]],
                     image_index: dict[str, int], batch_size: int = 64) -> dict[str, float]:
    """The §6 metrics. ``texts`` / ``img2txt`` / ``image_index``: the retrieval split's
    captions, each image's caption ids, and the split index of each image path."""
    device = torch.device(device)
    items = [item for item in items if len(item["objects"]) == 2]  # two named objects
    if not items:
        raise ValueError("no boxes-file item has two objects to occlude")
    clean, occluded, owner = _views(items, Path(image_root), transform)
    captions = [pre_caption(item["caption"], EVAL_MAX_LENGTH) for item in items]
    with eval_mode(model), torch.no_grad():
        p_clean = _match_probability(model, clean, captions, tokenizer, device, batch_size)
        p_occ = _match_probability(model, occluded, [captions[i] for i in owner], tokenizer,
                                   device, batch_size)
        loader = [(occluded[s:s + batch_size], None) for s in range(0, len(occluded),
                                                                       batch_size)]
        feats: RetrievalFeatures = extract_features(model, loader, texts, tokenizer, device)
        clean_feat = torch.cat([model.encode_image(clean[s:s + batch_size].to(device)).feat
                                for s in range(0, len(clean), batch_size)])
        sim = feats.image_feat @ feats.text_feat.t()
        scores = rerank_itm(model, feats, sim, k_test)[0].cpu().numpy()
        clean_sim = (clean_feat @ feats.text_feat.t()).cpu().numpy()
    own = [img2txt[image_index[items[i]["image"]]] for i in owner]
    drops = (p_clean[owner] - p_occ).view(len(items), -1)
    hits = [_own_rank(scores[j], own[j]) == 0 for j in range(len(owner))]
    sim_np = sim.cpu().numpy()
    increase = [_own_rank(sim_np[j], own[j]) - _own_rank(clean_sim[owner[j]], own[j])
                for j in range(len(owner))]
    return {"occ/match_clean": 100.0 * p_clean.mean().item(),
            "occ/match_occluded": 100.0 * p_occ.mean().item(),
            "occ/drop": 100.0 * drops.mean().item(),
            "occ/drop_gap": 100.0 * (drops[:, 0] - drops[:, -1]).abs().mean().item(),
            "occ/tr1": 100.0 * float(np.mean(hits)),
            "occ/itc_rank_increase": float(np.mean(increase))}
