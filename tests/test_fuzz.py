"""Fuzzing the image loader with mutated real JPEG and PNG bytes: every file decodes or is cleanly skipped, in bounded time.

CI runs a bounded number of examples; for a longer run set HEADSTART_FUZZ_EXAMPLES
(docs/fuzzing.md).
"""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import CATS_DOGS_TINY, ODD_FILES
from headstart import data
from headstart.data import load_image
from headstart.errors import UnreadableImageError

EXAMPLES = int(os.environ.get("HEADSTART_FUZZ_EXAMPLES", "1000"))


def _small_png() -> bytes:
    buffer = io.BytesIO()
    Image.open(ODD_FILES / "rgba_horse.png").resize((40, 30)).save(buffer, "PNG")
    return buffer.getvalue()


SEEDS = {  # real files to mutate
    "jpeg": (CATS_DOGS_TINY / "train" / "cats" / "cat.1.jpg").read_bytes(),
    "png": (ODD_FILES / "cat_chelsea.png").read_bytes(),
    "gif": (ODD_FILES / "ant_imageNotFound.gif").read_bytes(),
    "small png with alpha": _small_png(),
}


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "duplicate", "zero"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 256))]
        elif kind == "duplicate":
            data[at:at] = data[at : at + draw(st.integers(1, 512))]
        elif kind == "zero":
            data[at : at + 16] = bytes(len(data[at : at + 16]))
    return bytes(data)


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(payload=mutated())
def test_mutated_images_decode_or_skip_cleanly(payload: bytes, tmp_path: Path) -> None:
    path = tmp_path / "fuzz.img"
    path.write_bytes(payload)
    started = time.monotonic()
    try:
        image = load_image(path, min_size=512)
        assert image.mode == "RGB" and min(image.size) >= data.MIN_SIDE
        event("decoded")
    except UnreadableImageError as e:
        assert e.path == path and e.reason
        event("skipped: " + re.split(r"[(:\d]", e.reason)[0].strip())  # tallied by --hypothesis-show-statistics
    assert time.monotonic() - started < data.DECODE_SECONDS + 2  # no hang: the loader's own time limit holds


def test_decoding_that_takes_too_long_is_cut_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.effect_noise((3000, 3000), 64).save(path)
    monkeypatch.setattr(data, "DECODE_SECONDS", 0.001)
    with pytest.raises(UnreadableImageError, match="longer than"):
        load_image(path)
