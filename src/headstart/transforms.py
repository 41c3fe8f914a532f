"""Evaluation preprocessing in Pillow and NumPy: resize, centre crop, normalise."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from headstart.config import DataConfig

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def resize_and_crop(image: Image.Image, cfg: DataConfig) -> Image.Image:
    """Resize the short side to `cfg.resize_size`, then crop the centre `cfg.input_size` square.

    Matches timm's eval transform (torchvision `Resize` + `CenterCrop`) pixel for pixel.
    """
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = cfg.resize_size, int(cfg.resize_size * long / short)
    size = (new_short, new_long) if width <= height else (new_long, new_short)
    if size != image.size:
        image = image.resize(size, _RESAMPLE[cfg.interpolation])
    left = int(round((size[0] - cfg.input_size) / 2.0))
    top = int(round((size[1] - cfg.input_size) / 2.0))
    return image.crop((left, top, left + cfg.input_size, top + cfg.input_size))


def to_array(image: Image.Image, cfg: DataConfig) -> NDArray[np.float32]:
    """Normalise an RGB image to a float32 array of shape (3, H, W)."""
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))


def preprocess(image: Image.Image, cfg: DataConfig) -> NDArray[np.float32]:
    """An RGB image as the backbone's input: float32 array of shape (3, input_size, input_size)."""
    return to_array(resize_and_crop(image, cfg), cfg)
