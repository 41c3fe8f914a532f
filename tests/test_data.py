"""Reading folders and CSVs, splitting, and decoding awkward image files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import headstart
from conftest import CATS_DOGS_TINY, FLOWERS_TINY, ODD_FILES, write_image
from headstart.data import load_dataset, load_image, scan_folder, split_records
from headstart.errors import ConfigError, DataError, UnreadableImageError


def truncated_jpeg(path: Path) -> Path:
    data = (CATS_DOGS_TINY / "train" / "cats" / "cat.1.jpg").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def colour_folders(root: Path, n_per_class: int = 6) -> Path:
    for label, colour in {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}.items():
        for i in range(n_per_class):
            write_image(root / label / f"{label}_{i}.png", colour)
    return root


@pytest.mark.parametrize("path", sorted(ODD_FILES.iterdir()), ids=lambda p: p.name)
def test_odd_files_decode_to_rgb(path: Path) -> None:
    image = load_image(path)
    assert image.mode == "RGB" and min(image.size) > 0


def test_truncated_jpeg_is_reported_not_fatal(tmp_path: Path) -> None:
    with pytest.raises(UnreadableImageError, match="truncated"):
        load_image(truncated_jpeg(tmp_path / "half.jpg"))


def test_training_skips_and_lists_bad_files(tmp_path: Path) -> None:
    data = colour_folders(tmp_path / "data")
    truncated_jpeg(data / "red" / "half.jpg")
    (data / "green" / "empty.png").write_bytes(b"")
    (data / "blue" / "text.jpg").write_text("this is not an image")
    (data / "blue" / "notes.txt").write_text("notes")
    (data / "red" / ".hidden.png").write_bytes(b"junk")
    model = headstart.train(data, cache_dir=tmp_path / "cache", val_split=0.34)
    reasons = {s.path.name: s.reason for s in model.summary.skipped}
    assert set(reasons) == {"half.jpg", "empty.png", "text.jpg", "notes.txt"}
    assert "truncated" in reasons["half.jpg"]
    assert "not an image file" in reasons["notes.txt"]
    assert model.summary.validation.accuracy == 1.0  # three plain colours


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    wide = Image.new("RGB", (60, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    wide.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (20, 60)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16", "1"])
def test_every_pixel_mode_becomes_rgb(tmp_path: Path, mode: str) -> None:
    base = Image.new("RGB", (32, 24), (200, 100, 50))
    image = base.convert(mode) if mode != "I;16" else Image.fromarray(np.full((24, 32), 40000, np.uint16))
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    image.save(path)
    decoded = load_image(path)
    assert decoded.mode == "RGB" and decoded.size == (32, 24)


def test_avif_photos_are_found_and_read(tmp_path: Path) -> None:
    (tmp_path / "cats").mkdir()
    Image.new("RGB", (40, 30), (200, 100, 50)).save(tmp_path / "cats" / "phone.avif")
    [record], skipped = scan_folder(tmp_path)
    assert not skipped and load_image(record.path).size == (40, 30)


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (20, 20), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    r, g, b = load_image(tmp_path / "anim.gif").getpixel((5, 5))
    assert r > 200 and b < 50


def test_split_is_stratified_and_seeded(tmp_path: Path) -> None:
    data = colour_folders(tmp_path, n_per_class=10)
    a, b, c = (load_dataset(data, val_split=0.2, seed=s) for s in (0, 0, 1))
    assert [r.path for r in a.val] == [r.path for r in b.val]
    assert [r.path for r in a.val] != [r.path for r in c.val]
    assert {label: sum(r.label == label for r in a.val) for label in a.classes} == {"blue": 2, "green": 2, "red": 2}
    assert not {r.path for r in a.train} & {r.path for r in a.val}
    assert len(a.train) + len(a.val) == 30


def test_existing_train_val_folders_are_used_as_the_split() -> None:
    dataset = load_dataset(CATS_DOGS_TINY)
    assert (len(dataset.train), len(dataset.val)) == (40, 20)
    assert all("/val/" in str(r.path) for r in dataset.val)


def test_csv_of_path_and_label(tmp_path: Path) -> None:
    images = sorted(FLOWERS_TINY.glob("*/*"))
    rows = ["path,label"] + [f"{p},{p.parent.name}" for p in images] + ["missing.jpg,daisy"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    dataset = load_dataset(tmp_path / "labels.csv", val_split=0.25)
    assert dataset.classes == sorted(p.name for p in FLOWERS_TINY.iterdir())
    assert len(dataset.train) + len(dataset.val) == len(images)
    assert [s.path.name for s in dataset.skipped] == ["missing.jpg"]


def test_class_with_too_few_images_is_named(tmp_path: Path) -> None:
    data = colour_folders(tmp_path)
    for extra in list((data / "blue").iterdir())[1:]:
        extra.unlink()
    with pytest.raises(DataError, match="Class 'blue' has 1 usable image"):
        load_dataset(data)


def test_clear_errors_for_unusable_sources(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="found no images"):
        load_dataset(tmp_path / "empty")
    write_image(tmp_path / "one" / "only" / "x.png", (1, 2, 3))
    write_image(tmp_path / "one" / "only" / "y.png", (1, 2, 3))
    with pytest.raises(DataError, match="single class"):
        load_dataset(tmp_path / "one")
    with pytest.raises(ConfigError, match="val_split"):
        load_dataset(FLOWERS_TINY, val_split=1.5)


def test_split_records_without_validation_keeps_everything(tmp_path: Path) -> None:
    records = load_dataset(colour_folders(tmp_path), val_split=0.0).train
    train, val = split_records(records, 0.0, seed=0)
    assert val == [] and len(train) == 18


def test_png_bytes_in_memory_roundtrip(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("P", (16, 16)).save(buffer, "PNG", transparency=0)
    (tmp_path / "p.png").write_bytes(buffer.getvalue())
    assert load_image(tmp_path / "p.png").getpixel((0, 0)) == (255, 255, 255)
