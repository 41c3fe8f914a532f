"""Training-time augmentation: random crops, flips, affine warps and colour jitter.

Every random draw comes from a `numpy.random.Generator` passed in, so an epoch's
augmentations are reproducible whatever order the decoding threads run in.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from headstart.config import DataConfig
from headstart.data import load_image
from headstart.errors import ConfigError
from headstart.transforms import resize_and_crop, to_array

_FILL = [127, 127, 127]  # mid grey: about zero after normalisation


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random changes made to each training image (all off by default).

    Attributes:
        hflip, vflip: flip left-right / upside-down with probability 0.5.
        rotation: maximum rotation, degrees either way.
        crop_scale: (min, max) fraction of the image area kept by a random resized
            crop (aspect ratio 3/4 to 4/3); (1, 1) keeps the evaluation centre crop.
        shift: maximum translation, as a fraction of the side.
        shear: maximum shear, degrees.
        zoom: maximum zoom in or out (scale drawn from [1 - zoom, 1 + zoom]).
        brightness, contrast, saturation: maximum relative change (factor in [1 - x, 1 + x]).
        hue: maximum hue shift, in [0, 0.5].
    """

    hflip: bool = False
    vflip: bool = False
    rotation: float = 0.0
    crop_scale: tuple[float, float] = (1.0, 1.0)
    shift: float = 0.0
    shear: float = 0.0
    zoom: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0

    def __post_init__(self) -> None:
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ConfigError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}.")
        for name in ("rotation", "shift", "shear", "zoom", "brightness", "contrast", "saturation", "hue"):
            if getattr(self, name) < 0:
                raise ConfigError(f"Augmentation '{name}' must be >= 0, got {getattr(self, name)}.")
        if self.zoom >= 1 or self.hue > 0.5 or self.shift >= 1:
            raise ConfigError("Augmentation zoom and shift must be < 1, and hue <= 0.5.")

    @property
    def is_identity(self) -> bool:
        return self == AugmentConfig()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AugmentConfig:
        return cls(**{**d, "crop_scale": tuple(d.get("crop_scale", (1.0, 1.0)))})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> AugmentConfig:
        """A named preset ("none", "light", "strong") with some fields overridden."""
        if name not in AUGMENT_PRESETS:
            raise ConfigError(f"Unknown augmentation '{name}'. Choose one of: {', '.join(AUGMENT_PRESETS)}.")
        return replace(AUGMENT_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


AUGMENT_PRESETS = {
    "none": AugmentConfig(),
    "light": AugmentConfig(hflip=True, rotation=10, crop_scale=(0.6, 1.0), brightness=0.1, contrast=0.1),
    "strong": AugmentConfig(
        hflip=True, rotation=20, crop_scale=(0.35, 1.0), shift=0.1, shear=10, zoom=0.1,
        brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03,
    ),
}  # fmt: skip


def augment(image: Image.Image, aug: AugmentConfig, cfg: DataConfig, rng: np.random.Generator) -> Image.Image:
    """A randomly changed `cfg.input_size` square crop of an RGB image."""
    from torchvision.transforms import InterpolationMode  # torchvision is imported only when augmenting
    from torchvision.transforms.v2 import functional as F

    image = _crop(image, aug, cfg, rng)
    if aug.hflip and rng.random() < 0.5:
        image = F.horizontal_flip(image)
    if aug.vflip and rng.random() < 0.5:
        image = F.vertical_flip(image)
    if aug.rotation or aug.shift or aug.shear or aug.zoom:
        side = cfg.input_size
        image = F.affine(
            image,
            angle=float(rng.uniform(-aug.rotation, aug.rotation)),
            translate=[int(round(rng.uniform(-aug.shift, aug.shift) * side)) for _ in range(2)],
            scale=float(rng.uniform(1 - aug.zoom, 1 + aug.zoom)),
            shear=[float(rng.uniform(-aug.shear, aug.shear)), 0.0],
            interpolation=InterpolationMode.BILINEAR,
            fill=_FILL,
        )
    if aug.brightness:
        image = F.adjust_brightness(image, float(rng.uniform(1 - aug.brightness, 1 + aug.brightness)))
    if aug.contrast:
        image = F.adjust_contrast(image, float(rng.uniform(1 - aug.contrast, 1 + aug.contrast)))
    if aug.saturation:
        image = F.adjust_saturation(image, float(rng.uniform(1 - aug.saturation, 1 + aug.saturation)))
    if aug.hue:
        image = F.adjust_hue(image, float(rng.uniform(-aug.hue, aug.hue)))
    return image


def augmented_input(path: Path, aug: AugmentConfig, cfg: DataConfig, rng: np.random.Generator) -> NDArray[np.float32]:
    """Decode, augment and normalise one training image: float32 array of shape (3, H, W)."""
    return to_array(augment(load_image(path), aug, cfg, rng), cfg)


def _crop(image: Image.Image, aug: AugmentConfig, cfg: DataConfig, rng: np.random.Generator) -> Image.Image:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    if aug.crop_scale == (1.0, 1.0):
        return resize_and_crop(image, cfg)
    width, height = image.size
    for _ in range(10):
        area = width * height * rng.uniform(*aug.crop_scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            size = [cfg.input_size, cfg.input_size]
            cropped: Image.Image = F.resized_crop(
                image, top, left, h, w, size, interpolation=InterpolationMode(cfg.interpolation), antialias=True
            )
            return cropped
    return resize_and_crop(image, cfg)
