"""`headstart serve`: a real uvicorn server on a loopback port, real photos, hostile uploads, many clients at once."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import headstart
from conftest import CATS_DOGS_TINY, ODD_FILES, PHOTOS, start_server, wait_until_serving
from headstart import server
from headstart.model import Prediction
from headstart.pipeline import available_cpus
from headstart.server import MAX_FILES, MAX_REQUEST_BYTES, create_app

PICTURES = [
    PHOTOS / "dog.jpg",
    PHOTOS / "kite.jpg",  # 1.4 MB, 4 times the resize size: decoded at reduced scale, as `headstart predict` decodes it
    PHOTOS / "sk_chelsea.png",
    CATS_DOGS_TINY / "val" / "cats" / "cat.4001.jpg",
    CATS_DOGS_TINY / "val" / "dogs" / "dog.4002.jpg",
    *sorted(ODD_FILES.iterdir()),  # grey JPEGs, an RGBA PNG, a GIF
]
GOOD = CATS_DOGS_TINY / "val" / "dogs" / "dog.4001.jpg"
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (GET|POST) (\S*) (\d{3}) \d+\.\d ms (\d+) images?$")


REPORT = "<!doctype html><title>report</title><p>the report</p>"


@dataclass(frozen=True)
class Served:
    url: str
    model_dir: Path
    model: headstart.Model


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One server for the module, on a copy of the tiny model with a report (so that a test may retrain it)."""
    model_dir = tmp_path_factory.mktemp("served") / "cats_dogs"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "report.html").write_text(REPORT)
    server, thread, url = start_server(create_app(model_dir, cache_root=cache_dir))
    try:
        yield Served(url, model_dir, headstart.load(model_dir, cache_root=cache_dir))
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def client(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def expected(served: Served) -> dict[Path, Prediction]:
    """`headstart.predict`'s top 2 for each picture and GOOD, read from its file."""
    paths = [*PICTURES, GOOD]
    result = headstart.predict(served.model, paths, top_k=2)
    assert len(result.predictions) == len(paths) and not result.skipped
    return dict(zip(paths, result.predictions))


def assert_same(got: dict[str, Any], want: Prediction) -> None:
    assert got["label"] == want.label
    assert [entry["label"] for entry in got["top_k"]] == [label for label, _ in want.top_k]
    np.testing.assert_allclose([entry["probability"] for entry in got["top_k"]], [p for _, p in want.top_k], rtol=0, atol=1e-6)
    assert got["probability"] == got["top_k"][0]["probability"]


def post_good(client: httpx.Client, expected: dict[Path, Prediction]) -> None:
    """The server still answers a good request, and correctly."""
    response = client.post("/predict", content=GOOD.read_bytes(), headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text
    assert_same(response.json()["predictions"][0], expected[GOOD])


# Predictions


def test_several_photos_in_one_multipart_request_equal_headstart_predict(client: httpx.Client, expected: dict[Path, Prediction]) -> None:
    files = [("file", (path.name, path.read_bytes(), "application/octet-stream")) for path in PICTURES]
    response = client.post("/predict", params={"top_k": 2}, files=files)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["filename"] for p in predictions] == [path.name for path in PICTURES]
    for got, path in zip(predictions, PICTURES):
        assert_same(got, expected[path])


@pytest.mark.parametrize("content_type", ["image/jpeg", "image/png", "application/octet-stream"])
def test_a_raw_body_equals_headstart_predict(client: httpx.Client, expected: dict[Path, Prediction], content_type: str) -> None:
    for path in PICTURES[:3]:
        response = client.post("/predict", content=path.read_bytes(), headers={"Content-Type": content_type})
        assert response.status_code == 200, response.text
        (got,) = response.json()["predictions"]
        assert got["filename"] is None
        assert_same(got, expected[path])


def test_top_k_defaults_to_three_at_most_the_classes(client: httpx.Client) -> None:
    body = GOOD.read_bytes()
    default = client.post("/predict", content=body, headers={"Content-Type": "image/jpeg"}).json()["predictions"][0]
    one = client.post("/predict?top_k=1", content=body, headers={"Content-Type": "image/jpeg"}).json()["predictions"][0]
    assert len(default["top_k"]) == 2  # min(3, two classes)
    assert one["top_k"] == default["top_k"][:1] and one["label"] == default["label"] == "dogs"


def test_fifty_concurrent_requests_are_all_answered_correctly(served: Served, expected: dict[Path, Prediction]) -> None:
    bodies = {path: path.read_bytes() for path in PICTURES}

    def ask(k: int) -> tuple[Path, httpx.Response]:
        path = PICTURES[k % len(PICTURES)]
        with httpx.Client(base_url=served.url, timeout=120) as c:
            return path, c.post("/predict", params={"top_k": 2}, files={"file": (path.name, bodies[path])})

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(ask, range(50)))
    for path, response in answers:
        assert response.status_code == 200, response.text
        (got,) = response.json()["predictions"]
        assert got["filename"] == path.name
        assert_same(got, expected[path])


def test_a_request_abandoned_while_it_waits_its_turn_is_not_decoded(
    served: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    original, release, calls = server.load_image_bytes, threading.Event(), []

    def held(*args: Any, **kwargs: Any) -> Any:  # keeps its turn until released
        calls.append(args)
        release.wait(60)
        return original(*args, **kwargs)

    monkeypatch.setattr(server, "load_image_bytes", held)
    caplog.set_level(logging.INFO, logger="headstart.server")
    n_turns = available_cpus()  # the requests decoded at once
    with ThreadPoolExecutor(n_turns) as pool:
        busy = [pool.submit(httpx.post, served.url + "/predict", **raw(JPEG), timeout=120) for _ in range(n_turns)]
        try:
            deadline = time.monotonic() + 60
            while len(calls) < n_turns:
                assert time.monotonic() < deadline and not any(f.done() for f in busy), [f.result().text for f in busy if f.done()]
                time.sleep(0.01)
            with socket.create_connection(("127.0.0.1", int(served.url.rsplit(":", 1)[1])), timeout=30) as sock:
                sock.sendall(b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/jpeg\r\n")
                sock.sendall(f"Content-Length: {len(JPEG)}\r\n\r\n".encode() + JPEG)
                for _ in range(3):  # round trips: the server has read the request, which now waits its turn
                    assert httpx.get(served.url + "/health", timeout=30).status_code == 200
        finally:
            release.set()  # the client above has gone
        assert [f.result().status_code for f in busy] == [200] * n_turns
    deadline = time.monotonic() + 30
    while not any(" /predict 499 " in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, caplog.text
        time.sleep(0.05)
    assert len(calls) == n_turns  # the abandoned request was never decoded


def test_a_request_abandoned_between_its_images_decodes_no_more(
    served: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    original, left, calls = server.load_image_bytes, threading.Event(), []

    def slow(*args: Any, **kwargs: Any) -> Any:  # the first image decodes until its client has left
        calls.append(args)
        left.wait(60)
        return original(*args, **kwargs)

    monkeypatch.setattr(server, "load_image_bytes", slow)
    caplog.set_level(logging.INFO, logger="headstart.server")
    body = httpx.Request("POST", served.url + "/predict", files=[("file", ("dog.jpg", JPEG))] * 4)
    with socket.create_connection(("127.0.0.1", int(served.url.rsplit(":", 1)[1])), timeout=30) as sock:
        head = f"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: {body.headers['content-type']}\r\n"
        sock.sendall(f"{head}Content-Length: {len(body.read())}\r\n\r\n".encode() + body.read())
        deadline = time.monotonic() + 60
        while not calls:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    for _ in range(3):  # round trips: the server has seen the client leave
        assert httpx.get(served.url + "/health", timeout=30).status_code == 200
    left.set()
    deadline = time.monotonic() + 30
    while not (lines := [r.getMessage() for r in caplog.records if " /predict " in r.getMessage()]):
        assert time.monotonic() < deadline, caplog.text
        time.sleep(0.05)
    assert " /predict 499 " in lines[0] and len(calls) == 1, (lines, len(calls))  # the other three were never decoded


# The other endpoints


def test_health_info_and_page(client: httpx.Client, served: Served) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    model = served.model
    assert info["classes"] == model.classes == ["cats", "dogs"] and info["n_classes"] == 2
    assert info["backbone"] == "efficientnet_lite0" and info["head"] == "linear" and info["input_size"] == 224
    assert model.summary.validation is not None
    assert info["validation"]["accuracy"] == model.summary.validation.accuracy
    assert info["headstart_version"] == headstart.__version__ and info["report"] is True
    assert info["limits"] == {"field": "file", "max_request_bytes": MAX_REQUEST_BYTES, "max_files": MAX_FILES}
    assert client.head("/").status_code == client.head("/health").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'data-testid="file-input"' in page.text and 'name.dataset.testid = "label"' in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)  # nothing loaded from elsewhere: the machine may be offline


def test_the_report_is_the_loaded_models_after_a_retrain(client: httpx.Client, served: Served) -> None:
    found = client.get("/report")
    assert found.status_code == 200 and found.headers["content-type"].startswith("text/html") and found.text == REPORT
    served.model.save(served.model_dir)  # a retrain: a new folder swapped in, the report written after it
    (served.model_dir / "report.html").write_text("<p>the retrained model's report</p>")
    assert client.get("/report").text == REPORT  # the server still answers with the model it loaded
    assert client.get("/info").json()["report"] is True


def test_a_linked_or_missing_report_or_no_report_is_not_served(tiny_model_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    folders = {}
    for case in ("linked", "missing", "switched off"):
        folders[case] = shutil.copytree(tiny_model_dir, tmp_path / case)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the network")
    (folders["linked"] / "report.html").symlink_to(secret)  # a model folder from elsewhere must not expose other files
    (folders["switched off"] / "report.html").write_text(REPORT)
    for case, folder in folders.items():
        server, thread, url = start_server(create_app(folder, cache_root=cache_dir, report=case != "switched off"))
        try:
            with httpx.Client(base_url=url, timeout=60) as c:
                response = c.get("/report")
                assert response.status_code == 404 and "not for the network" not in response.text and "the report" not in response.text
                assert ("--no-report" in response.json()["error"]) == (case == "switched off"), response.text
                assert c.get("/info").json()["report"] is False
        finally:
            server.should_exit = True
            thread.join(30)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io", ""])
def test_a_host_header_naming_another_server_is_refused(client: httpx.Client, host: str) -> None:
    """A page whose DNS name is rebound to 127.0.0.1 sends its own name as the Host; it must not read the service."""
    predict = client.post("/predict", content=JPEG, headers={"Host": host, "Content-Type": "image/jpeg"})
    for response in (client.get("/report", headers={"Host": host}), predict):
        assert response.status_code == 421, response.text
        error = response.json()["error"]
        assert error.isprintable() and "does not answer to the name" in error and "the report" not in response.text


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:8000", "LocalHost.:1", "127.0.0.1", "[::1]:8000", "192.0.2.7:80", socket.gethostname()]
)
def test_loopback_names_ip_addresses_and_the_machines_name_are_served(client: httpx.Client, host: str) -> None:
    assert client.get("/report", headers={"Host": host}).text == REPORT


def test_unknown_paths_and_methods_get_json_errors(client: httpx.Client) -> None:
    missing = client.get("/nothing-here")
    assert missing.status_code == 404 and "/predict" in missing.json()["error"]
    wrong = client.get("/predict")
    assert wrong.status_code == 405 and "POST" in wrong.json()["error"]


# Bad uploads: each a 4xx with one line of JSON, and the server keeps serving


def png(width: int, height: int, rows: bytes | None = None) -> bytes:
    """A 1-bit PNG of `width` x `height`: its header claims the size, the data may be cut short (a bomb's few bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    data = rows if rows is not None else (b"\0" + bytes((width + 7) // 8)) * height
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(data, 1)) + chunk(b"IEND", b"")


def raw(body: bytes, content_type: str | None = "image/jpeg", params: dict[str, str] | None = None) -> dict[str, Any]:
    return {"content": body, "headers": {"Content-Type": content_type} if content_type else {}, "params": params or {}}


def chunks(total: int, size: int = 1 << 20) -> Iterator[bytes]:
    """`total` bytes in pieces, sent chunked (no Content-Length): the server must count them as they come."""
    for start in range(0, total, size):
        yield b"\xff" * min(size, total - start)


def multipart(parts: list[tuple[bytes | None, bytes]], boundary: bytes = b"b0undary") -> tuple[bytes, str]:
    """A multipart body of `file` fields written byte by byte (clients escape file names; here they arrive as they are).

    A part whose file name is None is a text field.
    """
    body = b"".join(
        b"--"
        + boundary
        + b'\r\nContent-Disposition: form-data; name="file"'
        + (b'; filename="' + name + b'"\r\nContent-Type: image/jpeg' if name is not None else b"")
        + b"\r\n\r\n"
        + data
        + b"\r\n"
        for name, data in parts
    )
    return body + b"--" + boundary + b"--\r\n", f"multipart/form-data; boundary={boundary.decode()}"


JPEG = GOOD.read_bytes()
TOO_MUCH = MAX_REQUEST_BYTES + 1024
BAD_UPLOADS: dict[str, tuple[Callable[[], dict[str, Any]], int, str]] = {
    "text as an image": (lambda: raw(b"just some text\n" * 10), 422, "not a readable image: cannot identify image file"),
    "text file in the form": (lambda: {"files": {"file": ("notes.txt", b"hello")}}, 422, "'notes.txt' is not a readable image"),
    "truncated jpeg": (lambda: raw(JPEG[: len(JPEG) // 2]), 422, "truncated"),
    "empty body": (lambda: raw(b""), 400, "The request body is empty"),
    "empty file": (lambda: {"files": {"file": ("empty.jpg", b"")}}, 400, "'empty.jpg' is empty"),
    "decompression bomb": (lambda: raw(png(20000, 20000, rows=b"\0" * 100), "image/png"), 422, "decompression bomb"),
    "too small": (lambda: raw(png(8, 8), "image/png"), 422, "too small"),
    "too many pixels in one image": (lambda: raw(png(8000, 7000, rows=b"\0" * 100), "image/png"), 413, "Too many pixels"),
    "too many pixels in one request": (
        lambda: {"files": [("file", (f"{k}.png", png(7000, 6000, rows=b"\0" * 100))) for k in range(5)]},
        413,
        "Too many pixels at the file '4.png'",
    ),
    "aspect-ratio bomb": (lambda: raw(png(16, 5_000_000, rows=b"\0" * 100), "image/png"), 422, "extreme aspect ratio"),
    "a bad file among good ones": (
        lambda: {"files": [("file", ("a.jpg", JPEG)), ("file", ("b.jpg", b"GIF89a broken")), ("file", ("c.jpg", JPEG))]},
        422,
        "'b.jpg' is not a readable image",
    ),
    "wrong field name": (lambda: {"files": {"image": ("a.jpg", JPEG)}}, 400, "No file in the field 'file' (fields sent: 'image')"),
    "text in the file field": (lambda: raw(*multipart([(None, b"a.jpg")])), 400, "The field 'file' holds text"),
    "no boundary": (lambda: raw(b"--x\r\n\r\n", "multipart/form-data"), 400, "Malformed multipart/form-data body"),
    "form-urlencoded": (lambda: {"data": {"file": "x"}}, 415, "application/x-www-form-urlencoded"),
    "json": (lambda: raw(b'{"file": 1}', "application/json"), 415, "Content-Type 'application/json'"),
    "no content type": (lambda: raw(JPEG, None), 415, "no Content-Type"),
    "too many files": (lambda: {"files": [("file", (f"{k}.jpg", JPEG)) for k in range(MAX_FILES + 1)]}, 413, f"at most {MAX_FILES}"),
    "too large, declared": (lambda: raw(b"\xff" * TOO_MUCH), 413, f"{TOO_MUCH:,} bytes"),
    "too large, chunked": (lambda: raw(b"") | {"content": chunks(TOO_MUCH)}, 413, f"more than the {MAX_REQUEST_BYTES:,} bytes"),
    "too large, multipart": (lambda: {"files": {"file": ("big.jpg", b"\xff" * TOO_MUCH)}}, 413, f"more than the {MAX_REQUEST_BYTES:,}"),
    "top_k 0": (lambda: raw(JPEG, params={"top_k": "0"}), 422, "top_k must be an integer from 1 to 2 (the model's classes), got '0'"),
    "top_k above the classes": (lambda: raw(JPEG, params={"top_k": "3"}), 422, "got '3'"),
    "top_k not a number": (lambda: raw(JPEG, params={"top_k": "two\n"}), 422, "got 'two\\x0a'"),
}


@pytest.mark.parametrize("case", BAD_UPLOADS, ids=str)
def test_a_bad_upload_gets_one_line_of_json_and_the_server_keeps_serving(
    client: httpx.Client, expected: dict[Path, Prediction], case: str
) -> None:
    make, status, message = BAD_UPLOADS[case]
    response = client.post("/predict", **make())
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"] and message in body["error"], body
    assert body["error"].isprintable() and "Traceback" not in body["error"]
    post_good(client, expected)


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(served: Served) -> None:
    port = int(served.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/jpeg\r\nContent-Length: 10000000000\r\n\r\n")
        reply = b""
        while b'"}' not in reply and (data := sock.recv(65536)):
            reply += data
    assert reply.startswith(b"HTTP/1.1 413 ") and b'{"error":"The request body is 10,000,000,000 bytes' in reply


def test_hostile_file_names_come_back_safely(client: httpx.Client) -> None:
    names = [
        b"<img src=x onerror=alert(1)>.jpg",
        b"$\\frac{a}{b}$ [bold]x[/bold] &amp;.jpg",
        b"esc\x1b[31mred\tand\x7fdel.jpg",
        "caf\u00e9 \u202eevil.jpg".encode(),
        b"not utf-8 \xff\xfe.jpg",
    ]
    body, content_type = multipart([(name, JPEG) for name in names])
    response = client.post("/predict", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    assert response.content.isascii()  # every character beyond ASCII escaped in the JSON
    filenames = [p["filename"] for p in response.json()["predictions"]]
    assert filenames[:4] == [name.decode() for name in names[:4]]
    assert filenames[4] == "not utf-8 \xff\xfe.jpg"  # not UTF-8: read as Latin-1, as Starlette does


def test_a_hostile_name_in_an_error_is_escaped_onto_one_line(client: httpx.Client) -> None:
    body, content_type = multipart([(b"bad\x1b[2J\x0bname <b>.txt", b"not an image")])
    response = client.post("/predict", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error.isprintable() and "'bad\\x1b[2J\\x0bname <b>.txt' is not a readable image" in error


# The served process


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.subprocess
def test_the_serving_process_never_loads_torch_and_logs_one_line_per_request(tiny_model_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HEADSTART_CACHE_DIR": str(cache_dir)}  # where the tiny model's backbone was exported
    port = _free_port()
    cli = subprocess.run([sys.executable, "-m", "headstart.cli.main", "serve", "--help"], capture_output=True, env=env, timeout=120)
    if cli.returncode == 0:
        command = [sys.executable, "-m", "headstart.cli.main", "serve", str(tiny_model_dir), "--port", str(port)]
    else:  # before `headstart serve` is wired into the CLI
        script = "import sys; from pathlib import Path; from headstart.server import run; run(Path(sys.argv[1]), port=int(sys.argv[2]))"
        command = [sys.executable, "-c", script, str(tiny_model_dir), str(port)]
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(process, url, stderr_path)
        with httpx.Client(base_url=url, timeout=120) as client:
            assert client.get("/info").status_code == 200
            assert client.get("/").status_code == 200
            files = [("file", (path.name, path.read_bytes())) for path in PICTURES[:3]]
            assert client.post("/predict", files=files).status_code == 200
            assert client.post("/predict", content=JPEG, headers={"Content-Type": "image/jpeg"}).status_code == 200
            assert client.post("/predict", content=b"nope", headers={"Content-Type": "image/jpeg"}).status_code == 422
            assert client.get("/report").status_code == 404
        maps = Path(f"/proc/{process.pid}/maps").read_text()
        assert "onnxruntime" in maps  # the maps are the server's: its engine is loaded
        assert "libtorch" not in maps and "/torch/" not in maps
    finally:
        process.send_signal(signal.SIGINT)
        stdout, _ = process.communicate(timeout=60)
    log = stderr_path.read_text()
    assert process.returncode == 0, log
    assert f"at {url}/" in stdout.decode()
    requests = [match.groups() for line in log.splitlines() if (match := LOG_LINE.match(line))]
    assert requests == [
        ("GET", "/health", "200", "0"),
        ("GET", "/info", "200", "0"),
        ("GET", "/", "200", "0"),
        ("POST", "/predict", "200", "3"),
        ("POST", "/predict", "200", "1"),
        ("POST", "/predict", "422", "1"),
        ("GET", "/report", "404", "0"),
    ]
    assert not re.search(r'"(GET|POST) /', log)  # no access log of uvicorn's own beside ours
    assert "Traceback" not in log
