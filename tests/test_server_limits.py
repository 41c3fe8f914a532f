"""`headstart serve` under hostile connections: half-open sockets past the descriptor limit, stalled uploads, log floods.

The server runs as `headstart.server.run` in its own process, with an open-file limit of 256 and short deadlines.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from conftest import CATS_DOGS_TINY
from headstart.server import MAX_BYTES_IN_FLIGHT, _exposure, _RateLimit

FILE_LIMIT = 256
HEAD_TIMEOUT = 2.0
BODY_TIMEOUT = 3.0
SEND_TIMEOUT = 2.0
REPORT = b"<!doctype html><title>report</title>" + b"<p>" * (8 << 20)  # 24 MiB
SERVE = f"""
import resource, sys
from pathlib import Path
from headstart import server

resource.setrlimit(resource.RLIMIT_NOFILE, ({FILE_LIMIT}, {FILE_LIMIT}))
server.HEAD_TIMEOUT, server.BODY_TIMEOUT, server.SEND_TIMEOUT = {HEAD_TIMEOUT}, {BODY_TIMEOUT}, {SEND_TIMEOUT}
server.run(Path(sys.argv[1]), port=int(sys.argv[2]))
"""
JPEG = (CATS_DOGS_TINY / "val" / "dogs" / "dog.4001.jpg").read_bytes()


@dataclass(frozen=True)
class Guarded:
    port: int
    pid: int
    stderr: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def guarded(tiny_model_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guarded]:
    """The tiny model, with a large report, served by `run` in a process of its own."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = tmp_path_factory.mktemp("guarded")
    model_dir = shutil.copytree(tiny_model_dir, root / "model")
    (model_dir / "report.html").write_bytes(REPORT)
    stderr_path = root / "stderr.txt"
    env = {**os.environ, "HEADSTART_CACHE_DIR": str(cache_dir)}  # where the tiny model's backbone was exported
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(model_dir), str(port)], stdout=subprocess.DEVNULL, stderr=stderr, env=env
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, stderr_path.read_text()
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield Guarded(port, process.pid, stderr_path)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def rss(pid: int) -> int:
    """The process's resident memory in bytes."""
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    assert match
    return int(match[1]) * 1024


def answer(sock: socket.socket, deadline: float) -> tuple[int, bytes]:
    """The status and body of the one response on `sock`, read before `deadline` (time.monotonic)."""
    reply = b""
    while not reply.endswith(b"}"):
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        data = sock.recv(65536)
        assert data, f"closed without an answer: {reply!r}"
        reply += data
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_half_open_connections_past_the_descriptor_limit_leave_the_server_answering(guarded: Guarded) -> None:
    sockets = []
    try:
        for _ in range(2 * FILE_LIMIT):
            sock = socket.create_connection(("127.0.0.1", guarded.port), timeout=10)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")  # the head never ends
            sockets.append(sock)
        for _ in range(5):  # answered throughout: the connection waiting longest for its head makes room
            assert httpx.get(guarded.url + "/health", timeout=5).json() == {"status": "ok"}
        deadline = time.monotonic() + HEAD_TIMEOUT + 30
        for sock in sockets:  # and each slow client is dropped, within HEAD_TIMEOUT or to make room
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ConnectionResetError):  # closed with data unread: a reset
                assert sock.recv(1) == b""
    finally:
        for sock in sockets:
            sock.close()
    for _ in range(100):
        with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as sock:
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")  # uvicorn's warning, logged each time
    log = guarded.stderr.read_text()
    assert "Traceback" not in log and len(log) < 10_000, log[:2000]
    assert 1 <= log.count("Invalid HTTP request") <= 10  # rate-limited


def test_stalled_uploads_hold_at_most_the_budget_then_time_out(guarded: Guarded) -> None:
    body = b"\xff" * (19 << 20)
    n_clients = 40  # 760 MiB of bodies, none of them finished (held in full before the budget)
    before = rss(guarded.pid)

    def stall(_: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", guarded.port), timeout=60)
        head = f"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/jpeg\r\nContent-Length: {len(body) + 1}\r\n\r\n"
        sock.sendall(head.encode() + body)  # one byte short
        return sock

    with ThreadPoolExecutor(n_clients) as pool:
        sockets = list(pool.map(stall, range(n_clients)))
    try:
        held = rss(guarded.pid) - before
        assert held < 3 * MAX_BYTES_IN_FLIGHT, f"{held / 2**20:.0f} MiB held for {n_clients} stalled uploads"
        deadline = time.monotonic() + BODY_TIMEOUT + 30
        answers = [answer(sock, deadline) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    statuses = {status for status, _ in answers}
    assert statuses == {408, 503}, answers  # past the budget: 503 at once; within it: 408 after BODY_TIMEOUT
    assert all(re.fullmatch(rb'\{"error":"[ -~]+"\}', body) for _, body in answers)
    response = httpx.post(guarded.url + "/predict", content=JPEG, headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert response.status_code == 200, response.text  # the budget was given back


def test_clients_that_stop_reading_a_large_response_hold_little_and_are_dropped(guarded: Guarded) -> None:
    n_clients = 20  # 480 MiB of reports asked for, none of them read
    before = rss(guarded.pid)
    sockets = []
    try:
        for _ in range(n_clients):
            sock = socket.socket()
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", guarded.port))
            sock.sendall(b"GET /report HTTP/1.1\r\nHost: localhost\r\n\r\n")
        for _ in range(3):  # round trips: the server has answered each of them, as far as it could
            assert httpx.get(guarded.url + "/health", timeout=30).status_code == 200
        held = rss(guarded.pid) - before
        assert held < 64 << 20, f"{held / 2**20:.0f} MiB held for {n_clients} clients that read nothing"
        with socket.create_connection(("127.0.0.1", guarded.port), timeout=30) as reader:  # one that reads, with pauses
            reader.sendall(b"GET /report HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            reply = bytearray()
            while data := reader.recv(1 << 20):
                reply += data
                time.sleep(0.05)
            assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(REPORT)
        time.sleep(3 * SEND_TIMEOUT)  # the other clients read nothing meanwhile
        for sock in sockets:
            received = 0
            sock.settimeout(30)
            with contextlib.suppress(ConnectionResetError):
                while data := sock.recv(1 << 20):
                    received += len(data)
            assert received < len(REPORT)  # dropped: only what the kernels had buffered arrives
    finally:
        for sock in sockets:
            sock.close()


def test_repeated_warnings_are_logged_ten_a_minute_then_counted() -> None:
    now = [0.0]
    limit = _RateLimit(clock=lambda: now[0])

    def record(message: str, level: int = logging.WARNING, line: int = 1) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", level, "uvicorn/protocols.py", line, message, None, None)

    passed = [limit.filter(record("Invalid HTTP request received.")) for _ in range(1000)]
    assert passed == [True] * 10 + [False] * 990
    assert limit.filter(record("another line of code", line=2)) and limit.filter(record("GET /health 200", logging.INFO))
    now[0] = 61.0
    late = record("Invalid HTTP request received.")
    assert (
        limit.filter(late) and late.getMessage() == "Invalid HTTP request received. (990 more like this in the last 61 s were not logged)"
    )


@pytest.mark.parametrize(
    ("address", "warned"),
    [("127.0.0.1", False), ("::1", False), ("::ffff:127.0.0.1", False), ("0.0.0.0", True), ("::", True), ("192.0.2.7", True)],
)
def test_listening_beyond_loopback_is_warned_about(address: str, warned: bool) -> None:
    warning = _exposure(address, report=True)
    assert (warning is not None) == warned
    if warning is not None:
        assert "no authentication" in warning and "training photos" in warning and "--no-report" in warning
        assert "/report" not in (_exposure(address, report=False) or "")
