"""Files in and out: atomic writes, bounded reads of regular files only, names shown safely, CSVs that round-trip any name."""

from __future__ import annotations

import contextlib
import csv
import ctypes
import hashlib
import io
import json
import os
import re
import shutil
import stat
import sys
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

from headstart.errors import ConfigError, FileRefusedError

_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it over `path`.

    An error names `path`, never the temporary file, which is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        _write_synced(tmp, data, target=path)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # on a read-only file system removing it fails too: the first error is the one to report
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            e.filename, e.filename2 = str(path), None
        raise
    return path


def output_file(path: Path, suffix: str, inputs: Iterable[Path] = (), force: bool = False) -> Path:
    """`path` checked as a file to write, symbolic links followed: its name ends in `suffix`, and it is not a
    special file, a link loop, one of `inputs` or inside them, nor inside a model folder; and, unless `force`, a file
    that exists was written by headstart. So an output option never replaces a photo, a device, the data, a model's
    files or a file of the user's.

    Raises:
        ConfigError: naming what is wrong and what to give instead.
    """
    if path.suffix.lower() != suffix:
        raise ConfigError(f"{display(path)}: give a file name ending in {suffix}; headstart writes this output only to such a file.")
    resolved = _resolved(path, "file")
    if resolved.exists() and not resolved.is_file():
        raise ConfigError(f"{display(path)}: exists and is not a regular file; give another file name.")
    if resolved.suffix.lower() != suffix:
        raise ConfigError(
            f"{display(path)}: a link to {display(resolved)}; give a file name ending in {suffix} that is not a link to another file."
        )
    for i in inputs:
        inside = i.is_dir() and resolved.is_relative_to(i.resolve())
        if inside or (resolved.exists() and i.exists() and os.path.samefile(resolved, i)):
            raise ConfigError(f"{display(path)}: is {'inside' if inside else 'also'} an input of this command; give another file name.")
    _refuse_in_model_folder(path, resolved.parents)
    if resolved.exists() and not force and not written_by_headstart(resolved):
        raise ConfigError(f"{display(path)}: exists, and headstart did not write it; give another file name, or --force to replace it.")
    return resolved


def output_folder(path: Path) -> Path:
    """`path` checked as a folder to write new files into (under names no file there has): a folder or nothing yet,
    neither a model folder nor inside one.

    Raises:
        ConfigError: naming what is wrong and what to give instead.
    """
    resolved = _resolved(path, "folder")
    if resolved.exists() and not resolved.is_dir():
        raise ConfigError(f"{display(path)}: exists and is not a folder; give a folder name (new files are written into it).")
    _refuse_in_model_folder(path, (resolved, *resolved.parents))
    return resolved


def _resolved(path: Path, kind: str) -> Path:
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        raise ConfigError(f"{display(path)}: a symbolic link loop; give another {kind} name.") from None


def _refuse_in_model_folder(path: Path, folders: Iterable[Path]) -> None:
    model = next((folder for folder in folders if (folder / MODEL_MARKER).is_file()), None)
    if model is not None:
        raise ConfigError(
            f"{display(path)}: inside the model folder {display(model)}, whose files only train writes; give a place outside it."
        )


MODEL_MARKER = "bundle.json"  # the file that makes a folder a model folder
_CSV_HEADERS = ("path,label,probability", "path,problem,action,detail,fix", "rank,path,given,suggested", "rank,backbone,head")
_MARKS: dict[str, Callable[[bytes, bytes], bool]] = {  # how each kind of output headstart writes is told apart: (first, last 64 KiB)
    ".csv": lambda head, tail: head.lstrip(b"\xef\xbb\xbf").startswith(tuple(h.encode() for h in _CSV_HEADERS)),
    ".onnx": lambda head, tail: b"headstart_version" in tail,  # the metadata, at the end of the file
    ".parquet": lambda head, tail: head.startswith(b"PAR1") and b"headstart_version" in tail,  # the schema's metadata, in the footer
    ".tflite": lambda head, tail: head[4:8] == b"TFL3" and all(m in head or m in tail for m in (b"serving_default", b"probabilities")),
    ".html": lambda head, tail: b'<meta name="generator" content="headstart">' in head,
    ".png": lambda head, tail: head.startswith(b"\x89PNG") and b"Software\x00headstart" in head,
}


def written_by_headstart(path: Path) -> bool:
    """Whether `path` is a file of a kind headstart writes (by its name's ending) that carries headstart's mark: the
    header row of one of its CSVs, its metadata in an ONNX, Parquet or TFLite file, its generator tag in a page or a PNG."""
    mark = _MARKS.get(path.suffix.lower())
    if mark is None:
        return False
    try:
        with open_regular(path, 1 << 40) as f:
            head = f.read(1 << 16)
            f.seek(max(0, os.fstat(f.fileno()).st_size - (1 << 16)))
            return mark(head, f.read(1 << 16))
    except OSError:
        return False


def json_bytes(obj: Any) -> bytes:
    """`obj` as indented JSON text, UTF-8, ending in a newline."""
    return (json.dumps(obj, indent=2) + "\n").encode()


def atomic_write_json(path: Path, obj: Any) -> Path:
    """Write `obj` as indented JSON, atomically."""
    return atomic_write_bytes(path, json_bytes(obj))


def open_regular(path: Path, max_bytes: int, dir_fd: int | None = None) -> BinaryIO:
    """Open a regular file (symbolic links followed) for reading, never blocking on a FIFO or device.

    With `dir_fd`, the file named `path.name` in that open folder is read (`path` names it in errors).

    Raises:
        FileRefusedError: `path` is not a regular file, or is larger than `max_bytes`.
        OSError: it cannot be opened (missing, no permission, a symlink loop).
    """
    fd = os.open(path.name if dir_fd is not None else path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), None)
        if kind is not None or not stat.S_ISREG(info.st_mode):
            raise FileRefusedError(path, f"not a regular file: {kind or 'a special file'}")
        if info.st_size > max_bytes:
            raise FileRefusedError(path, f"too large: {info.st_size:,} bytes, more than the {max_bytes:,} allowed")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: Path, max_bytes: int, dir_fd: int | None = None) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (see `open_regular` and `read_bounded`)."""
    with open_regular(path, max_bytes, dir_fd) as f:
        return read_bounded(f, max_bytes, path, os.fstat(f.fileno()).st_size)


def read_bounded(f: BinaryIO, max_bytes: int, path: Path, expected: int = 0) -> bytes:
    """The rest of `f`, at most `max_bytes`, allocating what it holds (`expected` bytes at first), never the bound,
    so a 4 GiB bound costs nothing under an address-space limit (`ulimit -v`).

    Raises:
        FileRefusedError: more than `max_bytes` remain (the file grew while being read, or was larger than said).
    """
    parts = [f.read(min(expected, max_bytes + 1))]
    total = len(parts[0])
    while total <= max_bytes and (part := f.read(min(1 << 20, max_bytes + 1 - total))):
        parts.append(part)
        total += len(part)
    if total > max_bytes:
        raise FileRefusedError(path, f"too large: more than the {max_bytes:,} bytes allowed")
    return parts[0] if len(parts) == 1 else b"".join(parts)


def atomic_write_folder(directory: Path, files: dict[str, bytes], replaced: Collection[str]) -> Path:
    """Make `directory` hold `files` in one step: any reader, and any run killed at any moment, sees the old folder or the new one.

    The new folder is built beside the old one; every entry of the old folder not
    named in `replaced` (a user's own files, say) is carried into it as a hard
    link (or a copy), along with the old folder's permissions; then the two
    folders are exchanged in one rename and the old one is removed. Staging
    folders left by a killed run are removed first. Returns `directory`.
    """
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    if directory.is_dir():  # else a stale one may hold the only copy (a swap by three renames, interrupted)
        for stale in _staging_folders(directory):
            shutil.rmtree(stale, ignore_errors=True)
    staging = _staging_folder(directory)
    staging.mkdir()
    try:
        for name, data in files.items():
            _write_synced(staging / name, data, target=directory / name)
        if directory.is_dir():
            os.chmod(staging, stat.S_IMODE(directory.stat().st_mode))
            for entry in os.scandir(directory):
                if entry.name not in replaced and not _is_leftover(entry.name, replaced):
                    _link_tree(Path(entry.path), staging / entry.name)
        _fsync_folder(staging)
        if directory.is_dir():
            _exchange(staging, directory)  # `staging` now names the old folder
        else:
            os.rename(staging, directory)
        _fsync_folder(parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the old folder, or the unfinished new one
    return directory


_STAGING_ID = re.compile(r"[0-9a-f]{12}")


def _staging_folder(directory: Path) -> Path:
    return directory.with_name(f".{directory.name[:80]}.headstart-{uuid.uuid4().hex[:12]}")


def _staging_folders(directory: Path) -> list[Path]:
    """Staging folders of `directory` left by runs killed while saving."""
    prefix = f".{directory.name[:80]}.headstart-"
    return [
        Path(e.path) for e in os.scandir(directory.parent) if e.name.startswith(prefix) and _STAGING_ID.fullmatch(e.name[len(prefix) :])
    ]


def _is_leftover(name: str, replaced: Collection[str]) -> bool:
    """Whether `name` is a temporary file `atomic_write_bytes` left behind for one of the `replaced` names."""
    return any(name.startswith(f".{r}.") and _STAGING_ID.fullmatch(name[len(r) + 2 : -4]) and name.endswith(".tmp") for r in replaced)


def _write_synced(path: Path, data: bytes, target: Path) -> None:
    """Create `path` holding `data`, flushed to disk; an error names `target`."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)  # mode follows the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        e.filename, e.filename2 = str(target), None
        raise


def _link_tree(source: Path, destination: Path) -> None:
    """Recreate `source` at `destination`: files as hard links (copies where links fail), folders and symbolic links as such."""
    if source.is_symlink():
        os.symlink(os.readlink(source), destination)
    elif source.is_dir():
        destination.mkdir()
        shutil.copymode(source, destination)
        for entry in os.scandir(source):
            _link_tree(Path(entry.path), destination / entry.name)
    else:
        try:
            os.link(source, destination, follow_symlinks=False)
        except OSError:
            shutil.copy2(source, destination, follow_symlinks=False)


def _fsync_folder(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder; the data itself is synced
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> None:
    """Swap two folders in one atomic rename (Linux `renameat2`, macOS `renamex_np`); elsewhere in three renames."""
    libc = ctypes.CDLL(None, use_errno=True)
    swap = getattr(libc, "renameat2", None) if sys.platform.startswith("linux") else getattr(libc, "renamex_np", None)
    if swap is not None:
        args = (-100, os.fsencode(a), -100, os.fsencode(b), 2) if sys.platform.startswith("linux") else (os.fsencode(a), os.fsencode(b), 2)
        if swap(*args) == 0:  # AT_FDCWD = -100; RENAME_EXCHANGE and RENAME_SWAP are both 2
            return
        code = ctypes.get_errno()
        if code not in (22, 38, 45, 95):  # EINVAL, ENOSYS, EOPNOTSUPP/ENOTSUP: the file system cannot swap
            raise OSError(code, os.strerror(code), str(b))
    aside = _staging_folder(b)
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def display(text: str | os.PathLike[str]) -> str:
    """`text` (a file name, a class name) safe to show on one line of a terminal, a page or a plot.

    Control characters (ESC included), line and bidirectional-override
    characters, and the undecodable bytes of non-UTF-8 file names
    (`surrogateescape`) are written as `\\xNN` / `\\uNNNN` escapes.
    """
    value = os.fspath(text)

    def escape(match: re.Match[str]) -> str:
        char = match.group()
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, as os.fsdecode keeps it
            return f"\\x{code - 0xDC00:02x}"
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _UNPRINTABLE.sub(escape, value)


_FORMULA_STARTS = tuple("=+-@\t\r")


def csv_cell(value: Any) -> Any:
    """`value` safe in a spreadsheet: text that a spreadsheet would run as a formula (starting with = + - @, a tab or a
    carriage return, after any apostrophes) gets an apostrophe in front; numbers, and text that reads as a number, are
    kept. `read_csv_cell` undoes it.

    >>> csv_cell("=HYPERLINK(1)"), csv_cell("-0.5"), csv_cell("daisy"), read_csv_cell(csv_cell("'@x"))
    ("'=HYPERLINK(1)", '-0.5', 'daisy', "'@x")
    """
    if not isinstance(value, str) or not value.lstrip("'").startswith(_FORMULA_STARTS):
        return value
    try:
        float(value)
        return value
    except ValueError:
        return "'" + value


def read_csv_cell(text: str) -> str:
    """A cell as `csv_cell` was given it: the apostrophe it put in front of formula-like text taken off."""
    return text[1:] if text.startswith("'") and text.lstrip("'").startswith(_FORMULA_STARTS) else text


def csv_bytes(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> bytes:
    """CSV text in UTF-8, every cell through `csv_cell` (no cell runs as a spreadsheet formula). Undecodable bytes of
    non-UTF-8 file names are written back as the original bytes, so a path read from the CSV (with
    `errors="surrogateescape"`, and `read_csv_cell`) names the same file."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([csv_cell(c) for c in header])
    writer.writerows([csv_cell(c) for c in row] for row in rows)
    return buffer.getvalue().encode("utf-8", errors="surrogateescape")


def walk(folder: Path, on_error: Callable[[Path, OSError], None] | None = None) -> Iterator[tuple[Path, list[str], list[str]]]:
    """`os.walk(folder)` without recursion, so a tree nested thousands of levels deep is walked like any other:
    top-down (prune the folder names in place), links to folders listed but not followed, unreadable folders
    (no permission, a path longer than the system allows) passed over, each told to `on_error`."""
    stack = [folder]
    while stack:
        top = stack.pop()
        folders: list[str] = []
        files: list[str] = []
        descend: set[str] = set()
        try:
            with os.scandir(top) as entries:
                for entry in entries:
                    try:
                        is_folder = entry.is_dir()
                    except OSError:
                        is_folder = False
                    (folders if is_folder else files).append(entry.name)
                    if is_folder and not entry.is_symlink():
                        descend.add(entry.name)
        except OSError as e:
            if on_error is not None:
                on_error(top, e)
            continue
        yield top, folders, files
        stack += [top / name for name in reversed(folders) if name in descend]


def visible_files(folder: Path) -> Iterator[Path]:
    """The files under `folder`, recursively, in sorted order; hidden files and folders (names starting with '.') left out."""
    for dirpath, dirnames, filenames in walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield from (dirpath / name for name in sorted(filenames) if not name.startswith("."))


def file_digest(path: Path, max_bytes: int = 1 << 30) -> str:
    """sha256 of a file's bytes, hex.

    Remembered in this process while the file's size, times and inode stay the
    same (so the data checks and the cache hash each file once), except for
    files changed in the last two seconds: a second change within the file
    system's clock granularity could leave all of those as they were.

    Raises:
        FileRefusedError: `path` is not a regular file (a FIFO, a device) or is larger than `max_bytes`.
        OSError: it cannot be read.
    """
    stat = path.stat()
    if time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) < 2_000_000_000:
        return _sha256(path, max_bytes)
    return _remembered_sha256(path, max_bytes, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)


@lru_cache(maxsize=1 << 16)
def _remembered_sha256(path: Path, max_bytes: int, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    return _sha256(path, max_bytes)


def _sha256(path: Path, max_bytes: int) -> str:
    digest = hashlib.sha256()
    n_bytes = 0
    with open_regular(path, max_bytes) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            n_bytes += len(chunk)
            if n_bytes > max_bytes:  # grew while being read
                raise FileRefusedError(path, f"too large: more than the {max_bytes:,} bytes allowed")
            digest.update(chunk)
    return digest.hexdigest()
