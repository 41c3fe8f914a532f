"""Ensembles of backbones: `--backbone a+b` trains one head on the members' features concatenated."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

import headstart
from conftest import PHOTOS, SHARED, copy_flowers, start_server
from headstart.backbone import MAX_MEMBERS, create_backbone, create_backbones, parse_backbones
from headstart.cache import FeatureCache, extract_members_with_cache, extract_with_cache
from headstart.cli.main import app
from headstart.config import DataConfig
from headstart.data import list_images
from headstart.engine import create_engine
from headstart.errors import BundleError, ConfigError
from headstart.files import file_digest
from headstart.model_export import export
from headstart.pipeline import decode_input, decode_inputs
from test_export import assert_same_as_predict

PAIR = "efficientnet_lite0+efficientnet_lite1"
TRIPLE = "efficientnet_lite0+efficientnet_lite1+efficientnet_lite2"


def one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.startswith("Error:"), result.output
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def flowers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 20 photos of each flower class (100)."""
    return copy_flowers(tmp_path_factory.mktemp("flowers20"), 20)


@pytest.fixture(scope="module")
def singles(flowers: Path, cache_dir: Path) -> dict[str, headstart.Model]:
    """Lite0 and Lite1 trained alone: their features are then in the members' caches."""
    return {name: headstart.train(flowers, backbone=name, cache_dir=cache_dir, report=False) for name in parse_backbones(PAIR)}


@pytest.fixture(scope="module")
def pair(flowers: Path, cache_dir: Path, singles: dict[str, headstart.Model]) -> headstart.Model:
    return headstart.train(flowers, backbone=PAIR, cache_dir=cache_dir, report=False)


@pytest.fixture(scope="module")
def pair_dir(pair: headstart.Model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pair.save(tmp_path_factory.mktemp("models") / "pair")


def test_an_ensemble_after_its_members_extracts_nothing_and_concatenates_in_order(
    flowers: Path, cache_dir: Path, singles: dict[str, headstart.Model], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_engine(*args: object, **kwargs: object) -> None:
        raise AssertionError("an engine was made: some image ran through a backbone")

    monkeypatch.setattr("headstart.training.create_engine", no_engine)
    model = headstart.train(flowers, backbone=PAIR, cache_dir=cache_dir, report=False)
    assert model.summary.n_extracted == 0 and model.summary.n_cached == 100
    assert model.backbone_name == model.summary.backbone == PAIR
    assert [b.name for b in model.backbones] == list(parse_backbones(PAIR))
    assert [b.data_config.input_size for b in model.backbones] == [224, 240] and model.head.n_features == 2560
    # The head's features are each member's cached features, side by side in member order.
    paths = sorted(p for p in flowers.rglob("*.jpg"))
    nets = create_backbones(PAIR, cache_root=cache_dir)
    joined = extract_members_with_cache(nets, paths, [FeatureCache(cache_dir, b) for b in nets], make_engine=no_engine)
    alone = [extract_with_cache(b, paths, FeatureCache(cache_dir, b), make_engine=no_engine).features for b in nets]
    np.testing.assert_array_equal(joined.features, np.concatenate(alone, axis=1))
    assert joined.n_extracted == 0 and len(joined.kept) == len(paths) == 100
    # ...and on them the head gives the probabilities `predict` gives from the photos.
    np.testing.assert_allclose(model.outputs(joined.features[:10])[0], model.predict_proba(paths[:10]), atol=1e-5)


def test_an_image_counts_only_if_every_member_reads_it(cache_dir: Path, singles: object, tmp_path: Path) -> None:
    nets = create_backbones(PAIR, cache_root=cache_dir)
    make_engine = partial(create_engine, cache_root=cache_dir)
    good = tmp_path / "good.jpg"
    shutil.copy(PHOTOS / "dog.jpg", good)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes((PHOTOS / "dog.jpg").read_bytes()[:300])
    caches = [FeatureCache(tmp_path / "c", b) for b in nets]
    caches[0].store({file_digest(broken): np.ones(1280, np.float32)})  # the first member "read" it once, from its cache
    result = extract_members_with_cache(nets, [broken, good], caches, make_engine=make_engine)
    assert result.kept.tolist() == [1] and result.features.shape == (1, 2560)
    assert [s.path for s in result.skipped] == [broken]  # listed once, with the member's reason
    single = extract_with_cache(nets[1], [good], None, make_engine=make_engine)
    np.testing.assert_allclose(result.features[0, 1280:], single.features[0], atol=1e-6)


def test_each_image_is_decoded_once_then_prepared_per_member(tmp_path: Path) -> None:
    cfgs = [DataConfig(size, resize, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) for size, resize in ((224, 256), (240, 272), (260, 292))]
    photo = next((SHARED / "datasets" / "flowers" / "roses").iterdir())
    for got, cfg in zip(decode_inputs(photo, cfgs), cfgs, strict=True):  # a small photo: no reduced decoding, same as alone
        np.testing.assert_array_equal(got, decode_input(photo, cfg))
    large = tmp_path / "large.jpg"
    with Image.open(photo) as opened:
        image = opened.convert("RGB")
    image.resize((1050 * image.width // image.height, 1050)).save(large, quality=95)  # 1/2 scale suits Lite0 alone, not Lite2
    lite0 = decode_inputs(large, cfgs)[0]
    assert lite0.shape == (224, 224, 3)
    assert not np.array_equal(lite0, decode_input(large, cfgs[0]))  # decoded at the scale the largest member needs


def test_an_ensemble_predicts_evaluates_and_reloads_the_same(pair: headstart.Model, pair_dir: Path, flowers: Path, tmp_path: Path) -> None:
    config = json.loads((pair_dir / "bundle.json").read_text())
    assert config["format_version"] == 7
    assert [(b["name"], b["n_features"], b["data_config"]["input_size"]) for b in config["backbones"]] == [
        ("efficientnet_lite0", 1280, 224),
        ("efficientnet_lite1", 1280, 240),
    ]
    loaded = headstart.load(pair_dir)
    assert [b.weights_sha256 for b in loaded.backbones] == [b.weights_sha256 for b in pair.backbones]
    photos = sorted((flowers / "tulips").iterdir())[:4]
    with Image.open(photos[0]) as image:
        image.load()
        inputs = [*photos, image, np.asarray(image.convert("RGB"))]
    proba = pair.predict_proba(inputs)
    np.testing.assert_array_equal(loaded.predict_proba(inputs), proba)
    np.testing.assert_allclose(proba[4:], np.repeat(proba[:1], 2, axis=0), atol=1e-6)  # in memory as from the file
    by_folder = headstart.predict(loaded, [flowers / "tulips"], top_k=5)
    assert len(by_folder) == 20 and not by_folder.skipped
    assert {p.path for p in by_folder} == set((flowers / "tulips").iterdir())
    labelled = copy_flowers(tmp_path / "labelled", 2, last=True)  # photos the heads were not fitted on
    assert headstart.evaluate(loaded, labelled).evaluation.accuracy == headstart.evaluate(pair, labelled).evaluation.accuracy
    val = list(loaded.summary.val_images)
    np.testing.assert_array_equal(loaded.score(val).proba, pair.score(val).proba)
    assert loaded.detector is not None and loaded.temperature == pair.temperature  # calibrated on the concatenated features
    with pytest.raises(ConfigError, match="ensemble of 2 backbones"):
        _ = loaded.backbone


def test_info_shows_every_member_without_loading_weights(pair_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were loaded")

    monkeypatch.setattr("headstart.bundle.load_safetensors", forbidden)
    monkeypatch.setattr("headstart.model.create_backbone", forbidden)
    result = CliRunner().invoke(app, ["info", str(pair_dir)])
    assert result.exit_code == 0, result.output
    assert "an ensemble of 2" in result.output
    assert "efficientnet_lite0: 1280 features, input 224 px (resize 256" in result.output
    assert "efficientnet_lite1: 1280 features, input 240 px (resize 272" in result.output


Edit = Callable[[dict[str, Any]], None]


def _tampered(pair_dir: Path, tmp_path: Path, edit: Edit) -> Path:
    folder = tmp_path / "m"
    shutil.copytree(pair_dir, folder)
    config = json.loads((folder / "bundle.json").read_text())
    edit(config)
    (folder / "bundle.json").write_text(json.dumps(config))
    return folder


def _wrong_hash(c: dict[str, Any]) -> None:
    c["backbones"][1]["weights_sha256"] = "0" * 64


def _wrong_width(c: dict[str, Any]) -> None:
    c["backbones"][1]["n_features"] = 1000


def _too_many(c: dict[str, Any]) -> None:
    c["backbones"] = c["backbones"] * 5


def _joined_name(c: dict[str, Any]) -> None:
    c["backbones"][0]["name"] = PAIR


def _tuned_member(c: dict[str, Any]) -> None:
    c["backbones"][0]["finetuned_from"] = "a" * 64


def _other_preprocessing(c: dict[str, Any]) -> None:
    c["backbones"][1]["data_config"]["input_size"] = 224


def _none(c: dict[str, Any]) -> None:
    c["backbones"] = []


@pytest.mark.parametrize(
    ("edit", "message", "without_weights"),
    [
        (_wrong_hash, "backbone 'efficientnet_lite1' weights differ from those the model was trained with", False),
        (_wrong_width, r"n_features, 1280 \(efficientnet_lite0\) \+ 1000 \(efficientnet_lite1\), do not match the head's \[2560\]", True),
        (_too_many, f"field 'backbones' must be a list of 1 to {MAX_MEMBERS} backbone records", True),
        (_none, f"field 'backbones' must be a list of 1 to {MAX_MEMBERS} backbone records", True),
        (_joined_name, r"field 'backbones\[0\].name' must be a backbone name \(no '\+'\)", True),
        (_tuned_member, r"field 'backbones\[0\].finetuned_from' must be null \(an ensemble's backbones are not fine-tuned\)", True),
        (_other_preprocessing, "preprocessing in bundle.json differs from backbone 'efficientnet_lite1'", False),
    ],
)
def test_a_tampered_ensemble_is_refused_in_one_line(
    pair_dir: Path, tmp_path: Path, edit: Edit, message: str, without_weights: bool, flowers: Path
) -> None:
    folder = _tampered(pair_dir, tmp_path, edit)
    with pytest.raises(BundleError, match=message):
        headstart.load(folder)
    assert re.search(message, one_line_error(["predict", str(folder), str(next(flowers.rglob("*.jpg")))]))
    if without_weights:  # caught from bundle.json and the safetensors header alone
        assert re.search(message, one_line_error(["info", str(folder)]))


@pytest.mark.slow
def test_explain_writes_a_grad_cam_per_backbone(pair: headstart.Model, pair_dir: Path, flowers: Path, tmp_path: Path) -> None:
    from headstart.engine import OnnxEngine, TorchEngine
    from headstart.gradcam import class_activation_maps

    photo = sorted((flowers / "sunflowers").iterdir())[0]
    result = headstart.explain(pair_dir, [photo], tmp_path / "cams")
    (png,) = result.written
    with Image.open(png) as written:
        assert written.width >= 850  # the photo and one heatmap per backbone, 3 inches each
    with Image.open(photo) as opened:
        image = opened.convert("RGB")
    assert all(isinstance(e, OnnxEngine) and e.mean_pooled for e in pair.engines)
    (cams,) = class_activation_maps(pair, [image], [2])
    assert [cam.shape for cam in cams] == [(7, 7), (8, 8)]
    # Each member's map is weighted by the gradient with respect to its own slice of the features: PyTorch's
    # autograd through the head, the other member's features held fixed, agrees.
    torch_model = headstart.Model(pair.backbones, pair.head, pair.summary, pair.cache_root)
    torch_model.__dict__["engines"] = tuple(TorchEngine(b) for b in pair.backbones)
    (expected,) = class_activation_maps(torch_model, [image], [2])
    for cam, want in zip(cams, expected, strict=True):
        np.testing.assert_allclose(cam, want, atol=1e-3)
    # A map differs from the one its backbone's share of a different class weights.
    (other,) = class_activation_maps(pair, [image], [0])
    assert not np.allclose(other[1], cams[1], atol=1e-2)


@pytest.mark.slow
def test_onnx_export_of_an_ensemble_answers_as_headstart_predict(pair_dir: Path, flowers: Path, tmp_path: Path) -> None:
    out = tmp_path / "pair.onnx"
    result = headstart.export(pair_dir, out)
    assert result.check is not None and result.check.n_images == 20
    assert result.check.agreement == 1.0 and result.check.max_difference < 1e-5
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    assert [(i.name, [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]) for i in proto.graph.input] == [
        ("image_0", ["batch", 224, 224, 3]),
        ("image_1", ["batch", 240, 240, 3]),
    ]
    meta = {p.key: p.value for p in proto.metadata_props}
    prep = json.loads(meta["preprocessing"])
    assert meta["backbone"] == PAIR and prep["jpeg_draft_size"] == 544
    assert [(i["name"], i["backbone"], i["resize_size"], i["input_size"]) for i in prep["inputs"]] == [
        ("image_0", "efficientnet_lite0", 256, 224),
        ("image_1", "efficientnet_lite1", 272, 240),
    ]
    with Image.open(sorted((flowers / "daisy").iterdir())[0]) as opened:
        image = opened.convert("RGB")
    image.resize((1050 * image.width // image.height, 1050)).save(tmp_path / "large.jpg", quality=95)  # reduced decoding
    image.convert("RGBA").save(tmp_path / "alpha.png")
    photos = [*sorted(p for p in flowers.rglob("*.jpg"))[::20], PHOTOS / "kite.jpg", tmp_path / "large.jpg", tmp_path / "alpha.png"]
    assert_same_as_predict(out, pair_dir, photos)


@pytest.mark.slow
def test_a_single_backbone_export_lists_its_one_input(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Files of one backbone keep their input `image` and the sizes at the top of `preprocessing`, and list it in `inputs` too."""
    out = tmp_path / "one.onnx"
    export(headstart.load(tiny_model_dir), out)
    prep = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["preprocessing"])
    assert (prep["input_size"], prep["resize_size"], prep["jpeg_draft_size"]) == (224, 256, 512)
    assert [(i["name"], i["input_size"]) for i in prep["inputs"]] == [("image", 224)]


@pytest.mark.slow
def test_int8_export_of_an_ensemble_calibrates_every_input(pair_dir: Path, tmp_path: Path) -> None:
    result = headstart.export(pair_dir, tmp_path / "pair.int8.onnx", int8=True, calibration=PHOTOS)
    assert result.check is not None and result.check.agreement >= 0.85
    assert result.reference_size_bytes is not None and result.size_bytes < result.reference_size_bytes / 3
    proto = onnx.load(str(tmp_path / "pair.int8.onnx"))
    assert [i.name for i in proto.graph.input] == ["image_0", "image_1"]
    assert sum(n.op_type == "QuantizeLinear" for n in proto.graph.node) > 50


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("onnx2tf") is None or importlib.util.find_spec("ai_edge_litert") is None,
    reason="the tflite extra is not installed: pip install 'headstart[tflite]'",
)
def test_tflite_export_of_an_ensemble_has_an_input_per_backbone(pair_dir: Path, tmp_path: Path) -> None:
    from ai_edge_litert.interpreter import Interpreter

    limit = sys.getrecursionlimit()
    result = headstart.export(pair_dir, tmp_path / "pair.tflite", format="tflite")
    assert sys.getrecursionlimit() == limit  # onnx2tf's import lifts it to the C int maximum: put back, or deep JSON would crash us
    assert result.check is not None and result.check.n_images == 20  # LiteRT against the fp32 ONNX file
    assert result.check.agreement == 1.0 and result.check.max_difference < 1e-4
    inputs = Interpreter(model_path=str(tmp_path / "pair.tflite")).get_input_details()
    assert sorted((d["name"], tuple(d["shape_signature"][1:])) for d in inputs) == [
        ("serving_default_image_0:0", (224, 224, 3)),
        ("serving_default_image_1:0", (240, 240, 3)),
    ]


def test_the_server_serves_an_ensemble(pair: headstart.Model, pair_dir: Path, cache_dir: Path, flowers: Path, tmp_path: Path) -> None:
    import httpx

    from headstart.server import create_app

    photo = sorted((flowers / "roses").iterdir())[1]
    with Image.open(photo) as opened:
        image = opened.convert("RGB")
    image.resize((1050 * image.width // image.height, 1050)).save(tmp_path / "large.jpg", quality=95)
    uploads = [photo, tmp_path / "large.jpg", PHOTOS / "sk_chelsea.png"]
    expected = headstart.predict(pair, uploads, top_k=5).predictions
    server, thread, url = start_server(create_app(pair_dir, cache_root=cache_dir))
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            info = client.get("/info").json()
            reply = client.post("/predict?top_k=5", files=[("file", (p.name, p.read_bytes())) for p in uploads])
    finally:
        server.should_exit = True
        thread.join(30)
    assert info["backbone"] == PAIR and info["input_size"] is None
    assert [(b["name"], b["input_size"]) for b in info["backbones"]] == [("efficientnet_lite0", 224), ("efficientnet_lite1", 240)]
    assert reply.status_code == 200, reply.text
    for got, want in zip(reply.json()["predictions"], expected, strict=True):
        assert [e["label"] for e in got["top_k"]] == [label for label, _ in want.top_k]
        np.testing.assert_allclose([e["probability"] for e in got["top_k"]], [p for _, p in want.top_k], atol=1e-6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategy", "finetune"], "Strategy 'finetune' takes one backbone"),
        (["--strategy", "auto"], "Strategy 'auto' takes one backbone"),
        (["--weights", str(PHOTOS / "dog.jpg")], "--weights is the weights file of an ensemble's one timm: member"),
    ],
)
def test_what_ensembles_do_not_do_is_refused_in_one_line(args: list[str], message: str, flowers: Path, tmp_path: Path) -> None:
    assert message in one_line_error(["train", str(flowers), "--backbone", PAIR, "--out", str(tmp_path / "m"), *args])
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("efficientnet_lite0++efficientnet_lite1", "an empty name between '+' signs"),
        ("efficientnet_lite0+efficientnet_lite0", "'efficientnet_lite0' is named twice"),
        ("+".join(["efficientnet_lite0"] * (MAX_MEMBERS + 1)), f"an ensemble takes at most {MAX_MEMBERS}"),
    ],
)
def test_malformed_ensemble_names_are_refused(name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_backbones(name)


def test_one_backbone_commands_refuse_an_ensemble(pair_dir: Path, tmp_path: Path) -> None:
    assert "is an ensemble of backbones; this takes one backbone" in one_line_error(
        ["imagenet", str(PHOTOS / "dog.jpg"), "--backbone", PAIR]
    )
    assert "ensemble of 2 backbones" in one_line_error(["activations", str(pair_dir), str(PHOTOS / "dog.jpg"), "--out", str(tmp_path)])
    with pytest.raises(ConfigError, match="is an ensemble"):
        create_backbone(PAIR)


def test_an_ensemble_with_a_timm_member_takes_its_weights_file(flowers: Path, cache_dir: Path, tmp_path: Path) -> None:
    from test_backbones import random_weights

    weights = random_weights(tmp_path / "resnet.safetensors", seed=0)
    name = "efficientnet_lite0+timm:test_resnet"
    model = headstart.train(flowers, backbone=name, weights=weights, cache_dir=cache_dir, report=False)
    folder = model.save(tmp_path / "m")
    members = json.loads((folder / "bundle.json").read_text())["backbones"]
    assert [(b["name"], b["weights_file"]) for b in members] == [("efficientnet_lite0", None), ("timm:test_resnet", "backbone.safetensors")]
    assert (folder / "backbone.safetensors").read_bytes() == weights.read_bytes()  # the folder keeps its own copy
    photos = sorted((flowers / "daisy").iterdir())[:3]
    loaded = headstart.load(folder, cache_root=cache_dir)
    np.testing.assert_array_equal(loaded.predict_proba(photos), model.predict_proba(photos))
    other = random_weights(tmp_path / "other.safetensors", seed=1)
    with pytest.raises(BundleError, match="backbone 'timm:test_resnet' weights differ"):
        headstart.load(folder, weights=other, cache_root=cache_dir)


@pytest.mark.slow
def test_layer_pools_that_stage_of_every_member(flowers: Path, cache_dir: Path, tmp_path: Path) -> None:
    from headstart.gradcam import class_activation_maps

    model = headstart.train(flowers, backbone=PAIR, layer=-2, cache_dir=cache_dir, report=False)
    stages = [(b.layer, b.n_features) for b in model.backbones]
    assert stages == [(3, 112), (3, 112)] and model.head.n_features == 224 and model.summary.layer == 3
    folder = model.save(tmp_path / "m")
    assert [b["layer"] for b in json.loads((folder / "bundle.json").read_text())["backbones"]] == [3, 3]
    assert "efficientnet_lite0, stage 3: 112 features" in " ".join(CliRunner().invoke(app, ["info", str(folder)]).output.split())
    photos = sorted((flowers / "roses").iterdir())[:3]
    loaded = headstart.load(folder, cache_root=cache_dir)
    np.testing.assert_array_equal(loaded.predict_proba(photos), model.predict_proba(photos))
    with Image.open(photos[0]) as opened:
        (cams,) = class_activation_maps(loaded, [opened.convert("RGB")], [0])
    assert [cam.shape for cam in cams] == [(14, 14), (15, 15)]  # stride 16 on 224 and 240 px inputs


@pytest.mark.slow
def test_three_backbones_after_their_single_runs_extract_nothing(flowers: Path, cache_dir: Path, tmp_path: Path) -> None:
    for name in parse_backbones(TRIPLE):
        headstart.train(flowers, backbone=name, cache_dir=cache_dir, report=False)
    model = headstart.train(flowers, backbone=TRIPLE, cache_dir=cache_dir, out=tmp_path / "m")
    assert model.summary.n_extracted == 0 and model.head.n_features == 3 * 1280
    assert "Grad-CAM (efficientnet_lite2)" in (tmp_path / "m" / "report.html").read_text()
    photos, _ = list_images([flowers / "roses"])
    loaded = headstart.load(tmp_path / "m", cache_root=cache_dir)
    np.testing.assert_array_equal(loaded.predict_proba(photos[:5]), model.predict_proba(photos[:5]))
    assert [b.data_config.input_size for b in loaded.backbones] == [224, 240, 260]


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_models_saved_before_ensembles_load_as_one_backbone_and_resave_as_format_5(version: int, tmp_path: Path) -> None:
    folder = Path(__file__).parent / "fixtures" / f"model_v{version}"
    expected = json.loads(folder.with_name(f"model_v{version}_expected.json").read_text())
    model = headstart.load(folder)
    assert [b.name for b in model.backbones] == ["efficientnet_lite0"] and model.backbone is model.backbones[0]
    resaved = headstart.load(model.save(tmp_path / "m"))
    (member,) = json.loads((tmp_path / "m" / "bundle.json").read_text())["backbones"]
    assert member["name"] == "efficientnet_lite0" and member["data_config"]["input_size"] == 224
    images = [SHARED / p for p in expected["images"]]
    np.testing.assert_allclose(resaved.predict_proba(images), expected["proba"], atol=1e-5)
    if "unknown_scores" in expected:  # format 4 brought calibration and an unknown detector, kept through the re-save
        assert resaved.temperature == model.temperature != 1.0
        np.testing.assert_allclose([p.unknown_score for p in resaved.predict(images)], expected["unknown_scores"], atol=1e-5)
