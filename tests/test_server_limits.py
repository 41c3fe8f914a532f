"""`headstart serve` under hostile connections: slow clients past the descriptor limit, stalled uploads, log floods.

The server runs as `headstart.server.run` in a process of its own with an open-file limit of 256: once with its
own deadlines (the crowd must be handled by making room, not by waiting them out), once with short ones.
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

from conftest import CATS_DOGS_TINY, wait_until_serving
from headstart.server import MAX_BYTES_IN_FLIGHT, _exposure, _RateLimit

FILE_LIMIT = 256
HEAD_TIMEOUT = 2.0
BODY_TIMEOUT = 3.0
SEND_TIMEOUT = 2.0
REPORT = b"<!doctype html><title>report</title>" + b"<p>" * (8 << 20)  # 24 MiB
SERVE = """
import resource, sys
from pathlib import Path
from headstart import server

resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[3]), int(sys.argv[3])))
if len(sys.argv) > 4:
    server.HEAD_TIMEOUT, server.BODY_TIMEOUT, server.SEND_TIMEOUT = map(float, sys.argv[4:])
server.run(Path(sys.argv[1]), port=int(sys.argv[2]))
"""
JPEG = (CATS_DOGS_TINY / "val" / "dogs" / "dog.4001.jpg").read_bytes()


@dataclass(frozen=True)
class Served:
    port: int
    pid: int
    stderr: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def serving(model_dir: Path, cache_dir: Path, root: Path, deadlines: tuple[float, ...] = ()) -> Iterator[Served]:
    """`model_dir` served by `run` in a process of its own, with at most FILE_LIMIT open files (and `deadlines`)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    stderr_path = root / "stderr.txt"
    env = {**os.environ, "HEADSTART_CACHE_DIR": str(cache_dir)}  # where the tiny model's backbone was exported
    command = [sys.executable, "-c", SERVE, str(model_dir), str(port), str(FILE_LIMIT), *map(str, deadlines)]
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    try:
        wait_until_serving(process, f"http://127.0.0.1:{port}", stderr_path)
        yield Served(port, process.pid, stderr_path)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, with a large report."""
    model_dir = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("limits") / "model")
    (model_dir / "report.html").write_bytes(REPORT)
    return model_dir


@pytest.fixture(scope="module")
def crowded(model_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The server with its own deadlines."""
    with serving(model_dir, cache_dir, tmp_path_factory.mktemp("crowded")) as served:
        yield served


@pytest.fixture(scope="module")
def guarded(model_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The server with deadlines of a few seconds."""
    with serving(model_dir, cache_dir, tmp_path_factory.mktemp("guarded"), (HEAD_TIMEOUT, BODY_TIMEOUT, SEND_TIMEOUT)) as served:
        yield served


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


SLOW_CLIENTS = {  # what each sends, and then nothing
    "a head without its end": b"GET /health HTTP/1.1\r\nHost: localhost\r\n",
    "a head and one byte of its body": b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/jpeg\r\nContent-Length: 9999\r\n\r\n\xff",
    "a request for the report, never read": b"GET /report HTTP/1.1\r\nHost: localhost\r\n\r\n",
}


def open_slow_clients(port: int, kind: str, n_clients: int) -> list[socket.socket]:
    sockets = []
    try:
        for _ in range(n_clients):
            sock = socket.socket()
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(10)
            sock.connect(("127.0.0.1", port))
            sock.sendall(SLOW_CLIENTS[kind])
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


@pytest.mark.parametrize("kind", SLOW_CLIENTS)
def test_slow_clients_past_the_descriptor_limit_leave_the_server_answering(crowded: Served, kind: str) -> None:
    sockets = open_slow_clients(crowded.port, kind, 2 * FILE_LIMIT)
    try:
        time.sleep(1)  # they send nothing more
        for _ in range(5):  # answered throughout, long before any deadline: a connection waiting on its client makes room
            assert httpx.get(crowded.url + "/health", timeout=30).json() == {"status": "ok"}  # (after the crowd's requests)
    finally:
        for sock in sockets:
            sock.close()
    assert "Traceback" not in crowded.stderr.read_text()


@pytest.mark.parametrize("kind", list(SLOW_CLIENTS)[:2])
def test_slow_clients_are_dropped_at_their_deadlines(guarded: Served, kind: str) -> None:
    sockets = open_slow_clients(guarded.port, kind, 20)
    try:
        deadline = time.monotonic() + max(HEAD_TIMEOUT, BODY_TIMEOUT) + 30
        for sock in sockets:
            with contextlib.suppress(ConnectionResetError):
                while True:
                    sock.settimeout(max(0.1, deadline - time.monotonic()))
                    if not sock.recv(65536):  # a slow body is answered 408 first
                        break
    finally:
        for sock in sockets:
            sock.close()


def test_invalid_requests_are_answered_and_logged_ten_a_minute(crowded: Served) -> None:
    logged_before = len(crowded.stderr.read_text())
    for _ in range(100):
        with socket.create_connection(("127.0.0.1", crowded.port), timeout=10) as sock:
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")  # uvicorn's warning, logged each time
    log = crowded.stderr.read_text()[logged_before:]
    assert "Traceback" not in log and len(log) < 2_000, log[:2000]
    assert 1 <= log.count("Invalid HTTP request") <= 10


def test_stalled_uploads_hold_at_most_the_budget_then_time_out(guarded: Served) -> None:
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


def test_clients_that_stop_reading_a_large_response_hold_little_and_are_dropped(guarded: Served) -> None:
    n_clients = 20  # 480 MiB of reports asked for, none of them read
    before = rss(guarded.pid)
    sockets = open_slow_clients(guarded.port, "a request for the report, never read", n_clients)
    try:
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
