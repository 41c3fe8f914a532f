"""Data triage: every problem in a photo folder or CSV, with its path and the fix, before training."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from headstart.config import Progress
from headstart.data import (
    MAX_ASPECT_RATIO,
    MAX_FILE_BYTES,
    MAX_PIXELS,
    MIN_SIDE,
    VAL_FOLDER_NAMES,
    Dataset,
    ImageRecord,
    Skipped,
    check_class_counts,
    check_val_split,
    load_image,
    open_image,
    pillow_warnings,
    read_source,
    split_records,
)
from headstart.errors import DataError, UnreadableImageError
from headstart.files import atomic_write_bytes, csv_bytes, file_digest, open_regular, walk

Action = Literal["blocks training", "skipped", "warning", "used as is", "ignored"]
IMBALANCE_RATIO = 5.0  # largest class / smallest class beyond which class weights are suggested


@dataclass(frozen=True)
class Problem:
    """A kind of problem: what headstart does about it and what the user can do."""

    action: Action
    fix: str


PROBLEMS: dict[str, Problem] = {
    "too few images": Problem("blocks training", "Add images to the class (at least 2, one for validation) or remove its folder."),
    "single class": Problem("blocks training", "Add a folder for at least one more class."),
    "no images": Problem("blocks training", "Put each class's images in its own sub-folder, e.g. DATA/cats/*.jpg."),
    "empty file": Problem("skipped", "Copy or download the file again; it has zero bytes."),
    "special file": Problem("skipped", "Replace it with a regular image file, or remove it; FIFOs, devices and sockets are never read."),
    "file too large": Problem("skipped", f"Resize or re-compress the image below {MAX_FILE_BYTES:,} bytes, or remove it."),
    "not an image": Problem("skipped", "Remove the file, or convert it to JPEG or PNG if it is a photo."),
    "unreadable image": Problem("skipped", "Re-save or download the image again; it is truncated or corrupt."),
    "decompression bomb": Problem("skipped", f"Resize the image below {MAX_PIXELS:,} pixels, or remove it."),
    "too small": Problem("skipped", f"Use images at least {MIN_SIDE} px on each side, or remove it."),
    "extreme aspect ratio": Problem("skipped", f"Crop the image to a ratio under {MAX_ASPECT_RATIO}:1, or remove it."),
    "broken link": Problem("skipped", "Point the symbolic link at an existing file (or break the loop), or remove it."),
    "missing file": Problem("skipped", "Fix the path in the CSV, or remove the row."),
    "HEIC photo": Problem("skipped", "Convert it to JPEG (macOS: sips -s format jpeg; Linux: heif-convert), or remove it."),
    "outside class folders": Problem("ignored", "Move the image into its class's sub-folder."),
    "not an image extension": Problem("ignored", "Nothing to do; rename it with an image extension if it is a photo."),
    "linked folder": Problem(
        "ignored", "Copy or move its photos into the class folder: links to folders are not followed (they can loop)."
    ),
    "unreadable folder": Problem("ignored", "Make it readable, or move its photos to a shorter path; its photos are not used."),
    "hidden file": Problem("ignored", "Nothing to do; un-hide it if it is a photo you meant to include."),
    "duplicate": Problem("warning", "Delete the extra copies: a duplicated image counts twice in training."),
    "train/val leak": Problem("warning", "Remove one copy: an image in both training and validation inflates validation accuracy."),
    "class imbalance": Problem("warning", "Train with --balanced (class weights), or add images to the small classes."),
    "empty class folder": Problem("warning", "Add images to the folder, or delete it; it is not a class until it has images."),
    "animated": Problem("used as is", "Nothing to do: the first frame is used. Save other frames as separate images to use them."),
    "converted to RGB": Problem("used as is", "Nothing to do: converted to 8-bit RGB (transparency over white)."),
    "corrupt EXIF": Problem(
        "used as is", "Nothing to do: what EXIF could be read (the orientation) is used; re-save the image to repair it."
    ),
    "rotated by EXIF": Problem("used as is", "Nothing to do: turned upright as its EXIF orientation says."),
}


@dataclass(frozen=True)
class Finding:
    """One problem with one file or class."""

    path: Path
    problem: str
    detail: str

    @property
    def action(self) -> Action:
        return PROBLEMS[self.problem].action

    @property
    def fix(self) -> str:
        return PROBLEMS[self.problem].fix


@dataclass(frozen=True)
class Triage:
    """What `triage` found.

    Attributes:
        source: the folder or CSV checked.
        n_images: image files found (before skipping the unusable ones).
        usable: usable images per class.
        findings: every problem, in path order within each kind.
    """

    source: Path
    n_images: int
    usable: dict[str, int]
    findings: list[Finding]

    @property
    def can_train(self) -> bool:
        """Whether `headstart train` can proceed (unusable files are skipped, warnings are only reported)."""
        return not any(f.action == "blocks training" for f in self.findings)

    def counts(self) -> list[tuple[str, Action, int]]:
        """(problem, action, number of findings) for each problem found, most serious first."""
        counter = Counter(f.problem for f in self.findings)
        order = list(PROBLEMS)
        return [(p, PROBLEMS[p].action, counter[p]) for p in sorted(counter, key=order.index)]

    def write_csv(self, path: Path) -> Path:
        """Write one row per finding: path, problem, action, detail, fix (atomically).

        Paths that are not UTF-8 are written as their original bytes, so each names its file.
        """
        rows = ([str(f.path), f.problem, f.action, f.detail, f.fix] for f in self.findings)
        return atomic_write_bytes(path, csv_bytes(["path", "problem", "action", "detail", "fix"], rows))


def triage(source: str | os.PathLike[str], val_split: float = 0.2, seed: int = 0, progress: Progress | None = None) -> Triage:
    """Find every problem in a dataset: unusable files, files used after conversion, duplicates, leaks, imbalance.

    Args:
        source: a class-folder tree, a tree with train/ and val/, or a `path,label` CSV.
        val_split, seed: the split `train` would make (for the class-size and leak checks).

    Raises:
        DataError: the source does not exist.
    """
    check_val_split(val_split)
    root = Path(source).expanduser()
    records, presplit_val, skipped = read_source(root)
    findings = [_from_skipped(s) for s in skipped]
    findings += _hidden_files(root) + _empty_class_folders(root) + _passed_over_folders(root)
    all_records = records + (presplit_val or [])
    findings += _inspect_all([r.path for r in all_records], progress)
    unusable = {f.path for f in findings if f.action == "skipped"}
    usable_records = [r for r in records if r.path not in unusable]
    if presplit_val is None:
        train, val = split_records(usable_records, val_split, seed)
    else:
        train, val = usable_records, [r for r in presplit_val if r.path not in unusable]
    findings += _duplicates(train, val)
    usable = dict(sorted(Counter(r.label for r in train + val).items()))
    findings += _class_findings(root, train, val, usable, min_val=1 if val_split > 0 else 0)  # as `data.split_dataset`
    return Triage(root, len(all_records), usable, sorted(findings, key=lambda f: (list(PROBLEMS).index(f.problem), str(f.path))))


def dataset_warnings(source: str | os.PathLike[str], dataset: Dataset) -> list[Finding]:
    """The problems of an already loaded dataset that training goes on with: duplicates, leaks, imbalance, empty class folders.

    What would block training has raised in `data.split_dataset`, after the unreadable files were dropped.
    """
    root = Path(source).expanduser()
    usable = dict(sorted(Counter(r.label for r in dataset.train + dataset.val).items()))
    findings = _empty_class_folders(root) + _duplicates(dataset.train, dataset.val)
    findings += _class_findings(root, dataset.train, dataset.val, usable, min_val=1 if dataset.val else 0)
    return [f for f in findings if f.action == "warning"]


def _from_skipped(s: Skipped) -> Finding:
    if "not found" in s.reason:
        return Finding(s.path, "missing file", s.reason)
    if s.reason.startswith("HEIC"):
        return Finding(s.path, "HEIC photo", s.reason)
    if "not inside a class folder" in s.reason:
        return Finding(s.path, "outside class folders", s.reason)
    return Finding(s.path, "not an image extension", s.reason)


def _class_tops(root: Path) -> list[Path]:
    """The folders whose sub-folders are classes: train/ and val/ of a pre-split tree, else `root` (none for a CSV)."""
    if not root.is_dir():
        return []
    tops = [root / "train", *(root / n for n in VAL_FOLDER_NAMES)] if (root / "train").is_dir() else [root]
    return [t for t in tops if t.is_dir()]


def _empty_class_folders(root: Path) -> list[Finding]:
    return [
        Finding(entry, "empty class folder", "no files in it")
        for top in _class_tops(root)
        for entry in sorted(top.iterdir())
        if not entry.name.startswith(".")
        and entry.is_dir()
        and not any(
            not name.startswith(".") and (name in files or os.path.islink(top / name))
            for top, folders, files in walk(entry)
            for name in folders + files
        )
    ]


def _passed_over_folders(root: Path) -> list[Finding]:
    """Folders whose photos are not used: links to folders (not followed: they can loop) and folders that cannot be read."""
    findings: list[Finding] = []

    def unreadable(folder: Path, error: OSError) -> None:
        findings.append(Finding(folder, "unreadable folder", error.strerror or str(error)))

    for top in _class_tops(root):
        for dirpath, dirnames, _ in walk(top, unreadable):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            findings += [
                Finding(dirpath / d, "linked folder", "a link to a folder: not followed") for d in dirnames if os.path.islink(dirpath / d)
            ]
    return findings


def _hidden_files(root: Path) -> list[Finding]:
    findings = []
    for top in _class_tops(root):
        for dirpath, dirnames, filenames in walk(top):
            findings += [
                Finding(dirpath / n, "hidden file", "name starts with '.'") for n in sorted(filenames + dirnames) if n.startswith(".")
            ]
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return findings


def inspect_file(path: Path) -> list[tuple[str, str]]:
    """The (problem, detail) pairs for one image file, decoded in full; empty when it is a plain RGB image.

    Special files (FIFOs, devices) and files over `MAX_FILE_BYTES` are reported unread.
    """
    if not path.exists():
        return [("broken link", "symbolic link to a missing file, or a loop")] if path.is_symlink() else [("missing file", "no such file")]
    if path.is_file() and path.stat().st_size == 0:
        return [("empty file", "0 bytes")]
    try:
        load_image(path)
        with open_regular(path, MAX_FILE_BYTES) as file, open_image(file) as image:
            notes = []
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                notes.append(("animated", f"{frames} frames"))
            if image.mode != "RGB":
                notes.append(("converted to RGB", f"mode {image.mode}" + (" with transparency" if "transparency" in image.info else "")))
            with pillow_warnings() as broken:
                exif = image.getexif()
                orientation = exif.get(0x0112, 1)  # the EXIF Orientation tag
                exif.get_ifd(0x8769)  # the Exif sub-folder of tags, read as turning the image upright reads it
            if broken:
                notes.append(("corrupt EXIF", str(broken[0].message).strip()))
            if orientation not in (0, 1):
                notes.append(("rotated by EXIF", f"orientation {orientation}"))
            return notes
    except UnreadableImageError as e:
        return [(_problem_of(e.reason), e.reason)]
    except Exception as e:  # header reading failed where decoding did not
        return [(_problem_of(str(e)), str(e) or type(e).__name__)]


_PROBLEM_OF_REASON = (
    ("not a regular file", "special file"),
    ("too large", "file too large"),
    ("decompression bomb", "decompression bomb"),
    ("too small", "too small"),
    ("extreme aspect ratio", "extreme aspect ratio"),
    ("cannot identify", "not an image"),
)


def _problem_of(reason: str) -> str:
    return next((problem for key, problem in _PROBLEM_OF_REASON if reason.startswith(key)), "unreadable image")


def _inspect_all(paths: Sequence[Path], progress: Progress | None) -> list[Finding]:
    findings: list[Finding] = []
    from headstart.pipeline import available_cpus, process_pool  # with NumPy: only when files are decoded

    with process_pool(available_cpus()) as pool:
        for done, (path, notes) in enumerate(zip(paths, pool.map(inspect_file, paths, chunksize=16)), start=1):
            findings += [Finding(path, problem, detail) for problem, detail in notes]
            if progress:
                progress("Checking images", done, len(paths))
    return findings


def _duplicates(train: list[ImageRecord], val: list[ImageRecord]) -> list[Finding]:
    by_digest: dict[str, list[tuple[ImageRecord, str]]] = defaultdict(list)
    for record, split in [(r, "train") for r in train] + [(r, "val") for r in val]:
        try:
            by_digest[file_digest(record.path)].append((record, split))
        except OSError:  # a broken link or unreadable file: reported as such, never as a duplicate
            continue
    findings = []
    for copies in by_digest.values():
        first = copies[0][0]
        for record, _ in copies[1:]:
            findings.append(Finding(record.path, "duplicate", f"same bytes as {first.path}"))
        splits = {split for _, split in copies}
        if len(splits) == 2:
            in_val = next(r for r, split in copies if split == "val")
            in_train = next(r for r, split in copies if split == "train")
            findings.append(Finding(in_val.path, "train/val leak", f"also in training as {in_train.path}"))
    return findings


def _class_findings(root: Path, train: list[ImageRecord], val: list[ImageRecord], usable: dict[str, int], min_val: int) -> list[Finding]:
    if not usable:
        return [Finding(root, "no images", "no usable images found")]
    classes = sorted({r.label for r in train})
    try:
        check_class_counts(train, val, classes, min_val=min_val if val else 0)
    except DataError as e:
        problem = "single class" if "single class" in str(e) else "too few images"
        return [Finding(root, problem, str(e))]
    smallest, largest = min(usable.values()), max(usable.values())
    if largest / smallest >= IMBALANCE_RATIO:
        small = min(usable, key=lambda c: usable[c])
        return [Finding(root, "class imbalance", f"'{small}' has {smallest} images, the largest class {largest}")]
    return []
