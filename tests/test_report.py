"""What people look at: the HTML report in a real browser, Grad-CAM, feature maps, ImageNet grids."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import headstart
from conftest import CATS_DOGS_TINY, FLOWERS_TINY, PHOTOS
from headstart.api import explain
from headstart.backbones import create_backbone
from headstart.cli.main import app
from headstart.data import load_image
from headstart.explain import grad_cam, upsampled
from headstart.report import CORRECT, TRAIN_COLOUR, WRONG
from headstart.transforms import preprocess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "model"
    headstart.train(CATS_DOGS_TINY, strategy="mlp", out=out, cache_dir=out.parent / "cache")
    return out


def test_report_is_self_contained_with_every_section(trained: Path) -> None:
    page = (trained / "report.html").read_text()
    for section in (
        "summary",
        "training-curves",
        "confusion-matrix",
        "per-class-scores",
        "validation-predictions",
        "class-activation-maps",
    ):
        assert f'<section id="{section}">' in page
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)"', page)
    assert len(images) >= 4 and all(alt for _, alt in images)
    for data, _ in images:
        assert Image.open(io.BytesIO(base64.b64decode(data))).size[0] > 200
    assert 'src="http' not in page and "<script" not in page
    assert "cats" in page and "dogs" in page


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)")
def test_report_renders_in_headless_chromium(trained: Path, tmp_path: Path) -> None:
    url = (trained / "report.html").resolve().as_uri()
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for element in ('id="curves"', 'id="confusion"', 'id="predictions"', 'id="gradcam"'):
        assert element in dom.stdout
    shot = tmp_path / "shot.png"
    result = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,4200", url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    assert pixels.std() > 20  # not blank

    def shows(colour: str) -> bool:
        rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
        return bool((np.abs(pixels - rgb).sum(1) < 40).sum() > 50)

    assert shows(TRAIN_COLOUR)  # the curves were drawn
    assert shows(CORRECT) or shows(WRONG)  # the prediction grid's frames


def test_gradcam_on_the_cat_lies_on_the_cat() -> None:
    """The cat photo pasted into a corner of the espresso photo: the cat classes must light up the cat."""
    backbone = create_backbone("efficientnet_lite0")
    canvas = load_image(PHOTOS / "sk_coffee.png").resize((448, 448))
    box = (208, 288, 448, 448)  # left, top, right, bottom
    canvas.paste(load_image(PHOTOS / "sk_chelsea.png").resize((box[2] - box[0], box[3] - box[1])), box[:2])
    canvas = canvas.resize((256, 256))  # resize_and_crop: 256 then the centre 224
    batch = torch.from_numpy(preprocess(canvas, backbone.data_config))[None]
    scale, offset = 256 / 448, 16
    left, top, right, bottom = (int(v * scale) - offset for v in box)
    share = (min(right, 224) - left) * (min(bottom, 224) - top) / 224**2
    for class_index in (281, 282):  # tabby, tiger cat
        cam = upsampled(grad_cam(backbone, batch, class_index), (224, 224))
        inside = cam[top:bottom, left:right].sum() / cam.sum()
        assert inside > 2.5 * share, (class_index, inside, share)


def test_explain_works_for_frozen_finetuned_and_other_backbones(trained: Path, tmp_path: Path) -> None:
    images = sorted((CATS_DOGS_TINY / "val" / "cats").iterdir())[:2]
    result = runner.invoke(app, ["explain", str(trained), *map(str, images), "--out", str(tmp_path / "frozen"), "--class", "dogs"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "frozen").glob("*_gradcam.png"))) == 2
    tuned = headstart.train(FLOWERS_TINY, strategy="finetune", epochs=1, unfreeze=1, cache_dir=tmp_path / "c")
    layered = headstart.train(FLOWERS_TINY, layer=-2, cache_dir=tmp_path / "c")
    for name, model in (("tuned", tuned), ("layer", layered)):
        result = explain(model, [images[0]], tmp_path / name)
        assert not result.skipped and Image.open(result.written[0]).size[0] > 300
    bad = runner.invoke(app, ["explain", str(trained), str(images[0]), "--class", "horses"])
    assert bad.exit_code == 1 and "Unknown class 'horses'" in bad.output


def test_activations_and_imagenet_grid(trained: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["activations", str(trained), str(PHOTOS / "dog.jpg"), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "dog_activations.png").is_file()
    result = runner.invoke(app, ["activations", "efficientnet_lite0", str(PHOTOS / "sk_chelsea.png"), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    grid = np.asarray(Image.open(tmp_path / "sk_chelsea_activations.png").convert("L"), dtype=float)
    assert grid.shape[0] > 5 * 100 and grid.std() > 20  # five stages, not blank
    result = runner.invoke(app, ["imagenet", str(PHOTOS), "--top-k", "1", "--grid", str(tmp_path / "imagenet.png")])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "imagenet.png").size[0] > 600


def test_report_command_rebuilds_from_other_data(trained: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(trained), str(CATS_DOGS_TINY), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert '<section id="confusion-matrix">' in (tmp_path / "r.html").read_text()


def test_gradcam_for_a_timm_backbone_with_a_headstart_head(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    from headstart.heads import build_head

    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet").state_dict(), tmp_path / "w.safetensors")
    backbone = create_backbone("timm:test_resnet", tmp_path / "w.safetensors")
    batch = torch.from_numpy(preprocess(load_image(PHOTOS / "dog.jpg"), backbone.data_config))[None]
    head = build_head("linear", backbone.n_features, 2).eval()
    with torch.no_grad():  # class 0 scores the mean feature, so its evidence is all positive
        head[1].weight.copy_(torch.stack([torch.ones(backbone.n_features), -torch.ones(backbone.n_features)]) / backbone.n_features)
    cam = grad_cam(backbone, batch, 0, head)
    assert cam.ndim == 2 and cam.shape[0] > 1 and cam.min() >= 0.0 and cam.max() == pytest.approx(1.0)
