"""`headstart serve`: an HTTP service, and a web page, to try a saved model.

The model is loaded once, its ONNX Runtime engine warmed up, and each request
is decoded exactly as `headstart predict FILE` decodes a file (the same limits,
large JPEGs at reduced scale), so the server's probabilities equal the CLI's.
An ensemble's uploads are decoded once and preprocessed for each backbone.
No PyTorch is imported for a frozen-backbone model whose engine is already
exported (a first use exports it once, which imports PyTorch).

Endpoints:
    POST /predict?top_k=3  one or more images as multipart/form-data, each a file in
        the field `file` (repeat the field for several), or one image as the raw body
        (Content-Type image/* or application/octet-stream). Returns
        `{"predictions": [{"filename", "label", "probability", "top_k": [{"label", "probability"}, ...]}]}`,
        in upload order; `filename` is null for a raw body. `top_k` defaults to 3 (at most the classes).
    GET /health  `{"status": "ok"}`.
    GET /info  classes, backbone ("a+b" for an ensemble), head, input size (null for an ensemble),
        each backbone's name and sizes, validation scores (null when none), headstart version,
        whether there is a report, and the upload limits.
    GET /  the page: drop, pick or photograph images and see their top classes.
    GET /report  the report.html that was beside the model when it was loaded (a retrain's new report is
        served only once the server is restarted on the new model); off with `report=False` (`--no-report`).

Limits: at most `MAX_REQUEST_BYTES` (20 MiB) of body per request, counted while
it streams in (a larger Content-Length is refused before reading), at most
`MAX_FILES` (16) images per request, and, read from the images' headers before any
is decoded, at most `MAX_IMAGE_PIXELS` (50 MP) per image and `MAX_REQUEST_PIXELS`
(200 MP) per request. Each image is held to headstart's decoding
limits (at most 89 megapixels, at least 16 pixels on a side, at most 20:1);
decoding here has no time limit (headstart's uses a signal, which only the main
thread gets), so those pixel limits bound its work. At most one request per CPU
is decoded and run through the model at a time; the others wait their turn. A request
whose client has gone, while it waits or between its images, decodes no more (a 499).
The bodies being received or waiting, across requests, hold at most `MAX_BYTES_IN_FLIGHT`
(128 MiB) at once, and each body must arrive within `BODY_TIMEOUT` (60 s).

Only requests whose Host header names the server are answered: localhost, an IP address,
the machine's name, or the name it was started with (`host`); a web page elsewhere cannot
read it through a DNS name of its own (DNS rebinding).

`run` also guards the connections: a request head must arrive within `HEAD_TIMEOUT` (10 s)
of the connection (or of the previous response), a response the client has stopped reading
must move within `SEND_TIMEOUT` (60 s), and the server holds fewer connections than its
open-file limit allows, making room by closing the one that has waited longest on its
client (for a request's head or body, or to read a response). Repeated warnings are
logged at most ten a minute each. The report is sent in pieces, so a client that reads
slowly holds one piece of it, not a copy.

Errors are JSON, `{"error": "<one line naming the problem and what to send>"}`:
    400  a malformed multipart body, no file in the field `file`, an empty body or file.
    404  an unknown path, or /report for a model without a report (or with `report=False`).
    405  a method the path does not take.
    408  a body that did not arrive within `BODY_TIMEOUT`; the connection is closed.
    413  a body over 20 MiB, more than 16 files, or more pixels than the limits above.
    415  a Content-Type other than multipart/form-data, image/* or application/octet-stream.
    421  a Host header naming another server (see above).
    422  `top_k` not an integer from 1 to the number of classes; an upload that is not a
        decodable image (not an image, truncated, a decompression bomb, too small or too elongated).
    499  (in the log only) the client disconnected before its answer.
    500  a bug; the traceback goes to the server's log, never to the client.
    503  the server already holds `MAX_BYTES_IN_FLIGHT` of uploads; retry after a few seconds.
A request that fails leaves the server serving the next one.

Strings are JSON as Python writes them with `ensure_ascii`: the undecodable bytes
of a non-UTF-8 class folder come back as the same `\\udcXX` escapes that bundle.json
holds, so a label always equals one of `model.classes`.

Each request is logged as one line on stderr (method, path, status, milliseconds,
number of images); uvicorn's own access log is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.resources
import io
import ipaddress
import json
import logging
import os
import socket
import stat
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal

import anyio
import anyio.from_thread
import anyio.to_thread
import h11
import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from headstart import __version__
from headstart.bundle import REPORT_NAME
from headstart.config import default_cache_dir
from headstart.data import load_image_bytes, open_image, size_problem
from headstart.errors import BundleError, ConfigError, UnreadableImageError
from headstart.files import display, read_regular
from headstart.model import Model, Prediction, load
from headstart.pipeline import available_cpus

MAX_REQUEST_BYTES = 20 * 1024 * 1024
MAX_FILES = 16
MAX_IMAGE_PIXELS = 50_000_000  # a 50-megapixel photo; headstart's own limit (89 MP) would let one upload take 2 GB to decode
MAX_REQUEST_PIXELS = 200_000_000  # bounds one request's decoding to a few seconds, as a request's CPU is held while it decodes
MAX_REPORT_BYTES = 64 << 20
MAX_BYTES_IN_FLIGHT = 128 << 20  # request bodies held at once, across requests: six of the largest
HEAD_TIMEOUT = 10.0  # seconds for a request's head, from the connection or the previous response
BODY_TIMEOUT = 60.0  # seconds for a request's body, from its head
SEND_TIMEOUT = 60.0  # seconds a response may wait for the client to read enough for the next write (as nginx's send_timeout)
_CHUNK_BYTES = 1 << 16  # a large response is sent in pieces of this size, each once the client has read enough
_SPOOL_BYTES = 1 << 20  # a multipart file part larger than this is spooled to a temporary file (Starlette's), which takes a descriptor
_FILES_RESERVED = 64 + MAX_BYTES_IN_FLIGHT // _SPOOL_BYTES  # descriptors kept from connections: the process's own and the spooled parts
FIELD = "file"
DEFAULT_TOP_K = 3
_MAX_TEXT_FIELD_BYTES = 64 * 1024  # non-file multipart fields: they are read into memory
_PAGE_HEADERS = {
    # The page loads nothing from elsewhere; its own inline script and style, thumbnails as blob: URLs.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' blob: data:; "
        "media-src 'self' blob: mediastream:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_WHAT_TO_SEND = f"send images as multipart/form-data in the field '{FIELD}', or one image as the body with Content-Type image/*"

logger = logging.getLogger("headstart.server")


class AsciiJSONResponse(Response):
    """JSON as bundle.json is written (`ensure_ascii`): any Python string, lone surrogates included, is valid ASCII JSON."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class _BodyTooLarge(Exception):
    """The request body passed `MAX_REQUEST_BYTES` while streaming in."""


class _ServerBusy(Exception):
    """The request bodies held passed `MAX_BYTES_IN_FLIGHT`."""


def create_app(model_dir: Path, cache_root: Path | None = None, host: str = "127.0.0.1", report: bool = True) -> FastAPI:
    """The service for the model saved in `model_dir`, loaded and warmed up before this returns.

    Args:
        model_dir: a folder written by `headstart train --out` or `Model.save`.
        cache_root: the cache holding the backbone's exported ONNX engine (default: `default_cache_dir()`).
        host: the name or address the service is reached at; Host headers may name it, besides localhost,
            an IP address and the machine's name.
        report: serve the model's report.html at /report (it shows training photos and their paths).

    Raises:
        BundleError: `model_dir` is not a valid model.

    Examples:
        >>> app = create_app(Path("my-model"))  # doctest: +SKIP
        >>> uvicorn.run(app, port=8000)  # doctest: +SKIP
    """
    model_dir = Path(model_dir)
    model, report_page = _load(model_dir, cache_root if cache_root is not None else default_cache_dir(), report)
    model.features(
        [np.zeros((1, 3, c.input_size, c.input_size), np.float32) for c in model.data_configs]
    )  # sessions created, first run's allocations made
    page = importlib.resources.files("headstart").joinpath("page.html").read_text(encoding="utf-8")
    limiter = anyio.CapacityLimiter(available_cpus())  # decoding and inference at once; the rest wait without a thread
    budget = _Budget(MAX_BYTES_IN_FLIGHT)
    n_classes = len(model.classes)

    app = FastAPI(title="headstart", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_HostCheck, names=_served_names(host))
    app.add_middleware(_RequestLog)  # the outermost: refused hosts are logged too
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        top_k = _top_k(request.query_params.get("top_k"), n_classes)
        with _Meter(request.receive, budget) as meter:
            uploads = await _read_uploads(request, meter)
            request.state.n_images = len(uploads)
            async with limiter:  # a request abandoned while it waits its turn, or between images, decodes no more
                gone = functools.partial(anyio.from_thread.run, request.is_disconnected)
                predictions = await anyio.to_thread.run_sync(_predict, model, uploads, top_k, gone)
        return AsciiJSONResponse({"predictions": predictions})

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD for uptime checks
    async def health() -> Response:
        return AsciiJSONResponse({"status": "ok"})

    @app.get("/info")
    async def info() -> Response:
        return AsciiJSONResponse(_info(model, isinstance(report_page, bytes)))

    @app.api_route("/", methods=["GET", "HEAD"])  # HEAD for uptime checks
    async def index() -> Response:
        return HTMLResponse(page, headers=_PAGE_HEADERS)

    @app.get("/report")
    async def show_report() -> Response:
        if not isinstance(report_page, bytes):
            raise HTTPException(404, report_page)
        return StreamingResponse(  # in pieces: a client that reads slowly holds a piece of it, not a copy
            _pieces(report_page), media_type="text/html; charset=utf-8", headers={"Content-Length": str(len(report_page))}
        )

    return app


def run(model_dir: Path, host: str = "127.0.0.1", port: int = 8000, cache_root: Path | None = None, report: bool = True) -> None:
    """Serve the model in `model_dir` at http://host:port/ until interrupted (Ctrl-C); prints the URL once listening.

    `port` 0 picks a free port. Requests are logged to stderr, one line each. A `host` beyond
    loopback is warned about: anyone who can reach it may use the model, and read /report
    unless `report` is off.

    Raises:
        BundleError: `model_dir` is not a valid model.
        ConfigError: the address cannot be listened on (the port is taken, say).
    """
    gate = _Gate(_connection_cap())
    sock = _listen(host, port, gate)  # first: a port in use is reported before the model loads
    try:
        app = create_app(model_dir, cache_root, host, report)
    except BaseException:
        sock.close()
        raise
    connection = type("_GatedConnection", (_Connection,), {"gate": gate})
    config = uvicorn.Config(app, http=connection, log_config=_log_config(), access_log=False, ws="none", timeout_graceful_shutdown=5)
    address = sock.getsockname()
    shown_host = f"[{address[0]}]" if sock.family == socket.AF_INET6 else address[0]
    print(f"headstart: serving {display(model_dir)} at http://{shown_host}:{address[1]}/ (Ctrl-C to stop)", flush=True)
    if (warning := _exposure(address[0], report)) is not None:
        logger.warning(warning)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn shuts down, then raises the Ctrl-C again
        uvicorn.Server(config).run(sockets=[sock])


def _load(model_dir: Path, cache_root: Path, report: bool) -> tuple[Model, bytes | str]:
    """The model in `model_dir`, and its report page or the reason (for a 404) there is none.

    The report is read from the folder the model was loaded from: a save (a retrain) swaps in a
    whole new folder, so the folder is opened before the model is loaded and the report read
    through it; a swap during the load loads again.
    """
    for _ in range(3):
        try:
            fd = os.open(model_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError as e:
            load(model_dir, cache_root=cache_root)  # raises BundleError, naming the problem (no such folder, say)
            raise BundleError(f"{model_dir}: cannot be opened ({e.strerror}).") from None
        try:
            model = load(model_dir, cache_root=cache_root)
            with contextlib.suppress(OSError):  # the folder gone meanwhile: swapped, loaded again
                if os.path.samestat(os.fstat(fd), os.stat(model_dir)):
                    if not report:
                        return model, f"This server does not show the model's {REPORT_NAME} (it was started with --no-report)."
                    return model, _read_report(model_dir, fd)
        finally:
            os.close(fd)
    raise BundleError(f"{model_dir}: the model folder kept being replaced while it was loaded; serve it once its training has finished.")


def _read_report(model_dir: Path, fd: int) -> bytes | str:
    """The report.html in the open folder `fd`, or why there is none."""
    try:
        if stat.S_ISLNK(os.stat(REPORT_NAME, dir_fd=fd, follow_symlinks=False).st_mode):  # a link could show any file the server can read
            raise FileNotFoundError
        return read_regular(model_dir / REPORT_NAME, MAX_REPORT_BYTES, fd)
    except FileNotFoundError:
        return f"This model has no {REPORT_NAME}; `headstart report MODEL` writes one (then restart the server)."
    except OSError as e:
        return f"This model's {REPORT_NAME} cannot be read ({display(str(e))})."


def _connection_cap() -> int:
    """How many connections to hold at once: the open-file limit less `_FILES_RESERVED`."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(8, (soft if soft != resource.RLIM_INFINITY else 1 << 16) - _FILES_RESERVED)


def _listen(host: str, port: int, gate: _Gate) -> _Listener:
    """A socket bound to (host, port) and listening, accepting through `gate`."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = _Listener(family, kind, proto)
        sock.gate = gate
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
    except OSError as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise ConfigError(f"Cannot listen on {display(host)}:{port}: {reason}. Choose another --port or --host.") from None
    return sock


def _exposure(address: str, report: bool) -> str | None:
    """The start-up warning for a server listening on `address` (an IP address), if that is beyond loopback."""
    ip = ipaddress.ip_address(address.partition("%")[0])
    shown = f"[{address}]" if ip.version == 6 else address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return None
    report_too = ", and read /report, which shows training photos and their paths (--no-report switches it off)" if report else ""
    return f"Warning: listening on {shown}, beyond this machine: anyone who can reach it can use the model, with no authentication{report_too}."


async def _pieces(data: bytes) -> AsyncIterator[bytes]:
    """`data` in pieces of `_CHUNK_BYTES`: the server sends each once the client has read most of the one before."""
    for start in range(0, len(data), _CHUNK_BYTES):
        yield data[start : start + _CHUNK_BYTES]


def _log_config() -> dict[str, Any]:
    """Request lines from `headstart.server`, and its, uvicorn's and asyncio's warnings and errors (rate-limited), on stderr."""
    stderr = {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr", "filters": ["rate_limit"]}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(message)s", "datefmt": "%H:%M:%S"}},
        "filters": {"rate_limit": {"()": _RateLimit}},
        "handlers": {"stderr": stderr},
        "loggers": {
            "headstart.server": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            "asyncio": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
        },
    }


class _RateLimit(logging.Filter):
    """Lets through at most `burst` warnings and errors a minute from each line of code that logs them;
    the first one after that minute says how many were held back. Request lines (info) all pass."""

    def __init__(self, burst: int = 10, period: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst, self.period, self.clock = burst, period, clock
        self._windows: dict[tuple[str, int], tuple[float, int]] = {}  # (file, line) -> (window start, records in it)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.pathname, record.lineno)
        now = self.clock()
        start, count = self._windows.get(key, (now, 0))
        if now - start >= self.period:
            if count > self.burst:
                record.msg = f"{record.msg} ({count - self.burst:,} more like this in the last {now - start:.0f} s were not logged)"
            start, count = now, 0
        self._windows[key] = (start, count + 1)
        return count < self.burst


def _info(model: Model, report: bool) -> dict[str, Any]:
    single = model.backbones[0] if len(model.backbones) == 1 else None
    validation = model.summary.validation
    return {
        "classes": model.classes,
        "n_classes": len(model.classes),
        "backbone": model.backbone_name,
        "layer": single.layer if single else None,
        "head": model.head.kind,
        "strategy": model.summary.strategy,
        "input_size": single.data_config.input_size if single else None,
        "resize_size": single.data_config.resize_size if single else None,
        "backbones": [
            {"name": b.name, "n_features": b.n_features, "input_size": b.data_config.input_size, "resize_size": b.data_config.resize_size}
            for b in model.backbones
        ],
        "validation": validation.to_dict() if validation else None,
        "headstart_version": __version__,
        "report": report,
        "limits": {"field": FIELD, "max_request_bytes": MAX_REQUEST_BYTES, "max_files": MAX_FILES},
    }


def _top_k(value: str | None, n_classes: int) -> int:
    """The `top_k` query parameter, 1..n_classes.

    Raises:
        HTTPException: 422 when it is not such an integer.
    """
    if value is None:
        return min(DEFAULT_TOP_K, n_classes)
    try:
        top_k = int(value.strip())
    except ValueError:
        top_k = 0
    if not 1 <= top_k <= n_classes:
        raise HTTPException(422, f"top_k must be an integer from 1 to {n_classes} (the model's classes), got '{display(value[:40])}'.")
    return top_k


async def _read_uploads(request: Request, receive: Receive) -> list[tuple[str | None, bytes]]:
    """The uploaded images as (filename, bytes): the `file` fields of a multipart body, or the raw body (filename None).

    The body is read through `receive` (a `_Meter`), within `BODY_TIMEOUT`.

    Raises:
        HTTPException: 400, 408, 413, 415 or 503 (see the module docstring); 499 when the client disconnected.
    """
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.strip().isdigit() and int(declared) > MAX_REQUEST_BYTES:
        raise HTTPException(
            413, f"The request body is {int(declared):,} bytes, more than the {MAX_REQUEST_BYTES:,} allowed; send fewer or smaller images."
        )
    limited = Request(request.scope, receive)
    try:
        with anyio.fail_after(BODY_TIMEOUT):
            if media_type == "multipart/form-data":
                uploads = await _read_form(limited)
            elif media_type.startswith("image/") or media_type == "application/octet-stream":
                body = bytearray()
                async for chunk in limited.stream():
                    body += chunk
                uploads = [(None, bytes(body))]
            else:
                got = f"Content-Type '{display(media_type[:80])}'" if media_type else "no Content-Type"
                raise HTTPException(415, f"Unsupported upload: {got}; {_WHAT_TO_SEND}.")
    except _BodyTooLarge:
        raise HTTPException(
            413, f"The request body is more than the {MAX_REQUEST_BYTES:,} bytes allowed; send fewer or smaller images."
        ) from None
    except _ServerBusy:
        raise HTTPException(
            503,
            f"The server is receiving as many uploads as it holds at once ({MAX_BYTES_IN_FLIGHT:,} bytes); try again in a few seconds.",
            headers={"Retry-After": "5"},
        ) from None
    except TimeoutError:
        raise HTTPException(
            408, f"The request body did not arrive within {BODY_TIMEOUT:.0f} s; send smaller images.", headers={"Connection": "close"}
        ) from None
    except ClientDisconnect:
        raise HTTPException(499, "The client disconnected before the request body was complete.") from None
    for name, data in uploads:
        if not data:
            what = f"The file '{display(name)}'" if name is not None else "The request body"
            raise HTTPException(400, f"{what} is empty; {_WHAT_TO_SEND}.")
    return uploads


async def _read_form(request: Request) -> list[tuple[str | None, bytes]]:
    """The files of the field `file` in a multipart body, in order."""
    try:
        form: FormData = await request.form(max_files=MAX_FILES, max_fields=MAX_FILES, max_part_size=_MAX_TEXT_FIELD_BYTES)
    except HTTPException as e:  # Starlette's MultiPartException, as a 400
        detail = str(e.detail)
        if detail.startswith("Too many files"):
            raise HTTPException(413, f"More than {MAX_FILES} files in one request; send at most {MAX_FILES}.") from None
        raise HTTPException(400, f"Malformed multipart/form-data body ({detail.rstrip('.')}); {_WHAT_TO_SEND}.") from None
    try:
        items = form.multi_items()
        files = [value for key, value in items if key == FIELD]
        if not files:
            fields = ", ".join(sorted({f"'{display(key[:40])}'" for key, _ in items})) or "none"
            raise HTTPException(400, f"No file in the field '{FIELD}' (fields sent: {fields}); {_WHAT_TO_SEND}.")
        uploads: list[tuple[str | None, bytes]] = []
        for value in files:
            if not isinstance(value, UploadFile):
                raise HTTPException(400, f"The field '{FIELD}' holds text, not a file; {_WHAT_TO_SEND}.")
            uploads.append((value.filename or "", await value.read()))
        return uploads
    finally:
        await form.close()


@dataclass
class _Budget:
    """Request body bytes held at once, across requests: at most `limit`."""

    limit: int
    held: int = 0


class _Meter:
    """One request's `receive`, counting its body as it streams in: at most `MAX_REQUEST_BYTES` (else `_BodyTooLarge`),
    each byte held in `budget` (else `_ServerBusy`) until the `with` block ends."""

    def __init__(self, receive: Receive, budget: _Budget) -> None:
        self.receive, self.budget, self.seen = receive, budget, 0

    async def __call__(self) -> Message:
        message = await self.receive()
        if message["type"] == "http.request":
            n_bytes = len(message.get("body", b""))
            if self.seen + n_bytes > MAX_REQUEST_BYTES:
                raise _BodyTooLarge
            if self.budget.held + n_bytes > self.budget.limit:
                raise _ServerBusy
            self.seen += n_bytes
            self.budget.held += n_bytes
        return message

    def __enter__(self) -> _Meter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        self.budget.held -= self.seen
        self.seen = 0


def _predict(model: Model, uploads: list[tuple[str | None, bytes]], top_k: int, gone: Callable[[], bool]) -> list[dict[str, Any]]:
    """Decode each upload as `headstart predict` decodes a file, and predict them as one batch.

    Each image is reduced to the backbone's input (each backbone's, for an ensemble) as soon
    as it is decoded, so memory holds one full-size image at a time. `gone` is asked before
    each image whether the client has disconnected.

    Raises:
        HTTPException: 422 naming the first upload that is not a decodable image; 499 once `gone`.
    """
    min_size = 2 * max(cfg.resize_size for cfg in model.data_configs)  # as `pipeline.decode_inputs` decodes a file
    pixels = 0
    for name, data in uploads:  # from the headers, before any image is decoded
        width, height = _image_size(data)
        if size_problem(width, height):
            continue  # refused when decoded, with its reason (a decompression bomb, say), before any pixel is read
        pixels += width * height
        if width * height > MAX_IMAGE_PIXELS or pixels > MAX_REQUEST_PIXELS:
            what = f"the file '{display(name)}'" if name is not None else "the request body"
            raise HTTPException(
                413,
                f"Too many pixels at {what} ({width}x{height}): at most {MAX_IMAGE_PIXELS:,} per image and "
                f"{MAX_REQUEST_PIXELS:,} per request; send smaller images.",
            )
    inputs = []
    for done, (name, data) in enumerate(uploads):
        if gone():
            raise HTTPException(499, f"The client disconnected; {len(uploads) - done} of its {len(uploads)} images were not decoded.")
        try:
            image = load_image_bytes(data, name="upload", min_size=min_size)
            inputs.append(model.inputs(image))
        except UnreadableImageError as e:
            what = f"The file '{display(name)}'" if name is not None else "The request body"
            raise HTTPException(422, f"{what} is not a readable image: {display(e.reason)}.") from None
        del image
    proba, scores = model.outputs(model.features([np.stack([x[m] for x in inputs]) for m in range(len(model.backbones))]))
    threshold = model.unknown_threshold()
    score_of = [None] * len(proba) if scores is None else [float(v) for v in scores]
    return [
        _prediction_json(name, Prediction.from_probabilities(None, row, model.classes, top_k, score, threshold))
        for (name, _), row, score in zip(uploads, proba, score_of)
    ]


def _image_size(data: bytes) -> tuple[int, int]:
    """Width and height from an image's header; (0, 0) when it has none (decoding then says what is wrong)."""
    try:
        with open_image(io.BytesIO(data)) as image:
            return image.size
    except Exception:  # Pillow raises many types for a broken header
        return 0, 0


def _prediction_json(filename: str | None, prediction: Prediction) -> dict[str, Any]:
    return {
        "filename": filename,
        "label": prediction.label,
        "probability": prediction.probability,
        "top_k": [{"label": label, "probability": p} for label, p in prediction.top_k],
        "unknown": prediction.unknown,
        "unknown_score": prediction.unknown_score,
    }


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)  # registered for HTTPException only
    message = str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"No such page: {display(request.url.path[:200])}; the service has GET /, /info, /health, /report and POST /predict."
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {display(request.url.path[:200])}; use {exc.headers.get('Allow') if exc.headers else 'another method'}."
    return AsciiJSONResponse({"error": message}, exc.status_code, headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    # Starlette re-raises `exc` after this response is sent, and uvicorn logs its traceback.
    return AsciiJSONResponse({"error": f"Internal error ({type(exc).__name__}); the server's log has the details."}, 500)


class _RequestLog:
    """ASGI middleware: one log line per HTTP request, once its response is sent or it fails."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state: dict[str, Any] = scope.setdefault("state", {})
        status = 500

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            n_images = int(state.get("n_images", 0))
            logger.info(
                "%s %s %d %.1f ms %d image%s",
                display(scope["method"]),
                display(scope["path"][:200]),
                status,
                (time.perf_counter() - started) * 1000,
                n_images,
                "" if n_images == 1 else "s",
            )


class _HostCheck:
    """ASGI middleware: a 421 for a Host header that names neither the server nor an IP address.

    A web page whose DNS name is rebound to this machine sends its own name as the Host: refused,
    it cannot read the service (its report shows training photos). A request with no Host (HTTP/1.0) passes.
    """

    def __init__(self, app: ASGIApp, names: frozenset[str]) -> None:
        self.app = app
        self.names = names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        host = Headers(scope=scope).get("host") if scope["type"] == "http" else None
        if host is not None and not _is_served_name(_host_name(host), self.names):
            message = (
                f"This server does not answer to the name '{display(host[:100])}' (the Host header); open it as localhost, "
                "by an IP address of its machine or by the name it was started with (--host)."
            )
            await AsciiJSONResponse({"error": message}, 421)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _served_names(host: str) -> frozenset[str]:
    """The names a Host header may give besides IP addresses: localhost, this machine's name, and `host`."""
    return frozenset(name for name in ("localhost", socket.gethostname().lower(), _host_name(host)) if not _is_ip(name))


def _host_name(host: str) -> str:
    """The name in a Host header, in lower case, without its port, brackets or final dot: '[::1]:8000' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        name = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        name = host.partition(":")[0]
    else:
        name = host  # no port, or an IPv6 address as `--host` gives it
    return name.rstrip(".")


def _is_served_name(name: str, names: frozenset[str]) -> bool:
    return name in names or _is_ip(name)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


_Phase = Literal["head", "body", "response"] | None
"""What a connection waits for: the client to send a request's head or body, or to read a response; or nothing."""


class _Gate:
    """The connections `run` holds: how many are open (from accept to close), at most `cap`, and those
    waiting on their client (see `_Phase`), the one that has waited longest first."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.open = 0
        self.waiting: dict[asyncio.Transport, None] = {}  # in the order they began to wait

    def evict(self) -> bool:
        """Close the connection that has waited longest on its client; False if every connection is busy with a request."""
        if not self.waiting:
            return False
        transport = next(iter(self.waiting))
        del self.waiting[transport]
        transport.abort()  # its socket is closed on the event loop's next turn
        return True


class _Listener(socket.socket):
    """A listening socket that keeps the connections open below `gate.cap`: at the cap, one waiting on its client
    is closed to make room (see `_Gate.evict`), or, if every connection is busy with a request, the newcomer is
    turned away. The process never runs out of file descriptors, which asyncio would log in a loop."""

    gate: _Gate

    def accept(self) -> tuple[socket.socket, Any]:
        if self.gate.open >= self.gate.cap:
            if not self.gate.evict():
                newcomer, _ = super().accept()
                newcomer.close()
            raise BlockingIOError  # to asyncio, "no connection waiting": it accepts again on its next turn
        accepted, address = super().accept()
        self.gate.open += 1
        return _Counted(self.gate, accepted), address


class _Counted(socket.socket):
    """An accepted connection: closing it gives its place back to the gate."""

    def __init__(self, gate: _Gate, accepted: socket.socket) -> None:
        super().__init__(accepted.family, accepted.type, accepted.proto, fileno=accepted.detach())
        self.gate = gate

    def close(self) -> None:
        was_open = self.fileno() != -1
        super().close()
        if was_open and self.fileno() == -1:
            self.gate.open -= 1


class _Connection(H11Protocol):
    """uvicorn's HTTP/1.1 connection, held to deadlines. A request's head must arrive within `HEAD_TIMEOUT`
    of the connection (or of the previous response), its body within `BODY_TIMEOUT` of the head (and a few
    seconds, for the app's own 408 to go first), and a response the client has stopped reading must move
    within `SEND_TIMEOUT`. A connection that misses one is closed. `gate` is set by `run`."""

    gate: ClassVar[_Gate]
    _phase: _Phase
    _deadline: asyncio.TimerHandle | None
    _unsent: int  # in phase "response": the bytes waiting to be sent at the last check

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn's
        self._phase, self._deadline = None, None
        super().connection_made(transport)
        self._follow()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()  # a kept-alive connection waits for the next head

    def pause_writing(self) -> None:
        super().pause_writing()
        self._follow()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._enter(None)
        super().connection_lost(exc)

    def _follow(self) -> None:
        closing = self.transport.is_closing()
        if self.flow.write_paused or (closing and self.transport.get_write_buffer_size()):  # a response waits to be read
            self._enter("response")
        elif closing:
            self._enter(None)
        else:
            state = self.conn.their_state
            self._enter("head" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None)

    def _enter(self, phase: _Phase) -> None:
        if phase == self._phase:
            return
        self._phase = phase
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.gate.waiting.pop(self.transport, None)
        if phase is not None:
            self.gate.waiting[self.transport] = None  # the newest to wait
        if phase == "head":
            self._deadline = self.loop.call_later(HEAD_TIMEOUT, self.transport.abort)
        elif phase == "body":
            self._deadline = self.loop.call_later(BODY_TIMEOUT + 5, self.transport.abort)
        elif phase == "response":
            self._unsent = self.transport.get_write_buffer_size()
            self._deadline = self.loop.call_later(SEND_TIMEOUT, self._check_sending)

    def _check_sending(self) -> None:
        unsent = self.transport.get_write_buffer_size()
        if unsent and unsent >= self._unsent:  # nothing written for SEND_TIMEOUT: the client has stopped reading
            self.transport.abort()
            return
        self._unsent = unsent
        self._deadline = self.loop.call_later(SEND_TIMEOUT, self._check_sending)
