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
from headstart.transforms import resize_and_crop

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


def class_activation_maps(model: Model, images: list[Image.Image], class_indices: list[int]) -> list[list[NDArray[np.float32]]]:
    """Grad-CAM of each image for its class, one map per backbone (member order): float32 arrays of shape (h, w) in [0, 1].

    Backbone m's map is weighted by the gradient of the class score with respect to
    m's slice of the (concatenated) features; a single-backbone model has one map.
    When a backbone's ONNX engine gives the feature map whose spatial mean is its
    features, that gradient is the same at every position of the map (the head's
    gradient at the features over h*w), so its Grad-CAM needs only the map and the
    head: no PyTorch. Otherwise it runs `grad_cam` in PyTorch, the other backbones'
    features held fixed.
    """
    offsets = np.cumsum([0] + [b.n_features for b in model.backbones])
    cams = []
    for image, index in zip(images, class_indices, strict=True):
        inputs = [x[None] for x in model.inputs(image)]
        maps = [e.feature_maps(x) if isinstance(e, OnnxEngine) and e.mean_pooled else None for e, x in zip(model.engines, inputs)]
        if len(maps) == 1 and maps[0] is None:  # one backbone, in PyTorch: `grad_cam` needs nothing else
            import torch

            cams.append([grad_cam(model.backbones[0], torch.from_numpy(inputs[0]), index, model.head.to_torch())])
            continue
        features = np.concatenate([m.mean((2, 3)) if m is not None else e(x) for m, e, x in zip(maps, model.engines, inputs)], axis=1)
        gradient = model.head.logit_gradient(features, index)[0]
        per_backbone = []
        for k, (backbone, member_maps) in enumerate(zip(model.backbones, maps, strict=True)):
            start, stop = int(offsets[k]), int(offsets[k + 1])
            if member_maps is not None:
                cam = np.maximum(np.einsum("c,chw->hw", gradient[start:stop], member_maps[0]), 0)
                peak = float(cam.max())
                per_backbone.append((cam / peak if peak > 0 else cam).astype(np.float32))
            else:
                import torch

                context = (features[:, :start], features[:, stop:])
                per_backbone.append(grad_cam(backbone, torch.from_numpy(inputs[k]), index, model.head.to_torch(), context))
        cams.append(per_backbone)
    return cams


def grad_cam_overlays(model: Model, images: list[Image.Image], class_indices: list[int]) -> list[list[Image.Image]]:
    """Each image as each backbone sees it (resized, centre-cropped), that backbone's Grad-CAM for its class blended over it.

    One list per image, one overlay per backbone (member order).
    """
    cams = class_activation_maps(model, images, class_indices)
    return [
        [overlay(resize_and_crop(image, cfg), cam) for cfg, cam in zip(model.data_configs, per_backbone, strict=True)]
        for image, per_backbone in zip(images, cams, strict=True)
    ]


def grad_cam(
    backbone: Backbone,
    batch: torch.Tensor,
    class_index: int,
    head: nn.Module | None = None,
    context: tuple[NDArray[np.float32], NDArray[np.float32]] | None = None,
) -> NDArray[np.float32]:
    """Grad-CAM of one image for one class: float32 array of shape (h, w) in [0, 1].

    The gradient of the class score with respect to the backbone's last feature map
    (or the `layer` stage's), averaged per channel, weights that map's channels.

    Args:
        backbone: frozen or fine-tuned.
        batch: one preprocessed image, shape (1, 3, H, W).
        class_index: column of the classifier's output to explain.
        head: a headstart head on the pooled features; None explains the
            backbone's own ImageNet classifier.
        context: for a member of an ensemble, the other backbones' features of the image
            before and after this one's, shapes (1, n_before) and (1, n_after): the head
            sees them concatenated around this backbone's, held fixed.
    """
    import torch

    if head is None and not backbone.has_imagenet_head:
        raise BackboneWeightsError(f"Backbone '{backbone.name}' has no ImageNet classifier to explain.")
    with torch.inference_mode():
        maps = backbone.feature_map(batch)
    with torch.enable_grad():
        maps = maps.clone().requires_grad_(True)
        if head is None:
            logits = backbone.module.forward_head(maps)  # type: ignore[operator]
        else:
            pooled = backbone.pool(maps)
            if context is not None:
                pooled = torch.cat(
                    [torch.from_numpy(np.ascontiguousarray(context[0])), pooled, torch.from_numpy(np.ascontiguousarray(context[1]))], 1
                )
            logits = head(pooled)
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
