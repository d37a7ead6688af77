"""Image transforms: ALBEF's standard views and the method's strong view (torchvision v2).

Every transform takes a PIL RGB image and returns a normalised float32 tensor (3, S, S). ALBEF
normalises with CLIP's statistics, not ImageNet's.

RandAugment: ALBEF ships its own OpenCV/NumPy ``RandomAugment``; here torchvision's
``v2.RandAugment`` replaces it, a knowingly accepted difference. To stay close to ALBEF,
:class:`AlbefRandAugment` keeps torchvision's operations but restricts the pool to ALBEF's ten
ops (no Color, Contrast, Posterize or Solarize), counts magnitudes out of 10 like ALBEF (so
magnitude 7 gives ALBEF's 21 degree rotation and 0.21 shear), translates by ALBEF's 7 pixels per
256 pixels of image side, and fills with ALBEF's grey (128). Remaining differences: torchvision
applies every drawn op (ALBEF applies each with probability 0.5), brightness and sharpness
factors are 1 +- 0.63 (ALBEF: always 1.36), ALBEF's sharpness wrap-around overflow is not
reproduced, and torchvision's own RNG is used instead of NumPy's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from PIL import Image
from torchvision.transforms import v2

from model.config.schema import STRONG_OPS

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

TransformKind = Literal["pretrain", "finetune", "test", "strong"]
ImageTransform = Callable[[Image.Image], torch.Tensor]

# ALBEF: RandomAugment(N=2, M=7) with MAX_LEVEL = 10.
RANDAUG_NUM_OPS = 2
RANDAUG_MAGNITUDE = 7
_RANDAUG_LEVELS = 10
_ALBEF_OPS = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
_ALBEF_FILL = 128
# ALBEF translates by M absolute pixels on 256 px pre-training images; scaling with the image side
# keeps the same relative shift on the small images of a CPU run.
_TRANSLATE_PIXELS_PER_LEVEL_AT_256 = 1.0

CROP_SCALES: dict[str, tuple[float, float]] = {
    "pretrain": (0.2, 1.0),
    "finetune": (0.5, 1.0),
    "strong": (0.2, 1.0),
}
# The strong view (method section 3): SimCLR-style colour distortion and blur on top of ALBEF's
# crop and RandAugment.
STRONG_COLOR_JITTER = (0.4, 0.4, 0.4, 0.1)
STRONG_BLUR_SIGMA = (0.1, 2.0)


def _translate_x(num_bins: int, height: int, width: int) -> torch.Tensor:
    """Horizontal shift per magnitude bin, in pixels (ALBEF's scale, relative to the width)."""
    top = _RANDAUG_LEVELS * _TRANSLATE_PIXELS_PER_LEVEL_AT_256 * width / 256.0
    return torch.linspace(0.0, top, num_bins)


def _translate_y(num_bins: int, height: int, width: int) -> torch.Tensor:
    """Vertical shift per magnitude bin, in pixels (ALBEF's scale, relative to the height)."""
    top = _RANDAUG_LEVELS * _TRANSLATE_PIXELS_PER_LEVEL_AT_256 * height / 256.0
    return torch.linspace(0.0, top, num_bins)


class AlbefRandAugment(v2.RandAugment):
    """torchvision's RandAugment restricted to ALBEF's op pool and magnitude scale.

    Only the op table is changed (``_AUGMENTATION_SPACE``, which ``v2.RandAugment.forward``
    samples from); the image operations themselves are torchvision's.
    """

    _AUGMENTATION_SPACE = {
        **{name: v2.RandAugment._AUGMENTATION_SPACE[name] for name in _ALBEF_OPS},
        "TranslateX": (_translate_x, True),
        "TranslateY": (_translate_y, True),
    }

    def __init__(self, num_ops: int = RANDAUG_NUM_OPS, magnitude: int = RANDAUG_MAGNITUDE) -> None:
        """Draw ``num_ops`` ops per image at ``magnitude`` out of 10 (ALBEF: 2 and 7)."""
        if not 0 <= magnitude <= _RANDAUG_LEVELS:
            raise ValueError(f"magnitude must be in [0, {_RANDAUG_LEVELS}], got {magnitude}")
        super().__init__(
            num_ops=num_ops,
            magnitude=magnitude,
            num_magnitude_bins=_RANDAUG_LEVELS + 1,
            interpolation=v2.InterpolationMode.BILINEAR,  # ALBEF's warpAffine is bilinear
            fill=_ALBEF_FILL,
        )


def blur_kernel_size(image_size: int) -> int:
    """An odd Gaussian-blur kernel of about 10% of the image side (at least 3), as in SimCLR."""
    size = max(3, int(round(0.1 * image_size)))
    return size if size % 2 == 1 else size + 1


def _to_normalised_tensor() -> list[Any]:
    """PIL or uint8 image -> float32 in [0, 1] (ToTensor's /255) -> CLIP normalisation."""
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=CLIP_MEAN, std=CLIP_STD),
        # A plain tensor, not a tv_tensors.Image, so model code never meets a tensor subclass.
        v2.ToPureTensor(),
    ]


def _random_crop_and_flip(image_size: int, scale: tuple[float, float], hflip: bool) -> list[Any]:
    """ALBEF's crop (bicubic, on the PIL image as ALBEF does) and optional horizontal flip."""
    ops: list[Any] = [
        v2.RandomResizedCrop(
            image_size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True
        )
    ]
    # ALBEF flips without touching the caption, so "left"/"right" captions become wrong half of
    # the time; datasets whose captions name sides (the synthetic set) should pass hflip=False.
    if hflip:
        ops.append(v2.RandomHorizontalFlip(p=0.5))
    return ops


def build_transform(
    kind: TransformKind,
    image_size: int,
    hflip: bool = True,
    crop_scale: tuple[float, float] | None = None,
    randaugment: bool = True,
    strong_ops: Sequence[str] = STRONG_OPS,
) -> ImageTransform:
    """Build one of ALBEF's image transforms or the method's strong view.

    * ``pretrain``: RandomResizedCrop(scale (0.2, 1), bicubic) -> horizontal flip ->
      RandAugment(2 ops, magnitude 7) -> float tensor -> CLIP normalisation.
    * ``finetune``: the same with crop scale (0.5, 1) (ALBEF's retrieval training).
    * ``test``: bicubic resize to exactly (size, size), aspect ratio not kept -> tensor ->
      normalise.
    * ``strong``: crop -> flip -> ColorJitter(0.4, 0.4, 0.4, 0.1) -> RandAugment ->
      GaussianBlur (kernel ~10% of the side, sigma in [0.1, 2]) -> tensor -> normalise.

    See the module docstring for how the RandAugment differs from ALBEF's.

    Args:
        kind: Which transform.
        image_size: Output side in pixels.
        hflip: Random horizontal flip for the random kinds (ignored by ``test``).
        crop_scale: Override of the RandomResizedCrop area range (ignored by ``test``); e.g. a
            milder range keeps both objects of a synthetic scene in view.
        randaugment: Keep ALBEF's RandAugment in the standard views (``strong`` decides by
            ``strong_ops``). Off for the synthetic set, where Equalize/AutoContrast on its noisy
            background repaint the very colours the captions name.
        strong_ops: The strong view's photometric operations, a subset of
            :data:`STRONG_OPS` (``color_jitter``, ``randaugment``, ``blur``); default all three.

    Returns:
        A callable mapping a PIL RGB image to a float32 tensor (3, image_size, image_size).
    """
    if image_size <= 0:
        raise ValueError(f"build_transform: image_size must be positive, got {image_size}")
    if kind == "test":
        return v2.Compose(
            [
                v2.Resize(
                    (image_size, image_size),
                    interpolation=v2.InterpolationMode.BICUBIC,
                    antialias=True,
                ),
                *_to_normalised_tensor(),
            ]
        )
    if kind not in CROP_SCALES:
        raise ValueError(
            f"build_transform: unknown kind {kind!r}; expected pretrain, finetune, test or strong"
        )
    unknown = sorted(set(strong_ops) - set(STRONG_OPS))
    if unknown:
        raise ValueError(f"build_transform: unknown strong_ops {unknown}; expected a subset of "
                         f"{list(STRONG_OPS)}")
    ops = _random_crop_and_flip(image_size, crop_scale or CROP_SCALES[kind], hflip)
    ops.append(v2.ToImage())  # the photometric ops below run on uint8 tensors
    strong = set(strong_ops) if kind == "strong" else set()
    if "color_jitter" in strong:
        ops.append(v2.ColorJitter(*STRONG_COLOR_JITTER))
    if (kind != "strong" and randaugment) or "randaugment" in strong:
        ops.append(AlbefRandAugment())
    if "blur" in strong:
        ops.append(v2.GaussianBlur(blur_kernel_size(image_size), sigma=STRONG_BLUR_SIGMA))
    return v2.Compose([*ops, *_to_normalised_tensor()])


class MultiView:
    """Apply several named transforms to the same image and return a dict of views.

    Example: ``MultiView({"image": build_transform("pretrain", 32),
    "image_strong": build_transform("strong", 32)})``. Each view draws its own randomness, so
    the strong view is an independent augmentation of the same source image.
    """

    def __init__(self, views: Mapping[str, ImageTransform]) -> None:
        """Args: views: output key -> transform; must include ``"image"`` (the standard view)."""
        if "image" not in views:
            raise ValueError(f"MultiView needs an 'image' view, got keys {sorted(views)}")
        self.views = dict(views)

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """Return ``{name: transform(image)}`` for every view."""
        return {name: transform(image) for name, transform in self.views.items()}

    def __repr__(self) -> str:
        """The view names."""
        return f"MultiView({sorted(self.views)})"


def build_multiview(
    image_size: int,
    hflip: bool = True,
    crop_scale: tuple[float, float] | None = None,
    randaugment: bool = True,
    strong_ops: Sequence[str] = STRONG_OPS,
) -> MultiView:
    """The method's two views: ALBEF's pre-training view ``image`` and the strong view
    ``image_strong`` (teacher and student inputs under multi-modal data augmentation)."""
    return MultiView(
        {
            "image": build_transform(
                "pretrain", image_size, hflip=hflip, crop_scale=crop_scale, randaugment=randaugment
            ),
            "image_strong": build_transform(
                "strong", image_size, hflip=hflip, crop_scale=crop_scale, strong_ops=strong_ops
            ),
        }
    )
