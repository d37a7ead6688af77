"""Rendering a scene: textured, noisy background, anti-aliased shapes (supersampled, then
box-filtered), placed in separated halves of the image; object boxes for localisation."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw

from model.data.synthetic.spec import PALETTE, SUPPORTED_SHAPES, Scene, SyntheticSpec

# Shapes are drawn at this multiple of the image size and box-filtered down: clean anti-aliased
# edges at 32 px without hand-written rasterisation.
SUPERSAMPLE = 4
TEXTURE_GRID = 4  # background texture: a 4x4 grid of random tints, smoothly interpolated

@functools.lru_cache(maxsize=8)
def _upsampling_matrix(size: int, coarse: int) -> np.ndarray:
    """(size, coarse) matrix of linear-interpolation weights (pixel centres, edges clamped)."""
    positions = (np.arange(size) + 0.5) * coarse / size - 0.5
    basis = np.eye(coarse)
    return np.stack([np.interp(positions, np.arange(coarse), basis[k]) for k in range(coarse)], 1)


def _background(spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    """A grey, slightly tinted background with a smooth low-frequency texture, float32 HxWx3."""
    grey = rng.uniform(70.0, 130.0)
    tint = rng.uniform(-10.0, 10.0, 3)
    coarse = rng.normal(0.0, spec.texture_std, (TEXTURE_GRID, TEXTURE_GRID, 3))
    # Bilinear upsampling of a 4x4 grid gives blobs larger than a patch: texture, not a cue.
    # Done as two small matrix products, which is much cheaper per image than image resizes.
    up = _upsampling_matrix(spec.image_size, TEXTURE_GRID)
    texture = (up @ coarse.transpose(2, 0, 1) @ up.T).transpose(1, 2, 0)
    return (grey + tint + texture).astype(np.float32)


def _place(
    scene: Scene, spec: SyntheticSpec, rng: np.random.Generator
) -> list[tuple[float, float, float]]:
    """Centre (x, y) and extent in pixels of every object.

    With two objects, the first lies entirely in the left (top) half and the second entirely in
    the right (bottom) half, so the relation never depends on a pixel or two; the position along
    the other axis is free.
    """
    size = float(spec.image_size)
    placed = []
    for k, obj in enumerate(scene.objects):
        extent = spec.size_fractions[spec.sizes.index(obj.size)] * size
        radius = extent / 2
        if scene.axis is None:
            lo, hi = radius, size - radius
        elif k == 0:
            lo, hi = radius, size / 2 - radius
        else:
            lo, hi = size / 2 + radius, size - radius
        along = rng.uniform(lo, max(lo, hi))
        across = rng.uniform(radius, size - radius)
        x, y = (across, along) if scene.axis == "vertical" else (along, across)
        placed.append((x, y, extent))
    return placed


def _shape_alpha(shape: str, x: float, y: float, extent: float, size: int) -> np.ndarray:
    """Coverage (0..1, float32 HxW) of one shape, drawn supersampled and box-filtered down."""
    k = SUPERSAMPLE
    mask = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = x * k, y * k, extent * k / 2
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        h = 0.89 * r  # about the circle's area, so shape is not read off the area
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SUPPORTED_SHAPES}")
    small = mask.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


Box = tuple[float, float, float, float]


def render_scene(scene: Scene, spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    """Draw a scene: background, objects (jittered colours), then pixel noise. uint8 HxWx3."""
    return render_scene_with_boxes(scene, spec, rng)[0]


def render_scene_with_boxes(scene: Scene, spec: SyntheticSpec, rng: np.random.Generator
                            ) -> tuple[np.ndarray, list[Box]]:
    """:func:`render_scene` plus each object's box ``(x0, y0, x1, y1)`` in pixels.

    The box is the square of side ``extent`` centred on the object: the circle's and the
    triangle's bounding box exactly, a little larger than the square (drawn at 0.89 of it).
    """
    canvas = _background(spec, rng)
    boxes: list[Box] = []
    for obj, (x, y, extent) in zip(scene.objects, _place(scene, spec, rng), strict=True):
        alpha = _shape_alpha(obj.shape, x, y, extent, spec.image_size)[:, :, None]
        jitter = rng.uniform(-spec.colour_jitter, spec.colour_jitter, 3)
        colour = np.asarray(PALETTE[obj.colour], dtype=np.float32) + jitter
        canvas = canvas * (1.0 - alpha) + colour * alpha
        half = extent / 2
        boxes.append((x - half, y - half, x + half, y + half))
    canvas = canvas + rng.normal(0.0, spec.noise_std, canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), boxes
