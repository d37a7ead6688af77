"""Grad-CAM localisation scored against ground-truth object boxes (the synthetic set knows them).

SoftMask masks image patches with a word's Grad-CAM map; the paper claims its maps cover the
objects more accurately and more widely. This module turns that into two numbers. For every test
image's first caption and every word that names an object's colour or shape, the word's map is
taken exactly as SoftMask takes it (:func:`model.method.gradcam.gradcam_maps`: the positive ITM
logit's gradient times the cross-attention probabilities of fusion layer ``softmask.layer``) and
scored:

* ``loc/pointing``: pointing-game accuracy, the share of words whose map peaks on a patch whose
  centre lies inside the named object's box. When several patches tie for the peak, the word
  counts as a hit only if every one of them is inside (a flat map cannot win by index order);
  an all-zero map is a miss.
* ``loc/mass``: the share of the map's total mass on patches whose centre lies inside the box
  (0 for an all-zero map), averaged over words.

``loc/pointing_colour`` and ``loc/pointing_shape`` split the pointing game by the word's kind.
Boxes file items: ``{"image", "caption", "objects": [{"colour", "shape", "box": [x0, y0, x1,
y1]}]}`` with boxes in the stored image's pixels (``test_boxes.json`` of the synthetic set).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
from model.method.gradcam import gradcam_maps

logger = logging.getLogger(__name__)

WORD_KINDS = ("colour", "shape")


def patch_centres(grid: int, patch_px: float) -> Tensor:
    """(grid * grid, 2) pixel (x, y) centres of the ViT's patches in row-major token order."""
    coords = (torch.arange(grid, dtype=torch.float32) + 0.5) * patch_px
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)


def inside_boxes(boxes: Tensor, centres: Tensor) -> Tensor:
    """(W, 4) boxes (x0, y0, x1, y1), (N, 2) centres -> (W, N) bool: centre inside the box."""
    x, y = centres[:, 0][None], centres[:, 1][None]
    x0, y0, x1, y1 = (boxes[:, k:k + 1] for k in range(4))
    return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)


def pointing_and_mass(maps: Tensor, inside: Tensor) -> tuple[Tensor, Tensor]:
    """(W, N) non-negative maps, (W, N) in-box patches -> per word (hit: bool, mass share).

    A hit needs a positive peak and every patch at the peak value inside the box.
    """
    maps = maps.float()
    peak = maps.amax(dim=1, keepdim=True)
    at_peak = maps == peak
    hits = (peak.squeeze(1) > 0) & ~(at_peak & ~inside).any(dim=1)
    total = maps.sum(dim=1)
    mass = torch.where(total > 0, (maps * inside).sum(dim=1) / total.clamp_min(1e-30),
                       torch.zeros_like(total))
    return hits, mass


@dataclass
class _Words:
    """The scored words of one batch: map rows, boxes and kinds."""

    maps: list[Tensor]
    boxes: list[list[float]]
    kinds: list[str]


def load_box_items(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a boxes file (see the module doc)."""
    path = Path(path)
    items = read_json_items(path, "boxes file")
    for index, item in enumerate(items):
        objects = item.get("objects") if isinstance(item, dict) else None
        ok = (isinstance(item, dict) and isinstance(item.get("image"), str)
              and isinstance(item.get("caption"), str) and isinstance(objects, list)
              and all(isinstance(o, dict) and len(o.get("box", ())) == 4
                      and all(isinstance(o.get(k), str) for k in WORD_KINDS) for o in objects))
        if not ok:
            raise ValueError(f"{path}: item {index} needs 'image' and 'caption' (str) and "
                             f"'objects' ([{{colour, shape, box: [x0, y0, x1, y1]}}]), "
                             f"got {item!r}")
    return items


def _word_rows(tokens: Sequence[str], objects: Sequence[dict[str, Any]], scale: float,
               maps: Tensor, out: _Words) -> None:
    """Append the map row of every token that names one object's colour or shape."""
    for obj in objects:
        box = [v * scale for v in obj["box"]]
        for kind in WORD_KINDS:
            for pos, token in enumerate(tokens):
                if token == obj[kind]:
                    out.maps.append(maps[pos])
                    out.boxes.append(box)
                    out.kinds.append(kind)


def _batch_words(model: ALBEF, chunk: Sequence[dict[str, Any]], image_root: Path,
                 transform: Callable[[Image.Image], Tensor], tokenizer: TextTokenizer,
                 device: torch.device, layer: int) -> _Words:
    """Grad-CAM maps of one batch of items, split into scored word rows."""
    images, scales = [], []
    for item in chunk:
        with Image.open(image_root / item["image"]) as raw:
            tensor = transform(raw.convert("RGB"))
            scales.append(tensor.shape[-1] / raw.width)
        images.append(tensor)
    captions = [pre_caption(item["caption"], EVAL_MAX_LENGTH) for item in chunk]
    tok = tokenizer(captions, max_length=EVAL_MAX_LENGTH, padding="longest")
    ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
    image = model.encode_image(torch.stack(images).to(device))
    with torch.enable_grad():  # the map is a gradient; parameters' .grad stay untouched
        text = model.encode_text(ids, mask)
        fused = model.fuse(text.states, mask, image.tokens, attn_layer=layer)
        maps = gradcam_maps(model.itm_logits(fused.hidden), fused.cross_attn, mask)
    words = _Words([], [], [])
    for b, item in enumerate(chunk):
        _word_rows(tokenizer.convert_ids_to_tokens(ids[b]), item["objects"], scales[b],
                   maps[b].cpu(), words)
    return words


def localisation_scores(model: ALBEF, items: Sequence[dict[str, Any]],
                        image_transform: Callable[[Image.Image], Tensor],
                        image_root: str | Path, tokenizer: TextTokenizer,
                        device: torch.device | str, layer: int, patch_size: int,
                        batch_size: int = 64) -> dict[str, float]:
    """Pointing game and in-box mass of the fusion layer ``layer``'s Grad-CAM, in percent."""
    device = torch.device(device)
    words = _Words([], [], [])
    with eval_mode(model):
        for start in range(0, len(items), batch_size):
            got = _batch_words(model, items[start:start + batch_size], Path(image_root),
                               image_transform, tokenizer, device, layer)
            words.maps += got.maps
            words.boxes += got.boxes
            words.kinds += got.kinds
    if not words.maps:
        raise ValueError("no caption word names an object of the boxes file")
    maps = torch.stack(words.maps)
    grid = int(round(maps.shape[1] ** 0.5))
    inside = inside_boxes(torch.tensor(words.boxes), patch_centres(grid, patch_size))
    hits, mass = pointing_and_mass(maps, inside)
    kinds = torch.tensor([WORD_KINDS.index(k) for k in words.kinds])
    out = {"loc/pointing": 100.0 * hits.float().mean().item(),
           "loc/mass": 100.0 * mass.mean().item()}
    for k, kind in enumerate(WORD_KINDS):
        if (kinds == k).any():
            out[f"loc/pointing_{kind}"] = 100.0 * hits[kinds == k].float().mean().item()
    logger.info("Grad-CAM localisation over %d words: %s", len(words.kinds),
                ", ".join(f"{k} {v:.1f}" for k, v in out.items()))
    return out
