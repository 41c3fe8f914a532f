"""`headstart compare`: backbones, their ensemble and heads ranked by cross-validated accuracy on the same images and folds."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import headstart
from conftest import copy_flowers
from headstart.backbone import create_backbone
from headstart.cache import FeatureCache, extract_with_cache
from headstart.classifier import HeadClassifier
from headstart.cli.main import app
from headstart.compare import Leaderboard, compare
from headstart.data import read_source
from headstart.errors import DataError, UnknownBackboneError
from headstart.selection import cross_validate

runner = CliRunner()
PAIR = ("efficientnet_lite0", "efficientnet_lite1")


@pytest.fixture(scope="module")
def flowers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_flowers(tmp_path_factory.mktemp("compare") / "flowers", per_class=12)


@pytest.fixture(scope="module")
def board(flowers: Path, cache_dir: Path) -> Leaderboard:
    return compare(flowers, PAIR, cache_dir=cache_dir)


def features(data: Path, name: str, cache_dir: Path) -> np.ndarray:
    """`name`'s cached features of every image of `data`, in the order compare reads them."""
    records, _, _ = read_source(data)
    net = create_backbone(name)
    extraction = extract_with_cache(net, [r.path for r in records], FeatureCache(cache_dir, net))
    assert len(extraction.kept) == len(records)
    return extraction.features


@pytest.mark.slow
def test_every_backbone_and_head_and_the_ensemble_is_ranked_on_the_same_folds(board: Leaderboard, flowers: Path, cache_dir: Path) -> None:
    rows = {(e.backbone, e.head) for e in board.entries}
    ensemble = "+".join(PAIR)
    assert rows == {(b, h) for b in (*PAIR, ensemble) for h in ("linear", "mlp")}
    assert board.n_images == 60 and board.folds == 5 and len(board.classes) == 5
    accuracies = [e.accuracy for e in board.entries]
    assert accuracies == sorted(accuracies, reverse=True) and board.best is board.entries[0]
    width = {e.backbone: e.n_features for e in board.entries}
    assert width[ensemble] == width[PAIR[0]] + width[PAIR[1]] == 1280 + 1280
    assert all(len(e.fold_accuracy) == 5 and e.accuracy == pytest.approx(np.mean(e.fold_accuracy)) for e in board.entries)
    assert all((e.C is None) == (e.head == "mlp") and (e.epochs is None) == (e.head == "linear") for e in board.entries)
    assert board.best.accuracy > 0.6  # real features of 12 flowers per class: far above the 20% of guessing
    # each row's folds are those of selection.cross_validate on the same features, labels and seed
    lite0, lite1 = (features(flowers, name, cache_dir) for name in PAIR)
    labels = [r.label for r in read_source(flowers)[0]]
    for X, name in ((lite0, PAIR[0]), (np.concatenate([lite0, lite1], axis=1), ensemble)):
        cv = cross_validate(HeadClassifier(), X, labels, n_folds=5, seed=0)
        entry = next(e for e in board.entries if e.backbone == name and e.head == "linear")
        assert entry.fold_accuracy == pytest.approx(cv.fold_accuracy) and cv.params["C"] == entry.C


@pytest.mark.slow
def test_features_come_from_the_cache_the_second_time(board: Leaderboard, flowers: Path, cache_dir: Path) -> None:
    calls: list[str] = []
    again = compare(flowers, [PAIR[1]], heads=["linear"], cache_dir=cache_dir, progress=lambda d, done, total, s="": calls.append(d))
    (entry,) = again.entries
    assert entry.n_extracted == 0 and entry.n_cached == 60
    assert entry.fold_accuracy == next(e.fold_accuracy for e in board.entries if (e.backbone, e.head) == (PAIR[1], "linear"))
    assert any(PAIR[1] in d and "Cross-validating" in d for d in calls)


@pytest.mark.slow
def test_an_earlier_layer_is_a_row_of_its_own(flowers: Path, cache_dir: Path) -> None:
    result = compare(flowers, ["efficientnet_lite0"], heads=["linear"], layers=[None, -2], cache_dir=cache_dir)
    assert {(e.layer, e.n_features) for e in result.entries} == {(None, 1280), (-2, 112)}


@pytest.mark.slow
def test_cli_writes_the_csv_and_the_page_and_trains_the_winner(board: Leaderboard, flowers: Path, cache_dir: Path, tmp_path: Path) -> None:
    table, page, model_dir = tmp_path / "rows.csv", tmp_path / "compare.html", tmp_path / "winner"
    args = ["compare", str(flowers), "--backbone", ",".join(PAIR), "--no-ensembles", "--head", "linear"]
    args += ["--cache-dir", str(cache_dir), "--csv", str(table), "--html", str(page), "--train-best", "--out", str(model_dir)]
    result = runner.invoke(app, args, terminal_width=140)
    assert result.exit_code == 0, result.output
    with table.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and [r["rank"] for r in rows] == ["1", "2"] and {r["backbone"] for r in rows} == set(PAIR)
    assert [float(r["accuracy"]) for r in rows] == sorted((float(r["accuracy"]) for r in rows), reverse=True)
    assert {"fold_1", "fold_5", "C", "epochs", "extraction_seconds", "n_cached", "fit_seconds"} <= set(rows[0])
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 1 and not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert "efficientnet_lite1" in html and "<table>" in html
    model = headstart.load(model_dir)
    assert (model.summary.backbone, model.summary.head) == (rows[0]["backbone"], rows[0]["head"])
    assert "Model saved to" in result.output and rows[0]["backbone"] in result.output


def test_an_unknown_backbone_is_named_in_one_line(flowers: Path, cache_dir: Path) -> None:
    result = runner.invoke(
        app, ["compare", str(flowers), "--backbone", "efficientnet_lite0,efficientnet_lite9", "--cache-dir", str(cache_dir)]
    )
    assert result.exit_code == 1 and "efficientnet_lite9" in result.output and len(result.output.strip().splitlines()) == 1
    with pytest.raises(UnknownBackboneError, match="efficientnet_lite9"):
        compare(flowers, ["efficientnet_lite0+efficientnet_lite9"], cache_dir=cache_dir)


def test_too_few_images_per_class_for_the_folds(tmp_path: Path, cache_dir: Path) -> None:
    small = copy_flowers(tmp_path / "small", per_class=3)
    with pytest.raises(DataError, match=r"3 image\(s\), too few for 5-fold cross-validation.*--folds 3"):
        compare(small, ["efficientnet_lite0"], cache_dir=cache_dir)
    result = runner.invoke(app, ["compare", str(small), "--backbone", "efficientnet_lite0", "--cache-dir", str(cache_dir)])
    assert result.exit_code == 1 and "--folds 3" in result.output and len(result.output.strip().splitlines()) == 1


def test_outputs_never_replace_an_input(flowers: Path, cache_dir: Path, tmp_path: Path) -> None:
    photo = next((flowers / "daisy").iterdir())
    before = photo.read_bytes()
    for args in (["--csv", str(photo)], ["--csv", str(flowers / "daisy" / "rows.csv")], ["--html", str(photo)], ["--train-best"]):
        result = runner.invoke(app, ["compare", str(flowers), "--backbone", "efficientnet_lite0", "--cache-dir", str(cache_dir), *args])
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert photo.read_bytes() == before and not (flowers / "daisy" / "rows.csv").exists()


@pytest.mark.parametrize("args", [["--layer", "99"], ["--layer", "penultimate"], ["--head", "svm"], ["--folds", "1"], ["--backbone", "+"]])
def test_bad_options_are_refused_in_one_line(flowers: Path, cache_dir: Path, args: list[str]) -> None:
    result = runner.invoke(app, ["compare", str(flowers), "--backbone", "efficientnet_lite0", "--cache-dir", str(cache_dir), *args])
    assert result.exit_code in (1, 2) and "Traceback" not in result.output
    assert result.exit_code == 2 or len(result.output.strip().splitlines()) == 1, result.output


def test_a_backbone_named_twice_or_an_ensemble_in_another_order_is_one_row(flowers: Path, cache_dir: Path) -> None:
    lite0, lite1 = PAIR
    twice = compare(flowers, (lite0, lite0), heads=("linear",), cache_dir=cache_dir)
    assert [e.backbone for e in twice.entries] == [lite0]  # no "ensemble" of one backbone with itself
    both_orders = compare(flowers, (f"{lite0}+{lite1}", f"{lite1}+{lite0}"), heads=("linear",), cache_dir=cache_dir)
    assert [e.backbone for e in both_orders.entries] == [f"{lite0}+{lite1}"]
