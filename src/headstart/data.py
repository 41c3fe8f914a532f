"""Image folders and CSVs in, labelled records and RGB images out."""

from __future__ import annotations

import csv
import io
import os
import signal
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeVar

from headstart.errors import ConfigError, DataError, FileRefusedError, UnreadableImageError
from headstart.files import display, open_regular, read_csv_cell, read_regular, visible_files

if TYPE_CHECKING:  # NumPy and Pillow are imported where images are split or decoded, so listing a folder stays light
    from PIL import Image

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".avif", ".tif", ".tiff", ".ppm", ".pgm"})
HEIC_EXTENSIONS = frozenset({".heic", ".heif"})  # iPhone photos; Pillow cannot read them
VAL_FOLDER_NAMES = ("val", "validation")
MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb threshold (a 0.25 GB RGB image); larger files are refused
MIN_SIDE = 16  # images smaller than this on either side (icons, tracking pixels) are refused
MAX_ASPECT_RATIO = 100  # long side / short side beyond which an image is refused: resizing a 16 x 5,000,000 strip asks for ~80 GB
MAX_FILE_BYTES = 1 << 30  # image files larger than 1 GiB are refused unread (no photo is this large; a file that is may not end)
MAX_CSV_BYTES = 1 << 28  # a path,label CSV larger than 256 MiB (several million rows) is refused
DECODE_SECONDS = 20.0  # a file that takes longer to decode is refused (crafted files can make decoders crawl)
MAX_JPEG_SCANS = 100  # encoders write 1 to ~20; a file repeating a scan thousands of times decodes for hours (a scan bomb)
MAX_SCAN_PIXELS = 2_000_000_000  # scans x pixels: a decoder passes over every pixel once a scan (~1 s of decoding at most)


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image file."""

    path: Path
    label: str


@dataclass(frozen=True)
class Skipped:
    """A file left out, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Dataset:
    """Records split into training and validation, with the class names in order."""

    train: list[ImageRecord]
    val: list[ImageRecord]
    classes: list[str]
    skipped: list[Skipped] = field(default_factory=list)

    def drop(self, skipped: list[Skipped]) -> Dataset:
        """The same dataset without the given files; those it held join `skipped`."""
        present = {r.path for r in self.train + self.val}
        skipped = [s for s in skipped if s.path in present]
        bad = {s.path for s in skipped}
        return Dataset(
            train=[r for r in self.train if r.path not in bad],
            val=[r for r in self.val if r.path not in bad],
            classes=self.classes,
            skipped=self.skipped + skipped,
        )


def load_dataset(source: str | os.PathLike[str], val_split: float = 0.2, seed: int = 0) -> Dataset:
    """Read a class-folder tree, a tree with train/ and val/ splits, or a `path,label` CSV.

    Args:
        source: folder or CSV file.
        val_split: fraction of each class held out for validation (ignored when
            the folder already has train/ and val/); 0 keeps everything for training.
        seed: seed of the stratified split.

    Raises:
        DataError: the source is missing, has no images, or a class has too few.
    """
    root = Path(source).expanduser()
    check_val_split(val_split)
    records, val, skipped = read_source(root)
    return split_dataset(root, records, val, skipped, val_split, seed)


def check_val_split(val_split: float) -> None:
    """Raise ConfigError unless 0 <= `val_split` < 1."""
    if not 0.0 <= val_split < 1.0:
        raise ConfigError(f"val_split must be in [0, 1), got {val_split}.")


def split_dataset(
    root: Path,
    records: list[ImageRecord],
    presplit_val: list[ImageRecord] | None,
    skipped: list[Skipped],
    val_split: float,
    seed: int,
    unusable: Sequence[Skipped] = (),
) -> Dataset:
    """Leave out the `unusable` files, split the rest (unless the source has its own validation split) and check every class.

    Unusable files are dropped before the split, as `triage` does, so `check` and `train` agree.

    Raises:
        DataError: no usable images, or a class has too few.
    """
    bad = {s.path for s in unusable}
    records = [r for r in records if r.path not in bad]
    if presplit_val is None:
        train, val = split_records(records, val_split, seed)
    else:
        train, val = records, [r for r in presplit_val if r.path not in bad]
    check_layout(root, train)
    classes = sorted({r.label for r in train})
    check_class_counts(train, val, classes, min_val=1 if val_split > 0 else 0)
    return Dataset(train=train, val=val, classes=classes, skipped=skipped + list(unusable))


def check_layout(root: Path, train: list[ImageRecord]) -> None:
    """Raise DataError when the training images cannot train however few are skipped: none at all, or a single class."""
    classes = sorted({r.label for r in train})
    if not classes:
        raise DataError(f"{root}: found no images. Put each class's images in its own sub-folder (e.g. {root}/cats/*.jpg).")
    check_class_counts(train, [], classes, min_val=0)


def read_source(root: Path) -> tuple[list[ImageRecord], list[ImageRecord] | None, list[Skipped]]:
    """The labelled images of a CSV or folder tree, its own validation split if it has one (else None), and the files left out.

    Raises:
        DataError: `root` does not exist, is an image, or is a CSV that cannot be read.
        FileRefusedError: `root` is a special file (a FIFO, a device) or a CSV over `MAX_CSV_BYTES`.
    """
    if not root.exists():
        raise DataError(f"{root}: no such file or folder. Give a folder with one sub-folder per class, or a CSV of path,label.")
    if root.suffix.lower() in IMAGE_EXTENSIONS | HEIC_EXTENSIONS and not root.is_dir():
        raise DataError(f"{display(root)} is an image; give the folder that holds one sub-folder per class, or a CSV of path,label.")
    if not root.is_dir():
        records, skipped = read_csv(root)
        return records, None, skipped
    val_dir = next((root / n for n in VAL_FOLDER_NAMES if (root / n).is_dir()), None)
    if (root / "train").is_dir() and val_dir is not None:
        train, skipped = scan_folder(root / "train")
        val, skipped_val = scan_folder(val_dir)
        return train, val, skipped + skipped_val
    records, skipped = scan_folder(root)
    return records, None, skipped


def check_class_counts(train: list[ImageRecord], val: list[ImageRecord], classes: list[str], min_val: int) -> None:
    """Raise DataError naming the first class that has too few images to train on."""
    n_train = Counter(r.label for r in train)
    n_val = Counter(r.label for r in val)
    orphans = sorted(set(n_val) - set(classes))
    if orphans:
        raise DataError(f"Class '{orphans[0]}' has validation images but no training images. Add training images for it or remove it.")
    if len(classes) < 2:
        raise DataError(f"Found a single class ({classes[0]!r}). A classifier needs at least two class folders.")
    for name in classes:
        if n_train[name] < 1 or (val and n_val[name] < min_val):
            raise DataError(
                f"Class '{name}' has {n_train[name] + n_val[name]} usable image(s): too few to train and validate. "
                "Add images to it (at least 2), or remove the folder."
            )


def scan_folder(root: Path) -> tuple[list[ImageRecord], list[Skipped]]:
    """List image files under each class sub-folder of `root` (recursively, hidden files ignored)."""
    records: list[ImageRecord] = []
    skipped: list[Skipped] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            if entry.suffix.lower() in IMAGE_EXTENSIONS:
                skipped.append(Skipped(entry, "image not inside a class folder"))
            continue
        for path in visible_files(entry):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                records.append(ImageRecord(path, entry.name))
            elif path.suffix.lower() in HEIC_EXTENSIONS:
                skipped.append(Skipped(path, "HEIC photo, which headstart cannot read"))
            else:
                skipped.append(Skipped(path, f"not an image file (extension '{path.suffix}')"))
    return records, skipped


def read_csv(path: Path) -> tuple[list[ImageRecord], list[Skipped]]:
    """Read `path,label` rows; relative paths are relative to the CSV's folder. A header row is optional.

    The text is UTF-8 (a byte-order mark is ignored); other bytes are kept as
    `surrogateescape` characters, as Python decodes file names, so a path in
    any encoding names the file the operating system has under those bytes.

    Raises:
        DataError: a row is not `path,label`, or the file is not CSV text.
        FileRefusedError: `path` is not a regular file, or is larger than `MAX_CSV_BYTES`.
    """
    text = read_regular(path, MAX_CSV_BYTES).decode("utf-8-sig", errors="surrogateescape")
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise DataError(f"{display(path)}, line {line}: NUL bytes, so not a text CSV (UTF-16?). Save it as UTF-8 CSV of path,label.")
    records: list[ImageRecord] = []
    skipped: list[Skipped] = []
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            i = reader.line_num
            if not row or (i == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]):
                continue
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise DataError(f"{display(path)}, line {i}: expected 'path,label', got {display(','.join(row))!r}.")
            image = Path(read_csv_cell(row[0].strip())).expanduser()
            image = image if image.is_absolute() else path.parent / image
            if image.exists():  # a special file is refused, with its reason, when it is read
                records.append(ImageRecord(image, read_csv_cell(row[1].strip())))
            else:
                skipped.append(Skipped(image, f"listed in {path.name} line {i} but not found"))
    except csv.Error as e:
        raise DataError(f"{display(path)}, line {reader.line_num}: {e}. Fix that row; the file must be a CSV of path,label.") from None
    return records, skipped


def split_records(records: list[ImageRecord], val_split: float, seed: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Stratified, seeded split: each class gives round(n * val_split) images (at least 1) to validation."""
    if val_split <= 0:
        return sorted(records, key=_key), []
    import numpy as np

    rng = np.random.default_rng(seed)
    train: list[ImageRecord] = []
    val: list[ImageRecord] = []
    for label in sorted({r.label for r in records}):
        members = sorted((r for r in records if r.label == label), key=_key)
        order = rng.permutation(len(members))
        n_val = min(max(1, round(len(members) * val_split)), len(members) - 1)
        val += [members[i] for i in order[:n_val]]
        train += [members[i] for i in order[n_val:]]
    return sorted(train, key=_key), sorted(val, key=_key)


def _key(record: ImageRecord) -> tuple[str, str]:
    return (record.label, str(record.path))


def open_image(file: BinaryIO) -> Image.Image:
    """`Image.open` without Pillow's warnings: headstart refuses decompression bombs itself, with a clear reason, and `check`
    reports broken EXIF."""
    from PIL import Image

    with pillow_warnings():  # a DecompressionBombWarning, broken EXIF read for the resolution
        return Image.open(file)


def list_images(inputs: list[str | os.PathLike[str]]) -> tuple[list[Path], list[Skipped]]:
    """Expand files and folders (recursively) into image paths, in the given order.

    A special file given by name (a FIFO, a device) is kept and refused, with its reason, when decoded.
    """
    paths: list[Path] = []
    skipped: list[Skipped] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            paths += [path for path in visible_files(p) if path.suffix.lower() in IMAGE_EXTENSIONS]
        elif p.exists():
            paths.append(p)
        else:
            skipped.append(Skipped(p, "no such file or folder"))
    return paths, skipped


def load_image(path: Path, min_size: int | None = None) -> Image.Image:
    """Decode an image as 8-bit RGB, upright per its EXIF orientation.

    Greyscale, palette, CMYK and 16-bit images are converted; transparency is
    composited over white; for animations the first frame is used. With
    `min_size`, a JPEG at least twice that size on its short side is decoded at
    1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, several times faster), keeping
    at least `min_size` pixels on the short side; this changes pixels slightly.

    Only a regular file of at most `MAX_FILE_BYTES` is opened (never a FIFO or
    device), and its header is checked against `MAX_PIXELS`, `MIN_SIDE` and
    `MAX_ASPECT_RATIO` before any pixel is decoded.

    Raises:
        UnreadableImageError: the file is not a decodable image (the reason says why).
    """
    return decode_image(path, lambda image: image, min_size)


_T = TypeVar("_T")


def size_problem(width: int, height: int) -> str | None:
    """Why an image of this size is refused (a decompression bomb, too small, too elongated), or None when it is not."""
    if width * height > MAX_PIXELS:
        return f"decompression bomb: {width}x{height} pixels, more than the {MAX_PIXELS:,} allowed"
    if min(width, height) < MIN_SIDE:
        return f"too small: {width}x{height} pixels, less than {MIN_SIDE} on a side"
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return f"extreme aspect ratio: {width}x{height} pixels, more elongated than {MAX_ASPECT_RATIO}:1"
    return None


def load_image_bytes(data: bytes, name: str = "upload", min_size: int | None = None) -> Image.Image:
    """`load_image` for an image held in memory (an upload, say), held to the same limits; `name` labels its errors.

    Raises:
        UnreadableImageError: the bytes are not a decodable image (the reason says why).
    """
    return decode_image(data, lambda image: image, min_size, name)


def decode_image(source: Path | bytes, convert: Callable[[Image.Image], _T], min_size: int | None = None, name: str = "upload") -> _T:
    """`convert(load_image(source, min_size))`, with `convert` (e.g. a resize) under the same time limit and error handling.

    `source` is a file, or an image's bytes (then `name` stands for its path in errors).

    Raises:
        UnreadableImageError: the file is not a decodable image, or decoding or
            converting it ran out of time or memory (the reason says why).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(name) if isinstance(source, bytes) else source
    try:
        with (
            _time_limit(DECODE_SECONDS),
            io.BytesIO(source) if isinstance(source, bytes) else open_regular(source, MAX_FILE_BYTES) as file,
            open_image(file) as opened,
        ):
            problem = size_problem(*opened.size) or _scan_problem(opened, file)
            if problem:
                raise UnreadableImageError(path, problem)
            if min_size:
                opened.draft(None, (min_size, min_size))
            opened.load()
            with pillow_warnings():
                upright = ImageOps.exif_transpose(opened)
            return convert(_to_rgb(upright))
    except UnreadableImageError:
        raise
    except FileRefusedError as e:
        raise UnreadableImageError(path, e.reason) from None
    except TimeoutError:
        raise UnreadableImageError(path, f"decoding took longer than {DECODE_SECONDS:g} s") from None
    except MemoryError:
        raise UnreadableImageError(path, "not enough memory to decode and resize it") from None
    except Image.DecompressionBombError:
        raise UnreadableImageError(path, f"decompression bomb: more than {MAX_PIXELS:,} pixels") from None
    except Exception as e:  # Pillow raises many types for broken files
        reason = "cannot identify image file" if isinstance(e, UnidentifiedImageError) else str(e)
        raise UnreadableImageError(path, reason or type(e).__name__) from None


@contextmanager
def pillow_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Pillow's warnings (broken EXIF data, mostly), caught (returned) instead of printed: the pixels are fine, and what
    EXIF could be read (the orientation) is used. `check` reports them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def _scan_problem(opened: Image.Image, file: BinaryIO) -> str | None:
    """Why a JPEG's scans are refused, or None: more than `MAX_JPEG_SCANS`, or scans x pixels past `MAX_SCAN_PIXELS`.
    The decoder passes over every pixel once a scan, and the signal-based time limit reaches no server thread or Ray
    actor, so the work is bounded up front.

    Scans start with the marker FF DA, which cannot occur inside entropy-coded data (an FF there is followed by 00),
    so counting it is exact but for embedded thumbnails, which only count high.
    """
    if opened.format not in ("JPEG", "MPO"):
        return None
    width, height = opened.size
    limit = min(MAX_JPEG_SCANS, MAX_SCAN_PIXELS // (width * height))
    start = file.tell()
    file.seek(0)
    n_scans, tail = 0, b""
    try:
        while n_scans <= limit and (chunk := file.read(1 << 20)):
            n_scans += (tail + chunk).count(b"\xff\xda")
            tail = chunk[-1:]
    finally:
        file.seek(start)
    if n_scans <= limit:
        return None
    return f"a JPEG of more than {limit} scans at {width}x{height} pixels (a scan bomb: decoding it would take minutes or hours)"


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in this block after `seconds` (main thread on Unix only; elsewhere no limit)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _to_rgb(image: Image.Image) -> Image.Image:
    import numpy as np
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        pixels = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if pixels.max(initial=0) > 255 else 255.0
        image = Image.fromarray((pixels * (255.0 / peak)).clip(0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
