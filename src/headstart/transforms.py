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


def crop_pixels(image: Image.Image, cfg: DataConfig) -> NDArray[np.uint8]:
    """`resize_and_crop` as uint8 pixels of shape (input_size, input_size, 3)."""
    return np.asarray(resize_and_crop(image, cfg), dtype=np.uint8)


def normalize(pixels: NDArray[np.uint8], cfg: DataConfig) -> NDArray[np.float32]:
    """uint8 RGB pixels (..., H, W, 3) to normalised float32 channels-first (..., 3, H, W)."""
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    scaled = (pixels.astype(np.float32) / 255.0 - mean) / std
    return np.ascontiguousarray(np.moveaxis(scaled, -1, -3))


def to_array(image: Image.Image, cfg: DataConfig) -> NDArray[np.float32]:
    """Normalise an RGB image to a float32 array of shape (3, H, W)."""
    return normalize(np.asarray(image, dtype=np.uint8), cfg)


def preprocess(image: Image.Image, cfg: DataConfig) -> NDArray[np.float32]:
    """An RGB image as the backbone's input: float32 array of shape (3, input_size, input_size)."""
    return to_array(resize_and_crop(image, cfg), cfg)
