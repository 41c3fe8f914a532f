"""Where the network looks: Grad-CAM heatmaps and intermediate feature maps."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from headstart.backbone import Backbone
from headstart.data import Skipped
from headstart.engine import OnnxEngine
from headstart.errors import BackboneWeightsError
from headstart.transforms import preprocess, resize_and_crop

if TYPE_CHECKING:
    import torch
    from torch import nn

    from headstart.model import Model

MAX_NAME_BYTES = 200  # under the usual NAME_MAX of 255 bytes, leaving room for the temporary name of an atomic write


@dataclass(frozen=True)
class Explanations:
    """The heatmap PNGs written, one per readable image, and the images skipped with the reason."""

    written: list[Path]
    skipped: list[Skipped]


def existing_names(folder: Path) -> set[str]:
    """The names in `folder`, case-folded, for `output_name` to avoid: a user's file is never written over."""
    return {name.casefold() for name in os.listdir(folder)} if folder.is_dir() else set()


def output_name(stem: str, suffix: str, taken: set[str]) -> str:
    """`{stem}{suffix}`, or `{stem}_2{suffix}`, `_3`, ... when that name is `taken` (compared case-insensitively; it joins `taken`).

    The stem is shortened, a whole character at a time, to keep the name within MAX_NAME_BYTES.
    """
    n = 1
    while True:
        tail = suffix if n == 1 else f"_{n}{suffix}"
        short = stem
        while short and len(os.fsencode(short + tail)) > MAX_NAME_BYTES:
            short = short[:-1]
        if (short + tail).casefold() not in taken:
            taken.add((short + tail).casefold())
            return short + tail
        n += 1


def class_activation_maps(model: Model, images: list[Image.Image], class_indices: list[int]) -> list[NDArray[np.float32]]:
    """Grad-CAM of each image for its class: float32 arrays of shape (h, w) in [0, 1].

    When the model's ONNX engine gives the feature map whose spatial mean is the
    features, the gradient of the class score with respect to the map is the
    same at every position (the head's gradient at the features over h*w), so
    Grad-CAM needs only the map and the head: no PyTorch. Otherwise it runs
    `grad_cam` in PyTorch.
    """
    engine = model.engine
    cfg = model.backbone.data_config
    cams = []
    for image, index in zip(images, class_indices, strict=True):
        batch = preprocess(image, cfg)[None]
        if isinstance(engine, OnnxEngine) and engine.mean_pooled:
            maps = engine.feature_maps(batch)
            weights = model.head.logit_gradient(maps.mean((2, 3)), index)[0]
            cam = np.maximum(np.einsum("c,chw->hw", weights, maps[0]), 0)
            peak = float(cam.max())
            cams.append((cam / peak if peak > 0 else cam).astype(np.float32))
        else:
            import torch

            cams.append(grad_cam(model.backbone, torch.from_numpy(batch), index, model.head.to_torch()))
    return cams


def grad_cam_overlays(model: Model, images: list[Image.Image], class_indices: list[int]) -> list[Image.Image]:
    """Each image as the backbone sees it (resized, centre-cropped), its Grad-CAM for its class blended over it."""
    cfg = model.backbone.data_config
    cams = class_activation_maps(model, images, class_indices)
    return [overlay(resize_and_crop(image, cfg), cam) for image, cam in zip(images, cams, strict=True)]


def grad_cam(backbone: Backbone, batch: torch.Tensor, class_index: int, head: nn.Module | None = None) -> NDArray[np.float32]:
    """Grad-CAM of one image for one class: float32 array of shape (h, w) in [0, 1].

    The gradient of the class score with respect to the backbone's last feature map
    (or the `layer` stage's), averaged per channel, weights that map's channels.

    Args:
        backbone: frozen or fine-tuned.
        batch: one preprocessed image, shape (1, 3, H, W).
        class_index: column of the classifier's output to explain.
        head: a headstart head on the pooled features; None explains the
            backbone's own ImageNet classifier.
    """
    import torch

    if head is None and not backbone.has_imagenet_head:
        raise BackboneWeightsError(f"Backbone '{backbone.name}' has no ImageNet classifier to explain.")
    with torch.inference_mode():
        maps = backbone.feature_map(batch)
    with torch.enable_grad():
        maps = maps.clone().requires_grad_(True)
        logits = head(backbone.pool(maps)) if head is not None else backbone.module.forward_head(maps)  # type: ignore[operator]
        (gradients,) = torch.autograd.grad(logits[0, class_index], maps)
    weights = gradients.mean((2, 3), keepdim=True)
    cam = torch.relu((weights * maps.detach()).sum(1))[0]
    peak = float(cam.max())
    return (cam / peak if peak > 0 else cam).numpy().astype(np.float32)


def overlay(image: Image.Image, cam: NDArray[np.float32], alpha: float = 0.45) -> Image.Image:
    """The heatmap, upsampled and coloured (jet), blended over the image."""
    from matplotlib import colormaps

    heat = Image.fromarray((cam * 255).astype(np.uint8)).resize(image.size, Image.Resampling.BILINEAR)
    coloured = (colormaps["jet"](np.asarray(heat) / 255.0)[..., :3] * 255).astype(np.uint8)
    return Image.blend(image.convert("RGB"), Image.fromarray(coloured), alpha)


def upsampled(cam: NDArray[np.float32], size: tuple[int, int]) -> NDArray[np.float32]:
    """The heatmap resized to (width, height) pixels, bilinear."""
    return np.asarray(Image.fromarray(cam, mode="F").resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def stage_activations(backbone: Backbone, batch: torch.Tensor, n_channels: int = 8) -> list[list[NDArray[np.float32]]]:
    """For each stage, the first `n_channels` feature maps of one image, each scaled to [0, 1]."""
    rows = []
    for maps in backbone.stage_maps(batch):
        row = []
        for channel in maps[0, :n_channels].numpy():
            low, high = float(channel.min()), float(channel.max())
            row.append(((channel - low) / (high - low) if high > low else np.zeros_like(channel)).astype(np.float32))
        rows.append(row)
    return rows
