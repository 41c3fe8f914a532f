"""serve: `headstart serve` under 1, 4 and 16 concurrent clients, against `model.predict` in-process.

    .venv/bin/python bench/serve.py [--model MODEL] [--data DATA] [--duration 20] [--clients 1 4 16] [--no-record]

Without --model, trains efficientnet_lite0 + a linear head on DATA (default: the
flowers dataset) with `headstart train --no-report` into a temporary folder, with
a temporary cache. The server runs as its own process (`headstart.server.run`) on a
free loopback port, logging to a file. For each number of clients, that many
threads each POST one photo of DATA per request (multipart, field `file`, one
keep-alive connection per client) for --duration seconds: requests/s, latency
percentiles, errors, and the server process's CPU time per request. The server's peak RSS is its VmHWM after all levels. The
baseline, before the server starts and again after it stops, is one thread calling
`model.predict([image])` on the same photos, one at a time, each decoded from its
bytes as the server decodes an upload (`load_image_bytes`, reduced-scale JPEG
decoding): images/s. The clients run on the same machine as the server and take
some of its CPU. Prints a table and appends it to bench/results.md (--no-record:
print only).
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from _common import FLOWERS, HEADSTART, publish, table

SERVER = "import sys; from pathlib import Path; from headstart.server import run; run(Path(sys.argv[1]), port=int(sys.argv[2]), cache_root=Path(sys.argv[3]))"


@dataclass
class Level:
    """What one number of clients got."""

    clients: int
    seconds: float = 0.0
    server_cpu: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    labels: dict[Path, str] = field(default_factory=dict)


def photos_of(data: Path) -> list[tuple[Path, bytes]]:
    """Every image file under `data`'s class folders, read into memory, in name order."""
    paths = sorted(p for p in data.rglob("*") if p.is_file() and p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not paths:
        sys.exit(f"No .jpg or .png photos under {data}.")
    return [(p, p.read_bytes()) for p in paths]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(model: Path, cache: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The server process and its URL, once /health answers."""
    port = free_port()
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(model), str(port), str(cache)], stdout=subprocess.DEVNULL, stderr=stderr
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            sys.exit(f"The server exited {process.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            sys.exit("The server did not start in 300 s.")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)


def memory_kib(pid: int, key: str) -> int:
    """A `/proc/<pid>/status` field in KiB (VmHWM: peak RSS; VmRSS: now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(url: str, photos: list[tuple[Path, bytes]], clients: int, duration: float) -> Level:
    """`clients` threads POSTing one photo per request, in turn from `photos`, for `duration` seconds."""
    level = Level(clients)
    turn = itertools.count()
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            http.get("/health")  # connected before the clock starts
            start.wait()
            while time.perf_counter() < deadline:
                path, data = photos[next(turn) % len(photos)]
                began = time.perf_counter()
                try:
                    response = http.post("/predict", files={"file": (path.name, data, "image/jpeg")})
                    ok = response.status_code == 200
                    label = response.json()["predictions"][0]["label"] if ok else None
                except httpx.HTTPError:
                    ok, label = False, None
                elapsed = time.perf_counter() - began
                with lock:
                    level.latencies.append(elapsed)
                    level.errors += not ok
                    if label is not None:
                        level.labels[path] = label

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    deadline = began + duration
    start.wait()  # every client connected
    for thread in threads:
        thread.join()
    level.seconds = time.perf_counter() - began
    return level


def in_process(
    model_dir: Path, cache: Path, photos: list[tuple[Path, bytes]], duration: float
) -> tuple[int, float, float, dict[Path, str]]:
    """`model.predict([image])` one photo at a time for `duration` seconds: (images, seconds, CPU seconds, labels)."""
    import headstart
    from headstart.data import load_image_bytes

    model = headstart.load(model_dir, cache_root=cache)
    min_size = 2 * model.backbone.data_config.resize_size
    model.predict([load_image_bytes(photos[0][1], photos[0][0].name, min_size)])  # warm up
    labels: dict[Path, str] = {}
    began, cpu = time.perf_counter(), time.process_time()
    n = 0
    while time.perf_counter() - began < duration:
        path, data = photos[n % len(photos)]
        labels[path] = model.predict([load_image_bytes(data, path.name, min_size)]).predictions[0].label
        n += 1
    return n, time.perf_counter() - began, time.process_time() - cpu, labels


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a saved model folder [default: train one on DATA]")
    parser.add_argument("--data", type=Path, default=FLOWERS, help="the photos sent (and trained on without --model) [default: flowers]")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per number of clients, and for the baseline [default: 20]")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--no-record", action="store_true", help="print the table without appending it to bench/results.md")
    args = parser.parse_args()
    photos = photos_of(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        env = {**os.environ, "HEADSTART_CACHE_DIR": str(cache), "NO_COLOR": "1"}
        model_dir = args.model
        if model_dir is None:
            model_dir = Path(tmp) / "model"
            print(f"training on {args.data} ...", flush=True)
            done = subprocess.run(
                [HEADSTART, "train", args.data, "--out", model_dir, "--no-report", "--cache-dir", cache],
                env=env,
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                sys.exit(f"headstart train exited {done.returncode}:\n{done.stderr[-3000:]}")
        print(f"in-process model.predict for {args.duration:g} s ...", flush=True)
        before = in_process(model_dir, cache, photos, args.duration)
        log = Path(tmp) / "server.log"
        process, url = start_server(model_dir, cache, log)
        try:
            idle = memory_kib(process.pid, "VmRSS")
            levels = []
            for clients in args.clients:
                print(f"{clients} client(s) for {args.duration:g} s ...", flush=True)
                cpu = cpu_seconds(process.pid)
                levels.append(load(url, photos, clients, args.duration))
                levels[-1].server_cpu = cpu_seconds(process.pid) - cpu
            peak = memory_kib(process.pid, "VmHWM")
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(60)
        n_logged = sum(" /predict " in line for line in log.read_text().splitlines())
        print(f"in-process model.predict for {args.duration:g} s again ...", flush=True)
        after = in_process(model_dir, cache, photos, args.duration)
    rates = [n / seconds for n, seconds, _, _ in (before, after)]
    baseline = statistics.mean(rates)
    baseline_cpu = 1000 * (before[2] + after[2]) / (before[0] + after[0])
    baseline_labels = {**before[3], **after[3]}
    load_average = os.getloadavg()
    rows = []
    agree = total = 0
    for level in levels:
        rate = len(level.latencies) / level.seconds
        ms = [1000 * s for s in level.latencies]
        rows.append(
            (
                level.clients,
                len(level.latencies),
                f"{rate:.1f}",
                f"{percentile(ms, 50):.0f}",
                f"{percentile(ms, 95):.0f}",
                f"{percentile(ms, 99):.0f}",
                level.errors,
                f"{1000 * level.server_cpu / max(len(level.latencies), 1):.0f}",
                f"{rate / baseline:.2f}x",
            )
        )
        common = level.labels.keys() & baseline_labels.keys()
        agree += sum(level.labels[p] == baseline_labels[p] for p in common)
        total += len(common)
    n_requests = sum(len(level.latencies) for level in levels)
    lines = [
        *table(
            ["clients", "requests", "requests/s", "p50 ms", "p95 ms", "p99 ms", "errors", "server CPU ms/request", "/ in-process"], rows
        ),
        f"\nBaseline, one thread calling `model.predict([image])` in-process (decoding included): {baseline:.1f} images/s, "
        f"the mean of {rates[0]:.1f} before the server started and {rates[1]:.1f} after it stopped, {baseline_cpu:.0f} ms of CPU per image. "
        f"Load average at the end {load_average[0]:.1f} / {load_average[1]:.1f} / {load_average[2]:.1f} (1 / 5 / 15 min; other work on the machine "
        f"leaves the server less than its cores). Server RSS {idle / 1024:.0f} MB idle after start-up, peak (VmHWM) "
        f"{peak / 1024:.0f} MB. {len(photos)} {args.data.name} photos sent in turn, one per request (multipart), "
        f"{args.duration:g} s per row, clients on the same machine; the server logged {n_logged} of {n_requests} /predict requests. "
        f"Labels equal to the in-process ones on {agree} of {total} photos both predicted.",
    ]
    title = f"serve: `headstart serve` requests/s and latency by concurrent clients ({args.data.name})"
    publish(title, lines, record=not args.no_record)


if __name__ == "__main__":
    main()
