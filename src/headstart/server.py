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
    GET /report  the model folder's report.html.

Limits: at most `MAX_REQUEST_BYTES` (20 MiB) of body per request, counted while
it streams in (a larger Content-Length is refused before reading), at most
`MAX_FILES` (16) images per request, and, read from the images' headers before any
is decoded, at most `MAX_IMAGE_PIXELS` (50 MP) per image and `MAX_REQUEST_PIXELS`
(200 MP) per request. Each image is held to headstart's decoding
limits (at most 89 megapixels, at least 16 pixels on a side, at most 20:1);
decoding here has no time limit (headstart's uses a signal, which only the main
thread gets), so those pixel limits bound its work. At most one request per CPU
is decoded and run through the model at a time; the others wait their turn.

Errors are JSON, `{"error": "<one line naming the problem and what to send>"}`:
    400  a malformed multipart body, no file in the field `file`, an empty body or file.
    404  an unknown path, or /report for a model without a report.
    405  a method the path does not take.
    413  a body over 20 MiB, more than 16 files, or more pixels than the limits above.
    415  a Content-Type other than multipart/form-data, image/* or application/octet-stream.
    422  `top_k` not an integer from 1 to the number of classes; an upload that is not a
        decodable image (not an image, truncated, a decompression bomb, too small or too elongated).
    500  a bug; the traceback goes to the server's log, never to the client.
A request that fails leaves the server serving the next one.

Strings are JSON as Python writes them with `ensure_ascii`: the undecodable bytes
of a non-UTF-8 class folder come back as the same `\\udcXX` escapes that bundle.json
holds, so a label always equals one of `model.classes`.

Each request is logged as one line on stderr (method, path, status, milliseconds,
number of images); uvicorn's own access log is off.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import io
import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from headstart import __version__
from headstart.bundle import REPORT_NAME
from headstart.config import default_cache_dir
from headstart.data import load_image_bytes, open_image, size_problem
from headstart.errors import ConfigError, UnreadableImageError
from headstart.files import display, read_regular
from headstart.model import Model, Prediction, load
from headstart.pipeline import available_cpus

MAX_REQUEST_BYTES = 20 * 1024 * 1024
MAX_FILES = 16
MAX_IMAGE_PIXELS = 50_000_000  # a 50-megapixel photo; headstart's own limit (89 MP) would let one upload take 2 GB to decode
MAX_REQUEST_PIXELS = 200_000_000  # bounds one request's decoding to a few seconds, as a request's CPU is held while it decodes
MAX_REPORT_BYTES = 64 << 20
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


def create_app(model_dir: Path, cache_root: Path | None = None) -> FastAPI:
    """The service for the model saved in `model_dir`, loaded and warmed up before this returns.

    Args:
        model_dir: a folder written by `headstart train --out` or `Model.save`.
        cache_root: the cache holding the backbone's exported ONNX engine (default: `default_cache_dir()`).

    Raises:
        BundleError: `model_dir` is not a valid model.

    Examples:
        >>> app = create_app(Path("my-model"))  # doctest: +SKIP
        >>> uvicorn.run(app, port=8000)  # doctest: +SKIP
    """
    model_dir = Path(model_dir)
    model = load(model_dir, cache_root=cache_root if cache_root is not None else default_cache_dir())
    model.features(
        [np.zeros((1, 3, c.input_size, c.input_size), np.float32) for c in model.data_configs]
    )  # sessions created, first run's allocations made
    page = importlib.resources.files("headstart").joinpath("page.html").read_text(encoding="utf-8")
    limiter = anyio.CapacityLimiter(available_cpus())  # decoding and inference at once; the rest wait without a thread
    n_classes = len(model.classes)

    app = FastAPI(title="headstart", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_RequestLog)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        top_k = _top_k(request.query_params.get("top_k"), n_classes)
        uploads = await _read_uploads(request)
        request.state.n_images = len(uploads)
        predictions = await anyio.to_thread.run_sync(_predict, model, uploads, top_k, limiter=limiter)
        return AsciiJSONResponse({"predictions": predictions})

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD for uptime checks
    async def health() -> Response:
        return AsciiJSONResponse({"status": "ok"})

    @app.get("/info")
    async def info() -> Response:
        return AsciiJSONResponse(_info(model, model_dir))

    @app.api_route("/", methods=["GET", "HEAD"])  # HEAD for uptime checks
    async def index() -> Response:
        return HTMLResponse(page, headers=_PAGE_HEADERS)

    @app.get("/report")
    async def report() -> Response:
        path = model_dir / REPORT_NAME
        if path.is_symlink() or not path.is_file():  # a link could show any file the server can read
            raise HTTPException(404, f"This model has no {REPORT_NAME}; `headstart report MODEL` writes one.")
        try:
            page = read_regular(path, MAX_REPORT_BYTES)
        except OSError as e:
            raise HTTPException(404, f"This model's {REPORT_NAME} cannot be read ({display(str(e))}).") from None
        return Response(page, media_type="text/html; charset=utf-8")

    return app


def run(model_dir: Path, host: str = "127.0.0.1", port: int = 8000, cache_root: Path | None = None) -> None:
    """Serve the model in `model_dir` at http://host:port/ until interrupted (Ctrl-C); prints the URL once listening.

    `port` 0 picks a free port. Requests are logged to stderr, one line each.

    Raises:
        BundleError: `model_dir` is not a valid model.
        ConfigError: the address cannot be listened on (the port is taken, say).
    """
    sock = _listen(host, port)  # first: a port in use is reported before the model loads
    try:
        app = create_app(model_dir, cache_root)
    except BaseException:
        sock.close()
        raise
    config = uvicorn.Config(app, log_config=_log_config(), access_log=False, ws="none", timeout_graceful_shutdown=5)
    address = sock.getsockname()
    shown_host = f"[{address[0]}]" if sock.family == socket.AF_INET6 else address[0]
    print(f"headstart: serving {display(model_dir)} at http://{shown_host}:{address[1]}/ (Ctrl-C to stop)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn shuts down, then raises the Ctrl-C again
        uvicorn.Server(config).run(sockets=[sock])


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) and listening."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
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


def _log_config() -> dict[str, Any]:
    """Request lines from `headstart.server` and uvicorn's warnings and errors, on stderr."""
    stderr = {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(message)s", "datefmt": "%H:%M:%S"}},
        "handlers": {"stderr": stderr},
        "loggers": {
            "headstart.server": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }


def _info(model: Model, model_dir: Path) -> dict[str, Any]:
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
        "report": (model_dir / REPORT_NAME).is_file(),
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


async def _read_uploads(request: Request) -> list[tuple[str | None, bytes]]:
    """The uploaded images as (filename, bytes): the `file` fields of a multipart body, or the raw body (filename None).

    Raises:
        HTTPException: 400, 413 or 415 (see the module docstring).
    """
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.strip().isdigit() and int(declared) > MAX_REQUEST_BYTES:
        raise HTTPException(
            413, f"The request body is {int(declared):,} bytes, more than the {MAX_REQUEST_BYTES:,} allowed; send fewer or smaller images."
        )
    limited = Request(request.scope, _counting(request.receive, MAX_REQUEST_BYTES))
    try:
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
    except ClientDisconnect:
        raise HTTPException(400, "The client disconnected before the request body was complete.") from None
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


def _counting(receive: Receive, limit: int) -> Receive:
    """`receive`, raising `_BodyTooLarge` once the body passes `limit` bytes."""
    seen = 0

    async def receive_counted() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge
        return message

    return receive_counted


def _predict(model: Model, uploads: list[tuple[str | None, bytes]], top_k: int) -> list[dict[str, Any]]:
    """Decode each upload as `headstart predict` decodes a file, and predict them as one batch.

    Each image is reduced to the backbone's input (each backbone's, for an ensemble) as soon
    as it is decoded, so memory holds one full-size image at a time.

    Raises:
        HTTPException: 422 naming the first upload that is not a decodable image.
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
    for name, data in uploads:
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
