"""The demo's data: TensorFlow's flower photos, downloaded once or taken from a local mirror."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from headstart.config import Progress
from headstart.data import IMAGE_EXTENSIONS
from headstart.errors import DataError

FLOWERS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
FLOWER_CLASSES = ("daisy", "dandelion", "roses", "sunflowers", "tulips")
MIRROR_ENV = "HEADSTART_DATA_MIRROR"
_MIRROR_NAMES = ("flowers", "flower_photos")


def fetch_flowers(cache_dir: Path, url: str = FLOWERS_URL, progress: Progress | None = None) -> Path:
    """A folder of the five flower classes, one sub-folder each.

    Uses `$HEADSTART_DATA_MIRROR/flowers` (or `/flower_photos`) when that is set;
    otherwise downloads `url` once into `cache_dir/datasets/` and unpacks it.

    Raises:
        DataError: the mirror or the download does not hold the five class folders, or the download failed.
    """
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        for name in _MIRROR_NAMES:
            if (Path(mirror) / name).is_dir():
                return check_flowers(Path(mirror) / name)
        raise DataError(f"{MIRROR_ENV}={mirror} has no flowers/ or flower_photos/ folder. Unset it to download instead.")
    target = cache_dir / "datasets" / "flower_photos"
    if target.is_dir():
        return check_flowers(target)
    archive = cache_dir / "datasets" / "flower_photos.tgz"
    if not archive.is_file():
        download(url, archive, progress)
    unpack_flowers(archive, target)
    return check_flowers(target)


def download(url: str, destination: Path, progress: Progress | None = None) -> Path:
    """Fetch `url` to `destination` through a temporary file renamed on success."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, partial.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress("Downloading flower photos", done, total or done)
        os.replace(partial, destination)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise DataError(
            f"Could not download {url} ({getattr(e, 'reason', e)}). Check your connection, "
            f"or set {MIRROR_ENV} to a folder holding flowers/."
        ) from None
    return destination


def unpack_flowers(archive: Path, target: Path) -> Path:
    """Unpack the archive's flower_photos/ folder to `target` (through a temporary folder)."""
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".unpack-"))
    try:
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(scratch, filter="data")
        except (tarfile.TarError, EOFError, OSError) as e:
            archive.unlink(missing_ok=True)
            raise DataError(f"{archive}: damaged download ({e}); deleted it, run again to re-download.") from None
        roots = [p for p in scratch.iterdir() if p.is_dir()]
        if len(roots) != 1:
            raise DataError(f"{archive}: expected one top-level folder, found {len(roots)}. Delete it and run again.")
        os.replace(roots[0], target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def check_flowers(folder: Path) -> Path:
    """Raise DataError unless `folder` has the five flower class folders, each with images."""
    for name in FLOWER_CLASSES:
        sub = folder / name
        if not sub.is_dir() or not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in sub.iterdir()):
            raise DataError(f"{folder}: expected a '{name}' folder of images. Delete the folder to download it again.")
    return folder
