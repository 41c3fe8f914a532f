"""Shared fixtures: the ../shared data, tiny image folders made on the fly, one trained model."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import headstart
from headstart.cache import ExtractSummary

SHARED = Path(__file__).resolve().parents[2] / "shared"
PHOTOS = SHARED / "photos"
FIXTURES = SHARED / "fixtures"
CATS_DOGS_TINY = FIXTURES / "cats_dogs_tiny"
FLOWERS = SHARED / "datasets" / "flowers"
CATS_DOGS = SHARED / "datasets" / "cats_dogs"  # cat/ and dog/: photos the tiny sets do not hold
FLOWERS_TINY = FIXTURES / "flowers5_tiny"
ODD_FILES = FIXTURES / "odd_files"

if not SHARED.is_dir():
    raise RuntimeError(f"The tests read real photos from {SHARED}; clone the repo beside the shared/ folder.")


def copy_flowers(root: Path, per_class: int, last: bool = False) -> Path:
    """The first (or `last`) `per_class` photos of each class of ../shared/datasets/flowers, copied into `root`.
    The last ones are in no tiny set and in none of the tests' training sets: photos a head was not fitted on."""
    for folder in sorted(FLOWERS.iterdir()):
        (root / folder.name).mkdir(parents=True)
        for path in sorted(folder.iterdir())[-per_class:] if last else sorted(folder.iterdir())[:per_class]:
            shutil.copy(path, root / folder.name / path.name)
    return root


def unseen_cats_dogs(root: Path, per_class: int = 3) -> Path:
    """cats/ and dogs/ in `root`, each the last `per_class` photos of ../shared/datasets/cats_dogs: none is in the tiny
    sets, so a model trained on those has not seen them (evaluate leaves out the images a head was fitted on)."""
    for label in ("cats", "dogs"):
        (root / label).mkdir(parents=True)
        for path in sorted((CATS_DOGS / label[:-1]).iterdir())[-per_class:]:
            shutil.copy(path, root / label / path.name)
    return root


def write_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (64, 48), mode: str = "RGB") -> Path:
    """A small image of one colour with noise, so no two files are identical."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, "RGB").convert(mode).save(path)
    return path


def start_server(app: Any) -> tuple[Any, threading.Thread, str]:
    """`app` served by uvicorn in a background thread on a free loopback port; returns (server, thread, URL) once it accepts connections."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, ws="none"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    return server, thread, f"http://127.0.0.1:{port}"


def wait_until_serving(process: Any, url: str, stderr: Path, seconds: float = 120) -> None:
    """Return once the server `process` (a Popen writing its stderr to `stderr`) answers `url`/health."""
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, stderr.read_text()
        assert time.monotonic() < deadline, "the server did not start"
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def flowers_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ExtractSummary]:
    """A feature cache of all 1,500 flower photos (efficientnet_lite0, the local engine), extracted once for the
    session, and what `extract` said. Tests read it and train on it; none adds other images to it."""
    cache = tmp_path_factory.mktemp("flowers-cache")
    return cache, headstart.extract(FLOWERS, cache_dir=cache)


@pytest.fixture(scope="session")
def tiny_model(cache_dir: Path) -> headstart.Model:
    """efficientnet_lite0 + linear head trained on cats_dogs_tiny's train/ split (validated on val/)."""
    return headstart.train(CATS_DOGS_TINY, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model: headstart.Model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model.save(tmp_path_factory.mktemp("models") / "cats_dogs")


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep the tests, and the session's and modules' fixtures (set up before any test's own), out of the user's real cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HEADSTART_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "default-cache"))
        yield
