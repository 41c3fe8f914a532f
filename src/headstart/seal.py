"""Seals on what headstart keeps in a cache folder: an HMAC-SHA256 under that folder's own secret key.

The trust model. A cache folder (`--cache-dir`, default `~/.cache/headstart`) is the user's own, as their photos
are: what headstart finds there is used without being computed again. So each cached feature vector and each
exported ONNX engine carries a seal made with the folder's key, a random one headstart writes there on first use
(`seal.key`, readable by its owner alone) and never anywhere else. A vector moved to another image or backbone,
an engine edited or replaced with its recorded hash updated, or either brought in from another cache (another
machine, a download), fails its check and is computed again. A seal is no defence against someone who can act as
the user: they can read the key, as they can change headstart itself.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import uuid
from pathlib import Path

from headstart.errors import FileRefusedError
from headstart.files import read_regular

KEY_NAME = "seal.key"
KEY_BYTES = 32


def cache_key(root: Path) -> bytes:
    """The secret key of the cache folder `root`, made on first use (and made again if damaged).

    Raises:
        OSError: the key can be neither read nor written (a folder of another user, a read-only disk).
    """
    path = root / KEY_NAME
    for _ in range(3):  # another process may be making it at the same moment: then its key is the one read
        try:
            key = read_regular(path, KEY_BYTES)
            if len(key) == KEY_BYTES:
                return key
            damaged = True
        except FileNotFoundError:
            damaged = False
        except FileRefusedError:  # too large, or not a regular file
            damaged = True
        _write_key(path, replace=damaged)
    raise OSError(f"{path}: the cache's key keeps changing; run again.")


def _write_key(path: Path, replace: bool) -> None:
    """A new random key at `path`, written whole before it appears there; unless `replace`, one made meanwhile is kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{KEY_NAME}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(KEY_BYTES))
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links
                if not path.exists():
                    os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def seal(key: bytes, *parts: bytes) -> str:
    """The seal of `parts` (each length-prefixed, so no two lists of parts share one) under `key`: 64 hex digits."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(len(part).to_bytes(8, "little"))
        mac.update(part)
    return mac.hexdigest()


def is_sealed(key: bytes, given: object, *parts: bytes) -> bool:
    """Whether `given` is the seal of `parts` under `key` (compared in constant time)."""
    return isinstance(given, str) and given.isascii() and hmac.compare_digest(given, seal(key, *parts))
