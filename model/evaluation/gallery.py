"""Per-word Grad-CAM gallery: the paper's qualitative figure (docs/METHOD.md §5, docs/ALBEF.md §7).

One row per (image, caption): the image, then for every word of the caption its Grad-CAM
heatmap overlaid on the image, then the soft mask SoftMask would apply for one chosen word.

The maps are computed exactly as in training: the positive fusion pass with the cross-attention
probabilities of ``layer`` returned, the ITM positive-class logit, and the very same
:func:`~model.method.gradcam.gradcam_maps` / :func:`~model.method.softmask.soft_mask_from_maps`
functions (no re-implementation). The model runs in eval mode (no dropout); its training mode is
restored afterwards, and no parameter ``.grad`` is written (``autograd.grad`` only).

Rendering follows ALBEF's visualisation notebook: per word, min-max normalise the patch grid,
upsample bicubically to the (display) image size, optionally Gaussian-blur with
sigma = 0.02 * max(H, W) and min-max normalise again, apply the jet colour map and overlay as
``out = (1 - a^0.7) * image + a^0.7 * colour``. The soft mask (1 - min-max map of the chosen
word) is drawn as a greyscale panel with nearest-neighbour upsampling, so each patch's
multiplier is shown as it is (white = kept, black = masked out).

Library: :func:`gradcam_gallery`. Command line (model/cli/gallery.py)::

    python -m model.cli.gallery --run-dir RUN [--checkpoint PATH] [--n 6] [--out gallery.png]
        [--image PATH --caption TEXT ...] [--layer L] [--mask-word K] [--no-blur]

With no ``--image``/``--caption`` pairs, the first ``n`` images of the run's evaluation split are
shown with their first caption. The canvas is composed pixel-exactly (PIL), so panel positions
in the PNG are known (:meth:`GalleryResult.panel_box`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from model.albef import ALBEF
from model.method.gradcam import gradcam_maps, minmax_normalise
from model.method.softmask import choose_words, real_word_mask, soft_mask_from_maps

# Layout (pixels).
PAD = 4
CAPTION_H = 18
LABEL_H = 16
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
FRAME = (128, 128, 128)
BOX = (255, 0, 255)  # ground-truth object boxes: magenta is in neither the jet map nor the mask
OVERLAY_POWER = 0.7  # ALBEF notebook: a^0.7
BLUR_FRACTION = 0.02  # ALBEF notebook: sigma = 0.02 * max(H, W)


@dataclass
class GalleryRow:
    """One (image, caption) pair.

    Attributes:
        caption: The caption as tokenised (cleaned unless ``clean=False``).
        words: Token strings of the real words shown, in caption order.
        positions: Their token positions in the input ids ([CLS] = 0).
        maps: (n_words, gh, gw) raw Grad-CAM of each shown word (``gradcam_maps`` output).
        heat: (n_words, P, P) displayed heat in [0, 1] (normalised, upsampled, blurred).
        mask_word: Index into ``words`` of the word whose soft mask is shown (-1: [CLS] fallback
            for a caption without a real word).
        mask: (gh, gw) the soft mask in [0, 1] (``soft_mask_from_maps``), as training uses it.
        itm_score: Match probability softmax(ITM logits)[1].
    """

    caption: str
    words: list[str]
    positions: list[int]
    maps: np.ndarray
    heat: np.ndarray
    mask_word: int
    mask: np.ndarray
    itm_score: float


@dataclass
class GalleryResult:
    """The written PNG and what is in it (arrays for tests, boxes to find panels in the PNG)."""

    path: Path
    rows: list[GalleryRow]
    panel_size: int
    n_columns: int
    size: tuple[int, int]  # (height, width) of the PNG in pixels
    layer: int
    grid: tuple[int, int] = field(default=(0, 0))

    def panel_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) pixel box of a panel; column 0 = image, 1..k = words,
        ``n_columns - 1`` = the mask."""
        return _panel_box(row, column, self.panel_size)

    def word_column(self, word: int) -> int:
        return 1 + word

    @property
    def mask_column(self) -> int:
        return self.n_columns - 1


# --------------------------------------------------------------------------------- compute
def _special_tensor(tokenizer, device: torch.device) -> Tensor:
    ids = sorted(int(i) for i in getattr(tokenizer, "special_ids", ()))
    if not ids:
        ids = sorted({tokenizer.pad_id, tokenizer.cls_id, tokenizer.mask_id})
    return torch.tensor(ids, dtype=torch.long, device=device)


def compute_gradcam(student: ALBEF, images: Tensor, input_ids: Tensor, attention_mask: Tensor,
                    layer: int) -> tuple[Tensor, Tensor]:
    """Grad-CAM of the ITM positive logit w.r.t. fusion layer ``layer``'s cross-attention.

    Same computation as the training objective's SoftMask (positive fusion pass with
    ``attn_layer``, :func:`gradcam_maps`), in eval mode. The encoders run without a graph: the
    gradient w.r.t. the attention probabilities only depends on the fusion layers above them, so
    the text states are made a leaf instead (values identical, no parameter ``.grad`` touched).

    Returns:
        maps (B, L, N) detached, and the ITM logits (B, 2) detached.
    """
    if not 0 <= layer < len(student.fusion_encoder.layer):
        raise ValueError(f"layer {layer} is outside the fusion stack "
                         f"(0..{len(student.fusion_encoder.layer) - 1})")
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            img = student.encode_image(images)
            txt = student.encode_text(input_ids, attention_mask)
        with torch.enable_grad():
            states = txt.states.detach().requires_grad_(True)
            pos = student.fuse(states, attention_mask, img.tokens, attn_layer=layer)
            logits = student.itm_logits(pos.hidden)
            maps = gradcam_maps(logits, pos.cross_attn, attention_mask)
    finally:
        student.train(was_training)
    return maps, logits.detach()


# --------------------------------------------------------------------------------- render
def _jet(values: np.ndarray) -> np.ndarray:
    import matplotlib

    return matplotlib.colormaps["jet"](values)[..., :3]


def heat_from_map(grid: Tensor, size: int, blur: bool = True) -> Tensor:
    """(gh, gw) Grad-CAM -> (size, size) display heat in [0, 1] (ALBEF notebook recipe)."""
    a = minmax_normalise(grid.reshape(1, -1).float()).reshape(1, 1, *grid.shape)
    a = F.interpolate(a, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    if blur:
        from torchvision.transforms.v2.functional import gaussian_blur

        sigma = BLUR_FRACTION * size
        kernel = 2 * math.ceil(3 * sigma) + 1
        a = gaussian_blur(a, kernel_size=[kernel, kernel], sigma=[sigma, sigma])
    a = minmax_normalise(a.reshape(1, -1)).reshape(size, size)
    return a


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """out = (1 - a^0.7) * image + a^0.7 * jet(a); image (P, P, 3) in [0, 1], heat (P, P)."""
    w = heat[..., None] ** OVERLAY_POWER
    return (1.0 - w) * image + w * _jet(heat)


def _panel_box(row: int, column: int, panel: int) -> tuple[int, int, int, int]:
    row_h = CAPTION_H + LABEL_H + panel + PAD
    top = PAD + row * row_h + CAPTION_H + LABEL_H
    left = PAD + column * (panel + PAD)
    return top, left, top + panel, left + panel


def _font(size: int):
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except Exception:  # any font problem: PIL's built-in font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _render(rows: list[GalleryRow], images: list[np.ndarray], panel: int, n_columns: int,
            out_path: Path, boxes: Sequence[Sequence[Sequence[float]]] | None = None
            ) -> tuple[int, int]:
    n_rows = len(rows)
    width = PAD + n_columns * (panel + PAD)
    height = PAD + n_rows * (CAPTION_H + LABEL_H + panel + PAD)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font, small = _font(12), _font(10)
    for r, (row, image) in enumerate(zip(rows, images, strict=True)):
        top0 = _panel_box(r, 0, panel)[0] - CAPTION_H - LABEL_H
        caption = row.caption or "(empty caption: no word, the mask uses [CLS])"
        draw.text((PAD, top0 + 2), _fit(draw, caption, font, width - 2 * PAD), fill=TEXT,
                  font=font)
        labels = {0: f"image  p={row.itm_score:.2f}"}
        tiles = {0: image}
        for k, word in enumerate(row.words):
            labels[1 + k] = word
            tiles[1 + k] = overlay(image, row.heat[k])
        chosen = row.words[row.mask_word] if row.mask_word >= 0 else "[CLS]"
        labels[n_columns - 1] = f"mask: {chosen}"
        grey = np.kron(row.mask, np.ones((panel // row.mask.shape[0],
                                          panel // row.mask.shape[1])))
        tiles[n_columns - 1] = np.repeat(grey[..., None], 3, axis=2)
        for c, tile in tiles.items():
            top, left, bottom, right = _panel_box(r, c, panel)
            canvas.paste(Image.fromarray(_to_uint8(tile)), (left, top))
            if c == n_columns - 1:  # frame the mask: kept patches are white like the page
                draw.rectangle((left - 1, top - 1, right, bottom), outline=FRAME)
            for x0, y0, x1, y1 in (boxes[r] if boxes else ()):  # ground-truth objects
                draw.rectangle((left + x0, top + y0, left + x1, top + y1), outline=BOX)
            text = _fit(draw, labels[c], small, panel)
            x = left + (panel - draw.textlength(text, font=small)) / 2
            draw.text((x, top - LABEL_H + 2), text, fill=TEXT, font=small)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path, format="PNG")
    return height, width


def _display_image(image: Image.Image, panel: int) -> np.ndarray:
    shown = image.convert("RGB").resize((panel, panel), Image.Resampling.BICUBIC)
    return np.asarray(shown, dtype=np.float32) / 255.0


# --------------------------------------------------------------------------------- library
def _gallery_maps(student: ALBEF, tokenizer, images: Sequence[Image.Image],
                  captions: Sequence[str], transform: Callable[[Image.Image], Tensor], layer: int,
                  max_tokens: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Tokenise and transform the pairs, then :func:`compute_gradcam`.

    Returns:
        input ids (B, L), attention mask (B, L), maps (B, L, N) and ITM logits (B, 2).
    """
    batch_images = torch.stack([transform(im.convert("RGB")) for im in images]).to(device)
    tok = tokenizer(list(captions), max_length=max_tokens, padding="longest", truncation=True)
    ids, att = tok["input_ids"].to(device), tok["attention_mask"].to(device)
    maps, logits = compute_gradcam(student, batch_images, ids, att, layer)
    return ids, att, maps, logits


def _grid_side(n_patches: int) -> int:
    side = int(round(math.sqrt(n_patches)))
    if side * side != n_patches:
        raise ValueError(f"{n_patches} patches do not form a square grid")
    return side


def _fit_panel_size(panel_size: int, side: int) -> int:
    """Round ``panel_size`` to a multiple of the grid side (the mask is drawn patch-exact)."""
    if panel_size % side:
        panel_size = side * max(1, round(panel_size / side))
    return panel_size


def _mask_positions(real: Tensor, mask_word: int | None, seed: int) -> Tensor:
    """Token position (per caption) of the word whose soft mask is shown; 0 ([CLS]) if none."""
    if mask_word is None:
        return choose_words(real, torch.Generator().manual_seed(seed))
    words = torch.zeros(real.shape[0], dtype=torch.long)
    for b in range(real.shape[0]):
        positions = real[b].nonzero().flatten()
        if len(positions):
            words[b] = positions[min(max(mask_word, 0), len(positions) - 1)]
    return words


def _gallery_row(caption: str, tokens: list[str], positions: list[int], maps: Tensor,
                 chosen: int, mask: Tensor, itm_score: float, side: int, panel_size: int,
                 blur: bool, max_words: int) -> GalleryRow:
    """One row's arrays: ``maps`` (L, N) and ``mask`` (N,) are that caption's, on any device."""
    shown = positions[:max_words]
    grids = maps[shown].reshape(len(shown), side, side).cpu()
    heat = (torch.stack([heat_from_map(g, panel_size, blur) for g in grids]) if shown
            else torch.zeros(0, panel_size, panel_size))
    return GalleryRow(
        caption=caption,
        words=[tokens[p] for p in shown],
        positions=shown,
        maps=grids.numpy(),
        heat=heat.numpy(),
        mask_word=shown.index(chosen) if chosen in shown else -1,
        mask=mask.reshape(side, side).cpu().numpy(),
        itm_score=itm_score,
    )


def gradcam_gallery(
    student: ALBEF,
    tokenizer,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    transform: Callable[[Image.Image], Tensor],
    layer: int,
    out_path: str | Path,
    mask_word: int | None = None,
    panel_size: int = 128,
    blur: bool = True,
    max_words: int = 12,
    max_tokens: int = 30,
    clean: bool = True,
    seed: int = 0,
    boxes: Sequence[Sequence[Sequence[float]]] | None = None,
) -> GalleryResult:
    """Write the per-word Grad-CAM gallery PNG and return its arrays.

    The words shown are the caption's real tokens: ``real_word_mask`` with all the tokenizer's
    special ids ([UNK] and [SEP] too), so one panel per word piece of a BERT vocabulary and one
    per word of the synthetic whole-word vocabulary.

    Args:
        student: The (trained) ALBEF student; its mode is restored afterwards.
        tokenizer: A :class:`~model.data.tokenizer.TextTokenizer` (ALBEF form, no [SEP]).
        images, captions: The pairs, one row each.
        transform: The model's test transform (e.g. ``build_transform("test", size)``).
        layer: 0-based fusion layer whose cross-attention is explained (``softmask.layer``).
        out_path: PNG file to write.
        mask_word: Index (among the caption's real words, 0 = first) of the word whose soft mask
            is shown; clipped to the caption's last word. ``None``: drawn uniformly at random
            (seeded by ``seed``) with :func:`choose_words`, as training does.
        panel_size: Side of each panel in pixels (small images are upscaled for display); must
            be a multiple of the patch grid side.
        blur: Gaussian blur of the upsampled heat (sigma = 0.02 * panel_size).
        max_words: At most this many words per caption are drawn (the mask may use any word).
        max_tokens: Tokenisation length cap, [CLS] included.
        clean: Apply ALBEF's ``pre_caption`` to the captions first (as training does).
        seed: Seed for the random mask-word choice.
        boxes: Per pair, the ground-truth object boxes ``(x0, y0, x1, y1)`` in the image's
            pixels (the synthetic set's ``test_boxes.json``), outlined on every panel.
    """
    if len(images) != len(captions) or not images:
        raise ValueError(f"need equally many images and captions (got {len(images)} images and "
                         f"{len(captions)} captions), at least one")
    if clean:
        from model.data.captions import pre_caption

        captions = [pre_caption(c) for c in captions]
    device = next(student.parameters()).device
    ids, att, maps, logits = _gallery_maps(student, tokenizer, images, captions, transform,
                                           layer, max_tokens, device)
    side = _grid_side(maps.shape[-1])
    panel_size = _fit_panel_size(panel_size, side)

    real = real_word_mask(ids, att, _special_tensor(tokenizer, device))
    words = _mask_positions(real, mask_word, seed).to(device)
    masks = soft_mask_from_maps(maps, words)  # the training function: 1 - minmax(G[t])
    probs = logits.float().softmax(dim=-1)[:, 1]

    rows = [
        _gallery_row(captions[b], tokenizer.convert_ids_to_tokens(ids[b].cpu()),
                     real[b].nonzero().flatten().tolist(), maps[b], int(words[b]), masks[b],
                     float(probs[b]), side, panel_size, blur, max_words)
        for b in range(len(captions))
    ]
    n_columns = 2 + max(len(r.words) for r in rows)
    shown_images = [_display_image(im, panel_size) for im in images]
    out = Path(out_path)
    scaled = None if boxes is None else [
        [[v * panel_size / im.width for v in box] for box in row_boxes]
        for im, row_boxes in zip(images, boxes, strict=True)]
    size = _render(rows, shown_images, panel_size, n_columns, out, scaled)
    return GalleryResult(out, rows, panel_size, n_columns, size, layer, (side, side))
