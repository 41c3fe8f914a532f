"""The offline backbones load the real ImageNet weights and recognise real photos."""

from __future__ import annotations

import pytest

import headstart
from conftest import PHOTOS
from headstart.backbone import imagenet_class_names

NAMES = imagenet_class_names()
CATS = {NAMES[281], NAMES[282], NAMES[285]}  # tabby, tiger cat, Egyptian cat


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_pretrained_backbone_recognises_cat_and_espresso(backbone: str) -> None:
    result = headstart.imagenet([PHOTOS / "sk_chelsea.png", PHOTOS / "sk_coffee.png"], backbone=backbone, top_k=3)
    cat, coffee = result.predictions
    assert {label for label, _ in cat.top_k} <= CATS
    assert coffee.label == NAMES[967] == "espresso"
    assert result.skipped == []


def test_class_names_are_the_imagenet_1k_list() -> None:
    assert len(NAMES) == 1000
    assert NAMES[281].startswith("tabby")
