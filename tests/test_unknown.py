"""Unknown detection: scores and thresholds on synthetic data, a small flowers model against cats and dogs,
`--unknown` on the CLI, the detector in the bundle (tampering refused), the server and the ONNX export."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import headstart
from conftest import SHARED, copy_flowers
from headstart.cache import ExtractSummary
from headstart.calibration import expected_calibration_error
from headstart.cli.main import app
from headstart.errors import BundleError, ConfigError
from headstart.unknown import SCORE_KINDS, calibrate, choose_threshold, fit_detector, ledoit_wolf

CATS_DOGS = sorted((SHARED / "datasets" / "cats_dogs").rglob("*.jpg"))[::150]  # 20 photos, cats and dogs
UNSEEN_FLOWERS = [p for folder in sorted((SHARED / "datasets" / "flowers").iterdir()) for p in sorted(folder.iterdir())[200:204]]


def _gaussians(n: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = np.eye(3, 16) * 6
    y = rng.integers(0, 3, n)
    return (centers[y] + rng.normal(size=(n, 16)) + shift).astype(np.float32), y


@pytest.mark.parametrize("kind", SCORE_KINDS)
def test_every_score_is_finite_and_feature_scores_separate_far_gaussians(kind: str) -> None:
    X, y = _gaussians(600, 0)
    X_held, y_held = _gaussians(300, 1)
    X_far, _ = _gaussians(300, 2, shift=8.0)
    logits = X[:, :3] * 2  # logits that know the classes
    detector = fit_detector(X, y, 3, kind)  # type: ignore[arg-type]
    held, far = detector.score(X_held, X_held[:, :3] * 2), detector.score(X_far, X_far[:, :3] * 2)
    assert held.shape == (300,) and held.dtype == np.float32 and np.isfinite(np.r_[held, far]).all()
    assert detector.score(X, logits).shape == (600,)
    if kind in ("mahalanobis", "knn"):
        threshold = choose_threshold(held, 0.02)
        assert np.mean(far > threshold) > 0.95
        assert np.mean(held > threshold) <= 0.02


def test_choose_threshold_calls_at_most_the_rate_unknown() -> None:
    scores = np.arange(100, dtype=np.float32)
    for rate in (0.0, 0.02, 0.05, 0.5):
        threshold = choose_threshold(scores, rate)
        assert np.sum(scores > threshold) == int(rate * 100)
    with pytest.raises(ConfigError, match="rate"):
        choose_threshold(scores, 1.5)
    with pytest.raises(ConfigError, match="finite"):
        choose_threshold([np.nan], 0.1)


def test_ledoit_wolf_matches_scikit_learn() -> None:
    from sklearn.covariance import ledoit_wolf as sk_ledoit_wolf

    X = np.random.default_rng(0).normal(size=(50, 80))
    ours, shrinkage = ledoit_wolf(X)
    theirs, sk_shrinkage = sk_ledoit_wolf(X, assume_centered=True)
    assert shrinkage == pytest.approx(sk_shrinkage) and np.allclose(ours, theirs)


def test_calibrate_records_what_it_measured() -> None:
    X, y = _gaussians(600, 0)
    X_held, y_held = _gaussians(200, 1)
    detector = fit_detector(X, y, 3, "mahalanobis")
    logits = (X_held[:, :3] + np.random.default_rng(3).normal(0, 4, (200, 3))) * 3  # often wrong, always sure: overconfident
    record, fitted = calibrate(detector, logits, y_held, detector.score(X_held, logits), rate=0.05)
    assert fitted is not None and fitted.threshold == record.threshold and record.score == "mahalanobis"
    assert record.temperature > 1 and record.ece_after < record.ece_before
    assert record.heldout_unknown_rate is not None and record.heldout_unknown_rate <= 0.05 and record.n_heldout == 200
    assert expected_calibration_error(
        np.exp(logits / record.temperature) / np.exp(logits / record.temperature).sum(1, keepdims=True), y_held
    ) == pytest.approx(record.ece_after, abs=1e-5)


# A small real flowers model


@pytest.fixture(scope="module")
def flowers_model(tmp_path_factory: pytest.TempPathFactory, flowers_cache: tuple[Path, ExtractSummary]) -> headstart.Model:
    """efficientnet_lite0 + linear head on 40 photos per flower class, cross-validated and refitted on all 200.

    Their features are in the session's flowers cache (content-keyed: the copies hit it), so training is instant."""
    return headstart.train(copy_flowers(tmp_path_factory.mktemp("flowers40"), 40), cache_dir=flowers_cache[0])


@pytest.fixture(scope="module")
def flowers_dir(flowers_model: headstart.Model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return flowers_model.save(tmp_path_factory.mktemp("models") / "flowers40")


def test_training_fits_a_calibration_and_a_detector(flowers_model: headstart.Model) -> None:
    record = flowers_model.summary.calibration
    assert record is not None and record.score == "knn" and record.n_heldout == 200  # refitted: every image held out once
    assert flowers_model.detector is not None and flowers_model.detector.threshold == record.threshold
    assert flowers_model.temperature == record.temperature > 0


def test_cats_and_dogs_are_mostly_unknown_to_a_flowers_model_and_flowers_mostly_not(flowers_model: headstart.Model) -> None:
    animals = flowers_model.predict(CATS_DOGS)
    flowers = flowers_model.predict(UNSEEN_FLOWERS)
    assert sum(p.unknown for p in animals) >= 0.9 * len(animals)
    assert sum(p.unknown for p in flowers) <= 0.15 * len(flowers)
    assert all(p.unknown_score is not None for p in [*animals, *flowers])
    off = flowers_model.predict(CATS_DOGS, unknown="off")
    assert not any(p.unknown for p in off) and [p.top_k for p in off] == [p.top_k for p in animals]
    assert all(p.unknown for p in headstart.predict(flowers_model, UNSEEN_FLOWERS, unknown=-1.0))
    with pytest.raises(ConfigError, match="unknown must be"):
        flowers_model.predict(UNSEEN_FLOWERS, unknown="maybe")  # type: ignore[arg-type]


def test_probabilities_are_the_calibrated_ones_with_the_same_argmax(flowers_model: headstart.Model) -> None:
    from headstart.features import extract_features

    features = extract_features(flowers_model.engine, UNSEEN_FLOWERS).features
    raw = flowers_model.head.predict_proba(features)
    logits = flowers_model.head.logits(features) / flowers_model.temperature
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    proba = flowers_model.predict_proba(UNSEEN_FLOWERS)
    np.testing.assert_allclose(proba, expected, atol=1e-6)
    assert (proba.argmax(1) == raw.argmax(1)).all()


def test_predict_cli_unknown_auto_off_and_a_number(flowers_dir: Path, tmp_path: Path) -> None:
    images = [str(CATS_DOGS[0]), str(UNSEEN_FLOWERS[0])]
    runner = CliRunner()
    for option, n_unknown in (("auto", 1), ("off", 0), ("0", 2)):
        out = tmp_path / f"{option}.csv"
        result = runner.invoke(app, ["predict", str(flowers_dir), *images, "--unknown", option, "--csv", str(out)])
        assert result.exit_code == 0, result.output
        rows = list(csv.DictReader(out.read_text().splitlines()))
        assert [r["unknown"] for r in rows].count("true") == n_unknown, (option, rows)
        assert all(float(r["unknown_score"]) >= 0 for r in rows)
        assert ("unknown (closest:" in result.output) == (n_unknown > 0)
    result = runner.invoke(app, ["predict", str(flowers_dir), *images, "--unknown", "nan"])
    assert result.exit_code == 2 and "--unknown" in result.output


# The bundle


def test_the_bundle_round_trips_calibration_and_detector(flowers_model: headstart.Model, flowers_dir: Path) -> None:
    loaded = headstart.load(flowers_dir)
    assert loaded.summary.calibration == flowers_model.summary.calibration and loaded.detector is not None
    assert flowers_model.detector is not None
    for name, tensor in flowers_model.detector.tensors.items():
        np.testing.assert_array_equal(loaded.detector.tensors[name], tensor)
    assert [(p.top_k, p.unknown, p.unknown_score) for p in loaded.predict(CATS_DOGS[:3])] == [
        (p.top_k, p.unknown, p.unknown_score) for p in flowers_model.predict(CATS_DOGS[:3])
    ]


def _edit_summary(bundle: Path, **changes: object) -> None:
    config = json.loads((bundle / "bundle.json").read_text())
    config["summary"]["calibration"].update(changes)
    (bundle / "bundle.json").write_text(json.dumps(config))


def _rewrite_weights(bundle: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save

    data = save(tensors)
    (bundle / "model.safetensors").write_bytes(data)
    config = json.loads((bundle / "bundle.json").read_text())
    config["files"]["model.safetensors"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (bundle / "bundle.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"temperature": -1.0}, "calibration.temperature"),
        ({"temperature": 0}, "calibration.temperature"),
        ({"threshold": "NaN"}, "calibration.threshold"),
        ({"threshold": None}, "calibration.threshold"),
        ({"score": "telepathy"}, "Unknown score kind"),
        ({"k": 0}, "calibration.k"),
        ({"heldout_unknown_rate": 3}, "heldout_unknown_rate"),
    ],
)
def test_tampered_calibration_values_are_refused(flowers_dir: Path, tmp_path: Path, change: dict[str, object], message: str) -> None:
    import shutil

    bundle = Path(shutil.copytree(flowers_dir, tmp_path / "m"))
    _edit_summary(bundle, **change)
    with pytest.raises(BundleError, match=message) as e:
        headstart.load(bundle)
    assert "\n" not in str(e.value)


def test_nan_in_bundle_json_is_refused(flowers_dir: Path, tmp_path: Path) -> None:
    import shutil

    bundle = Path(shutil.copytree(flowers_dir, tmp_path / "m"))
    text = (bundle / "bundle.json").read_text()
    config = json.loads(text)
    threshold = config["summary"]["calibration"]["threshold"]
    (bundle / "bundle.json").write_text(text.replace(f'"threshold": {json.dumps(threshold)}', '"threshold": NaN'))
    with pytest.raises(BundleError, match="NaN"):
        headstart.load(bundle)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: {**t, "unknown.references": t["unknown.references"][:, :7]}, r"references: \(\d+, 7\) instead of"),
        (lambda t: {**t, "unknown.references": np.full_like(t["unknown.references"], np.nan)}, "NaN"),
        (lambda t: {k: v for k, v in t.items() if k != "unknown.references"}, "references: missing"),
        (lambda t: {**t, "unknown.centers": np.zeros((5, 3), np.float32)}, "unexpected centers"),
        (lambda t: {**t, "unknown.references": t["unknown.references"].astype(np.int64)}, "is int64, not float32"),
        (lambda t: {**t, "unknown.references": t["unknown.references"].astype(np.float16)}, "is float16, not float32"),
    ],
)
def test_tampered_detector_tensors_are_refused(flowers_dir: Path, tmp_path: Path, edit: object, message: str) -> None:
    import shutil

    from safetensors.numpy import load_file

    bundle = Path(shutil.copytree(flowers_dir, tmp_path / "m"))
    _rewrite_weights(bundle, edit(load_file(bundle / "model.safetensors")))  # type: ignore[operator]
    with pytest.raises(BundleError, match=message) as e:
        headstart.load(bundle)
    assert "\n" not in str(e.value)


def test_detector_tensors_without_a_record_are_refused(flowers_dir: Path, tmp_path: Path) -> None:
    import shutil

    bundle = Path(shutil.copytree(flowers_dir, tmp_path / "m"))
    config = json.loads((bundle / "bundle.json").read_text())
    config["summary"]["calibration"] = None
    (bundle / "bundle.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="does not describe"):
        headstart.load(bundle)


@pytest.mark.parametrize("version", [1, 2])
def test_old_bundles_load_without_calibration(version: int) -> None:
    folder = Path(__file__).parent / "fixtures" / f"model_v{version}"
    reference = json.loads((Path(__file__).parent / "fixtures" / f"model_v{version}_expected.json").read_text())
    model = headstart.load(folder)
    assert model.detector is None and model.summary.calibration is None and model.temperature == 1.0
    images = [SHARED / p for p in reference["images"]]
    np.testing.assert_allclose(model.predict_proba(images), reference["proba"], atol=1e-5)
    assert not any(p.unknown or p.unknown_score is not None for p in model.predict(images))


# The service and the ONNX export


def test_the_service_answers_unknown_as_predict_does(flowers_dir: Path, flowers_model: headstart.Model) -> None:
    import httpx

    from conftest import start_server
    from headstart.server import create_app

    model = headstart.load(flowers_dir, cache_root=flowers_model.cache_root)
    paths = [CATS_DOGS[0], UNSEEN_FLOWERS[0]]
    want = model.predict(paths).predictions
    server, thread, url = start_server(create_app(flowers_dir, cache_root=flowers_model.cache_root))
    try:
        files = [("file", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]
        response = httpx.post(f"{url}/predict", files=files, timeout=120)
    finally:
        server.should_exit = True
        thread.join(30)
    assert response.status_code == 200, response.text
    got = response.json()["predictions"]
    assert [g["unknown"] for g in got] == [w.unknown for w in want] == [True, False]
    np.testing.assert_allclose([g["unknown_score"] for g in got], [w.unknown_score for w in want], atol=1e-5)
    page = (Path(headstart.__file__).parent / "page.html").read_text()
    assert "prediction.unknown" in page and 'dataset.testid = "unknown"' in page


@pytest.mark.parametrize("kind", [pytest.param(k, marks=[] if k == "knn" else [pytest.mark.slow]) for k in SCORE_KINDS])
def test_the_onnx_export_carries_the_same_probabilities_and_unknown_score_as_predict(
    flowers_model: headstart.Model, tmp_path: Path, kind: str
) -> None:
    import onnxruntime

    from headstart.features import extract_features
    from headstart.model_export import UNKNOWN_OUTPUT, _decode, onnx_model_bytes

    model = flowers_model
    if kind != "knn":  # the same model with another detector, fitted on a few flowers' features
        features = extract_features(model.engine, UNSEEN_FLOWERS * 3).features
        y = np.tile(np.repeat(np.arange(5), 4), 3)  # UNSEEN_FLOWERS: 4 photos of each class in turn
        w = model.head.weights
        detector = fit_detector(features, y, 5, kind, (w["0.mean"], w["0.scale"])).with_threshold(0.5)  # type: ignore[arg-type]
        model = headstart.Model(model.backbone, model.head, model.summary, model.cache_root, detector)
    assert model.detector is not None and model.temperature != 1.0
    session = onnxruntime.InferenceSession(onnx_model_bytes(model, unknown=True), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["unknown"])["threshold"] == model.detector.threshold and json.loads(meta["temperature"]) == model.temperature
    paths = [*CATS_DOGS[:3], *UNSEEN_FLOWERS[:3]]
    (pixels,), kept = _decode(paths, model.data_configs, None, "")
    proba, scores = session.run(["probabilities", UNKNOWN_OUTPUT], {"image": pixels})
    predictions = model.predict(paths, top_k=5).predictions
    np.testing.assert_allclose(proba, model.predict_proba(paths), atol=2e-6)
    np.testing.assert_allclose(scores, [p.unknown_score for p in predictions], rtol=1e-4, atol=1e-4)
    assert list(scores > model.detector.threshold) == [p.unknown for p in predictions]


def test_the_report_shows_a_reliability_diagram_and_the_ece(flowers_model: headstart.Model) -> None:
    from headstart.data import ImageRecord
    from headstart.html_report import _calibration_html

    scores = flowers_model.score([ImageRecord(p, p.parent.name) for p in UNSEEN_FLOWERS])
    record = flowers_model.summary.calibration
    assert record is not None
    html = _calibration_html(flowers_model, scores.proba, scores.y_true)
    assert 'id="reliability"' in html and "data:image/png;base64," in html
    assert f"{record.ece_before:.4f} before, {record.ece_after:.4f} after" in html and "&#x27;knn&#x27; score" in html


@pytest.mark.slow
def test_headstart_export_writes_the_unknown_output_and_checks_the_calibrated_probabilities(flowers_dir: Path, tmp_path: Path) -> None:
    import onnxruntime

    from headstart import api

    result = api.export(flowers_dir, tmp_path / "flowers.onnx")
    assert result.check is not None and result.check.agreement == 1.0 and result.check.max_difference < 1e-5
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["probabilities", "unknown_score"]


@pytest.mark.parametrize("seed", range(6))
def test_a_temperature_is_applied_only_where_it_lowers_the_held_out_calibration_error(seed: int) -> None:
    from headstart.unknown import calibrate

    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (30, 4)).astype(np.float32)  # few images: the likelihood's best temperature may raise the ECE
    y = rng.integers(0, 4, 30)
    record, _ = calibrate(None, logits, y)
    assert record.ece_after <= record.ece_before
    assert record.temperature == 1.0 or record.ece_after < record.ece_before
