"""`--strategy auto`: pick the recipe from the dataset's size and its similarity to ImageNet."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from headstart.backbone import Backbone
from headstart.classifier import HeadClassifier

LARGE_PER_CLASS = 200
"""From this many training images per class on, fine-tuning pays for its cost."""
SIMILAR_CONFIDENCE = 0.3
"""Mean top-1 ImageNet probability at or above which photos count as ImageNet-like."""
PROBE_MARGIN = 0.7
"""An earlier-layer probe whose loss is below this fraction of the final-layer probe's marks data unlike ImageNet."""
EARLIER_LAYER = -2
"""The stage whose pooled output serves data unlike ImageNet."""


@dataclass(frozen=True)
class Choice:
    """What `auto` picked, what it measured, and why, in one line."""

    strategy: Literal["linear", "finetune"]
    layer: int | None
    unfreeze: int | None
    reason: str
    measurements: dict[str, float]


@dataclass(frozen=True)
class ProbeData:
    """Features of the same images through one backbone layer, split for a quick linear probe."""

    X_train: NDArray[np.float32]
    y_train: NDArray[Any]
    X_val: NDArray[np.float32]
    y_val: NDArray[Any]


def imagenet_confidence(backbone: Backbone, features: NDArray[np.float32]) -> float:
    """Mean top-1 probability of the backbone's own ImageNet classifier on pooled final features."""
    import torch

    classifier = backbone.module.get_classifier()  # type: ignore[operator]
    with torch.inference_mode():
        proba = classifier(torch.from_numpy(features)).softmax(1)
    return float(proba.max(1).values.mean())


def probe_loss(data: ProbeData, seed: int) -> float:
    """Validation log loss of a linear head fitted on the training features."""
    from headstart.calibration import negative_log_likelihood

    head = HeadClassifier(random_state=seed).fit(data.X_train, data.y_train).head_
    return negative_log_likelihood(head.logits(data.X_val), np.searchsorted(head.classes, data.y_val))


def choose(n_train: int, n_classes: int, confidence: float | None, final_loss: float, earlier_loss: float) -> Choice:
    """The recipe for a dataset of `n_train` images in `n_classes` classes, given similarity measurements.

    ImageNet-like means the backbone's own classifier is confident on the photos
    (when it has one), and a linear probe on an earlier stage's features is not
    clearly better (loss below `PROBE_MARGIN` times the final features' probe loss)
    than one on the final features.
    """
    per_class = n_train / n_classes
    large = per_class >= LARGE_PER_CLASS
    confident = confidence is None or confidence >= SIMILAR_CONFIDENCE
    similar = confident and earlier_loss >= PROBE_MARGIN * final_loss
    size = f"{n_train} training images (~{per_class:.0f} per class: {'large' if large else 'small'})"
    evidence = (
        (f"ImageNet confidence {confidence:.2f}, " if confidence is not None else "")
        + f"probe loss final {final_loss:.3f} vs earlier layer {earlier_loss:.3f}: "
        + ("similar to ImageNet" if similar else "unlike ImageNet")
    )
    measurements = {"n_train": float(n_train), "final_probe_loss": final_loss, "earlier_probe_loss": earlier_loss}
    if confidence is not None:
        measurements["imagenet_confidence"] = confidence
    if not large and similar:
        return Choice("linear", None, None, f"linear head on final features: {size}, {evidence}", measurements)
    if not large:
        return Choice("linear", EARLIER_LAYER, None, f"linear head on earlier-layer features: {size}, {evidence}", measurements)
    if similar:
        return Choice("finetune", None, 2, f"fine-tune the top 2 blocks: {size}, {evidence}", measurements)
    return Choice("finetune", None, None, f"fine-tune all blocks: {size}, {evidence}", measurements)
