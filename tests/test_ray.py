"""`extract --ray` and `predict --ray` on a real local Ray (2 CPUs): the features, skips and predictions of a local run,
`train` with no backbone pass afterwards, a Ray worker killed mid-run, an interrupted run resumed."""

from __future__ import annotations

import csv
import http.server
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open
from typer.testing import CliRunner

import headstart
from conftest import CATS_DOGS_TINY, FLOWERS, FLOWERS_TINY, SHARED, copy_flowers, write_image
from headstart import api
from headstart import cache as feature_cache
from headstart.backbone import create_backbone
from headstart.cache import ExtractSummary, FeatureCache
from headstart.cli.main import app
from headstart.cluster import list_inputs
from headstart.data import MAX_FILE_BYTES
from headstart.files import file_digest

WORKER_TITLE = b"ImageWorker"  # Ray names each actor process ray::MapWorker(MapBatches(ImageWorker))


@pytest.fixture(scope="module")
def ray_session() -> Iterator[Any]:
    """One local Ray for the module's tests (`headstart` uses a session it finds started), shut down after them."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def flowers_on_ray(ray_session: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ExtractSummary]:
    """Every flower photo extracted on Ray into a new cache: (cache folder, what extract said)."""
    cache = tmp_path_factory.mktemp("ray-cache")
    return cache, api.extract(str(FLOWERS), ray=True, cache_dir=cache)


def _features(cache: Path) -> dict[str, np.ndarray]:
    store = FeatureCache(cache, create_backbone("efficientnet_lite0"))
    return store.load(store.digests())


def _keys_per_shard(cache: Path) -> Counter[str]:
    """How many shards hold each digest (after reading every tensor of every shard in full)."""
    counts: Counter[str] = Counter()
    for shard in cache.rglob("*.safetensors"):
        with safe_open(shard, framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                assert np.isfinite(f.get_tensor(key)).all()
                counts[key] += 1
    return counts


def _hostile_folder(root: Path) -> Path:
    """Two classes of real photos, and every kind of file a run must skip with a reason."""
    copy_flowers(root, per_class=6)
    daisy, roses = root / "daisy", root / "roses"
    photo = next(daisy.iterdir()).read_bytes()
    (daisy / "truncated.jpg").write_bytes(photo[: len(photo) // 3])
    (daisy / "empty.jpg").write_bytes(b"")
    (daisy / "text.jpg").write_text("not an image")
    write_image(daisy / "tiny.png", (200, 30, 30), size=(8, 8))
    write_image(roses / "[red]$x$ <b>.png", (30, 200, 30))  # markup and mathtext in the name: a fine image
    (roses / os.fsdecode(b"caf\xe9-\x1b[31m.jpg")).write_bytes(b"\xff\xd8 not really")  # non-UTF-8 bytes and an escape sequence
    os.mkfifo(roses / "fifo.jpg")  # reading it would block forever
    os.symlink("/dev/zero", roses / "zero.jpg")  # reading it would never end
    with (roses / "huge.jpg").open("wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk space
    return root


def _assert_same_csv_rows(rows: list[dict[str, str]], expected: list[dict[str, str]]) -> None:
    """The same rows, but for the numbers (6 decimals), which may differ in their last decimal: an image's features, and the
    head's products, round differently with the batch they are computed in. Probabilities must agree to within 2e-6 (the
    rounding of each, and one unit), unknown scores to within the 1e-5 the API's are compared with above."""
    tolerance = {key: 1e-5 if key == "unknown_score" else 2e-6 for key in expected[0] if key.startswith(("probability", "unknown_score"))}
    for row, want in zip(rows, expected, strict=True):
        assert row.keys() == want.keys()
        assert {k: v for k, v in row.items() if k not in tolerance} == {k: v for k, v in want.items() if k not in tolerance}
        for key, atol in tolerance.items():
            np.testing.assert_allclose(float(row[key] or "nan"), float(want[key] or "nan"), rtol=0, atol=atol, err_msg=key)


def _worker_pids() -> list[int]:
    """The processes of this user running headstart's Ray actor."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and entry.stat().st_uid == os.getuid() and WORKER_TITLE in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:  # gone meanwhile
            continue
    return pids


@pytest.mark.slow
def test_features_on_ray_equal_the_local_features_of_every_flower_photo(
    flowers_on_ray: tuple[Path, Any], flowers_cache: tuple[Path, Any]
) -> None:
    (ray_cache, on_ray), (local_cache, local) = flowers_on_ray, flowers_cache
    assert on_ray.ray and on_ray.n_cpus == 2
    assert on_ray.n_images == local.n_images == 1500
    assert on_ray.n_extracted == local.n_extracted == 1498  # two pairs of identical photos: one digest each
    assert on_ray.skipped == local.skipped == []
    ray_features, local_features = _features(ray_cache), _features(local_cache)
    assert ray_features.keys() == local_features.keys() == {file_digest(p) for p in FLOWERS.rglob("*.jpg")}
    for digest, row in ray_features.items():
        np.testing.assert_allclose(row, local_features[digest], rtol=0, atol=1e-6)
    assert max(_keys_per_shard(ray_cache).values()) == 1


@pytest.mark.slow
def test_train_after_extract_on_ray_runs_no_image_through_the_backbone(flowers_on_ray: tuple[Path, Any], tmp_path: Path) -> None:
    cache, _ = flowers_on_ray
    model = headstart.train(FLOWERS, cache_dir=cache, report=False, refit=False)  # no cross-validation: its features are the point
    assert model.summary.n_extracted == 0
    assert model.summary.n_cached == 1500


@pytest.mark.slow
def test_predict_on_ray_equals_predict_in_the_api_the_csv_and_parquet(
    flowers_on_ray: tuple[Path, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, _ = flowers_on_ray
    train = copy_flowers(tmp_path / "train", per_class=30)
    model = headstart.train(train, cache_dir=cache, report=False)
    assert model.detector is not None  # the unknown fields are part of what must agree
    folder = model.save(tmp_path / "model")
    images = _hostile_folder(tmp_path / "new")
    monkeypatch.setenv("HEADSTART_CACHE_DIR", str(cache))  # the loaded model finds its ONNX engine there
    local = api.predict(folder, [images, SHARED / "photos", tmp_path / "missing.jpg"])
    remote = api.predict(folder, [images, SHARED / "photos", tmp_path / "missing.jpg"], ray=True)
    assert [p.path for p in remote] == [p.path for p in local]
    assert len(local.skipped) == 8 + 1  # the bad files and the missing one
    for r, p in zip(remote, local, strict=True):
        assert [label for label, _ in r.top_k] == [label for label, _ in p.top_k]
        np.testing.assert_allclose([v for _, v in r.top_k], [v for _, v in p.top_k], rtol=0, atol=1e-6)
        assert r.unknown == p.unknown
        np.testing.assert_allclose(r.unknown_score, p.unknown_score, rtol=0, atol=1e-5)  # type: ignore[arg-type]
    assert remote.skipped == local.skipped

    runner = CliRunner()
    listed = [str(folder), str(images)]
    done = runner.invoke(app, ["predict", *listed, "--csv", str(tmp_path / "local.csv")])
    assert done.exit_code == 0, done.output
    done = runner.invoke(app, ["predict", *listed, "--ray", "--out", str(tmp_path / "ray.csv")])
    assert done.exit_code == 0, done.output
    assert "Skipped 8 file(s)" in done.output and "fifo.jpg: not a regular file: a FIFO (named pipe)" in done.output
    with (tmp_path / "local.csv").open(newline="", encoding="utf-8", errors="surrogateescape") as f:
        expected = list(csv.DictReader(f))
    with (tmp_path / "ray.csv").open(newline="", encoding="utf-8", errors="surrogateescape") as f:
        _assert_same_csv_rows(list(csv.DictReader(f)), expected)
    on_ray = [p for p in remote if Path(p.path).parent.parent == images]  # `listed`'s images, as `--out ray.parquet` writes them
    api.save_predictions(on_ray, tmp_path / "ray.parquet")
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "ray.parquet").to_pylist()
    assert [row["path"] for row in table] == [row["path"] for row in expected]
    assert [row["label"] for row in table] == [row["label"] for row in expected]
    assert [row["unknown"] for row in table] == [row["unknown"] == "true" for row in expected]
    np.testing.assert_allclose([row["probability_3"] for row in table], [float(row["probability_3"]) for row in expected], atol=1e-6)


@pytest.mark.slow
def test_an_ensemble_predicts_on_ray_as_it_does_here(ray_session: Any) -> None:
    model = headstart.load(Path(__file__).parent / "fixtures" / "model_v5")  # efficientnet_lite0 + efficientnet_lite1
    assert len(model.backbones) == 2
    local = api.predict(model, [CATS_DOGS_TINY / "val"], top_k=2)
    remote = api.predict(model, [CATS_DOGS_TINY / "val"], top_k=2, ray=True)
    assert [(p.path, p.label, p.unknown) for p in remote] == [(p.path, p.label, p.unknown) for p in local]
    np.testing.assert_allclose([p.probability for p in remote], [p.probability for p in local], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_bad_files_are_skipped_with_the_reasons_of_a_local_run(ray_session: Any, tmp_path: Path) -> None:
    data = _hostile_folder(tmp_path / "photos")
    local = api.extract(str(data), cache_dir=tmp_path / "local")
    on_ray = api.extract(str(data), ray=True, cache_dir=tmp_path / "ray")
    reasons = {s.path.name: s.reason for s in on_ray.skipped}
    assert on_ray.skipped == local.skipped
    assert reasons == {
        "truncated.jpg": reasons["truncated.jpg"],  # Pillow's words
        "empty.jpg": "cannot identify image file",
        "text.jpg": "cannot identify image file",
        "tiny.png": "too small: 8x8 pixels, less than 16 on a side",
        os.fsdecode(b"caf\xe9-\x1b[31m.jpg"): "cannot identify image file",
        "fifo.jpg": "not a regular file: a FIFO (named pipe)",
        "zero.jpg": "not a regular file: a character device",
        "huge.jpg": f"too large: {MAX_FILE_BYTES + 1:,} bytes, more than the {MAX_FILE_BYTES:,} allowed",
    }
    assert on_ray.n_images == local.n_images == 5 * 6 + 1 + 8  # the markup-named photo is fine
    assert on_ray.n_extracted == local.n_extracted > 0

    done = CliRunner().invoke(app, ["extract", str(data), "--ray", "--cache-dir", str(tmp_path / "ray")])
    assert done.exit_code == 0, done.output
    assert f"{local.n_extracted} already cached, 8 skipped" in done.output
    assert "caf\\xe9-\\x1b[31m.jpg: cannot identify image file" in done.output  # shown escaped, on one line
    assert "[red]$x$ <b>.png" not in done.output.replace("Skipped", "")  # a readable file is not listed


@pytest.mark.slow
def test_a_uri_is_listed_and_read_through_pyarrow(flowers_cache: tuple[Path, Any], ray_session: Any, tmp_path: Path) -> None:
    pytest.importorskip("fsspec")  # Ray Data's dependency: `fsspec+file://` is a filesystem pyarrow reads as it reads s3://
    data = copy_flowers(tmp_path / "photos", per_class=4)
    (data / "tulips" / "note.jpg").write_text("not an image")
    (data / "tulips" / ".hidden.jpg").write_bytes((data / "tulips" / "note.jpg").read_bytes())
    (data / "daisy" / "a photo #1 ?50%.jpg").write_bytes(next((data / "roses").iterdir()).read_bytes())  # no valid URI
    result = api.extract(f"fsspec+{data.resolve().as_uri()}/", ray=True, cache_dir=tmp_path / "cache")
    assert result.n_images == 22 and result.n_extracted == len({file_digest(p) for p in data.rglob("*.jpg")}) - 1
    assert [(s.path, s.reason) for s in result.skipped] == [
        (Path(f"fsspec+file:{data.resolve()}/tulips/note.jpg"), "cannot identify image file")
    ]
    local_features = _features(flowers_cache[0])
    for digest, row in _features(tmp_path / "cache").items():
        np.testing.assert_allclose(row, local_features[digest], rtol=0, atol=1e-6)
    model = headstart.train(data, cache_dir=tmp_path / "cache", report=False, folds=2)
    assert model.summary.n_extracted == 0


def test_a_file_uri_is_listed_as_a_local_folder_each_photo_once_whatever_its_symlinks(tmp_path: Path) -> None:
    data = copy_flowers(tmp_path / "photos", per_class=2)
    (data / "daisy" / "self").symlink_to(".")  # a loop: daisy/self/self/...
    (data / "roses" / "up").symlink_to("..")  # a loop through the root: roses/up/roses/up/...
    (data / "tulips" / "a photo #1 ?50%.jpg").write_bytes(b"")  # a name that is no valid URI
    listing = list_inputs([data.resolve().as_uri()])
    assert sorted(listing.locations) == sorted(os.fspath(p) for p in data.resolve().rglob("*.jpg"))  # rglob: no symlinked folder
    assert len(listing.locations) == 5 * 2 + 1


@pytest.fixture(scope="module")
def listeners() -> Iterator[dict[str, int]]:
    """Loopback ports where something other than Ray listens: `silent` accepts connections (the kernel does) and never
    answers; `http` answers as a web server does (as `headstart serve` would)."""

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    with socket.create_server(("127.0.0.1", 0)) as silent, http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet) as web:
        threading.Thread(target=web.serve_forever, daemon=True).start()
        yield {"silent": silent.getsockname()[1], "http": web.server_address[1]}
        web.shutdown()


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("where", "words"),
    [
        (["gs://headstart-no-such-bucket/photos/"], "gs://headstart-no-such-bucket/photos/"),  # no network here: its client retries
        ([str(FLOWERS_TINY), "--address", "127.0.0.1:1"], "Could not connect to the Ray cluster at 127.0.0.1:1"),
        ([str(FLOWERS_TINY), "--address", "127.0.0.1:{silent}"], "no Ray cluster answered at 127.0.0.1:{silent} within 30 s"),
        ([str(FLOWERS_TINY), "--address", "ray://127.0.0.1:{http}"], "what listens at 127.0.0.1:{http} is no Ray cluster"),
    ],
)
def test_storage_or_a_cluster_that_does_not_answer_is_a_one_line_error_within_a_deadline(
    where: list[str], words: str, listeners: dict[str, int], tmp_path: Path
) -> None:
    where, words = [w.format(**listeners) for w in where], words.format(**listeners)
    command = [sys.executable, "-m", "headstart.cli.main", "extract", *where, "--ray", "--cache-dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=90)  # without deadlines: 15 minutes, 3 minutes and more
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 1 and words in output and "\n" not in output, output
    assert len(output) < 400, output  # the storage's reason is cut to its first sentence (Google's is a 1,000-character dump)


@pytest.mark.slow
@pytest.mark.kill
def test_killing_a_ray_worker_mid_run_leaves_every_feature_once(
    flowers_cache: tuple[Path, Any], ray_session: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feature_cache, "SHARD_SIZE", 64)  # several shards, so that some are written before and after the kill
    data = copy_flowers(tmp_path / "photos", per_class=60)
    killed: list[int] = []

    def kill_one(description: str, done: int, total: int, status: str = "", /) -> None:
        if not killed and done >= total // 4:
            pids = _worker_pids()
            assert pids, "the Ray workers should be running"
            os.kill(pids[0], signal.SIGKILL)
            killed.append(done)

    result = api.extract(str(data), ray=True, cache_dir=tmp_path / "cache", batch_size=16, progress=kill_one)
    assert killed and killed[0] < 300, "the kill should land while the run is going"
    digests = {file_digest(p) for p in data.rglob("*.jpg")}
    assert (result.n_images, result.n_extracted, result.skipped) == (300, len(digests), [])
    counts = _keys_per_shard(tmp_path / "cache")
    assert set(counts) == digests
    assert set(counts.values()) == {1}  # none twice
    local_features = _features(flowers_cache[0])
    for digest, row in _features(tmp_path / "cache").items():
        np.testing.assert_allclose(row, local_features[digest], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.kill
def test_an_interrupted_run_resumes_from_the_shards_it_wrote(ray_session: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feature_cache, "SHARD_SIZE", 32)
    data = copy_flowers(tmp_path / "photos", per_class=40)

    def interrupt(description: str, done: int, total: int, status: str = "", /) -> None:
        if done >= 100:
            raise KeyboardInterrupt  # as Ctrl-C would, midway

    with pytest.raises(KeyboardInterrupt):
        api.extract(str(data), ray=True, cache_dir=tmp_path / "cache", batch_size=16, progress=interrupt)
    written = _keys_per_shard(tmp_path / "cache")
    assert len(written) >= 64 and set(written.values()) == {1}
    result = api.extract(str(data), ray=True, cache_dir=tmp_path / "cache", batch_size=16)
    assert result.n_cached == len(written)
    assert result.n_extracted + result.n_cached == 200
    assert set(_keys_per_shard(tmp_path / "cache").values()) == {1}


def test_without_ray_installed_the_error_is_one_line_naming_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = copy_flowers(tmp_path / "photos", per_class=2)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    done = CliRunner().invoke(app, ["extract", str(data), "--ray", "--cache-dir", str(tmp_path / "cache")])
    assert done.exit_code == 1
    assert done.output.count("\n") == 1 and "pip install 'headstart[ray]'" in done.output


def test_ray_options_out_of_place_are_one_line_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    photo = str(SHARED / "photos" / "dog.jpg")
    for args, words in (
        (["predict", str(tiny_model_dir), photo, "--ray"], "give --out predictions.parquet"),
        (["predict", str(tiny_model_dir), photo, "--address", "auto"], "give --ray too"),
        (
            ["predict", str(tiny_model_dir), photo, "--ray", "--tta", "--out", str(tmp_path / "p.parquet")],
            "--tta is not available with --ray",
        ),
        (["predict", str(tiny_model_dir), photo, "--ray", "--out", str(tmp_path / "p.txt")], "give a file name ending in .parquet"),
        (["extract", "s3://bucket/photos/", "--cache-dir", str(tmp_path)], "a URI is read on Ray workers; add --ray"),
        (["extract", str(tmp_path / "nowhere"), "--ray"], "no such file or folder"),
    ):
        done = runner.invoke(app, args)
        assert done.exit_code == 1 and words in done.output and done.output.count("\n") == 1, (args, done.output)
