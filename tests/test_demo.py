"""The demo's data: a real download over loopback HTTP, the mirror, and the whole demo run."""

from __future__ import annotations

import functools
import http.server
import shutil
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import FLOWERS_TINY
from headstart.cli.main import app
from headstart.datasets import fetch_flowers
from headstart.errors import DataError


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving files from a temporary folder."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()


def test_download_unpacks_and_checks_the_archive(server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEADSTART_DATA_MIRROR", raising=False)
    url, root = server
    with tarfile.open(root / "flower_photos.tgz", "w:gz") as tar:
        tar.add(FLOWERS_TINY, arcname="flower_photos")
    calls: list[tuple[int, int]] = []
    folder = fetch_flowers(tmp_path / "cache", url=f"{url}/flower_photos.tgz", progress=lambda d, done, total: calls.append((done, total)))
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in FLOWERS_TINY.iterdir())
    assert calls and calls[-1][0] == calls[-1][1] == (root / "flower_photos.tgz").stat().st_size
    (root / "flower_photos.tgz").unlink()
    assert fetch_flowers(tmp_path / "cache", url=f"{url}/flower_photos.tgz") == folder  # second time: no download


def test_failed_and_damaged_downloads_are_clear(server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEADSTART_DATA_MIRROR", raising=False)
    url, root = server
    with pytest.raises(DataError, match="Could not download .*HEADSTART_DATA_MIRROR"):
        fetch_flowers(tmp_path / "a", url=f"{url}/missing.tgz")
    assert not list((tmp_path / "a" / "datasets").glob("*.part"))
    (root / "bad.tgz").write_bytes(b"this is not a tar archive" * 100)
    with pytest.raises(DataError, match="damaged download"):
        fetch_flowers(tmp_path / "b", url=f"{url}/bad.tgz")
    assert not (tmp_path / "b" / "datasets" / "flower_photos.tgz").exists()


def test_mirror_must_hold_the_five_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(FLOWERS_TINY, tmp_path / "flowers", ignore=shutil.ignore_patterns("tulips"))
    monkeypatch.setenv("HEADSTART_DATA_MIRROR", str(tmp_path))
    with pytest.raises(DataError, match="expected a 'tulips' folder"):
        fetch_flowers(tmp_path / "cache")


@pytest.mark.slow
def test_demo_trains_evaluates_and_explains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mirror").mkdir()
    shutil.copytree(FLOWERS_TINY, tmp_path / "mirror" / "flowers")
    monkeypatch.setenv("HEADSTART_DATA_MIRROR", str(tmp_path / "mirror"))
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert "Validation accuracy" in result.output
    assert f"headstart predict {tmp_path / 'demo'}" in result.output
    assert (tmp_path / "demo" / "bundle.json").is_file()
