"""What people look at: the HTML report in a real browser, Grad-CAM, feature maps, ImageNet grids."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import headstart
from conftest import CATS_DOGS_TINY, FLOWERS_TINY, PHOTOS, unseen_cats_dogs, write_image
from headstart.api import explain
from headstart.backbone import create_backbone
from headstart.cli.main import app
from headstart.data import load_image
from headstart.gradcam import grad_cam, upsampled
from headstart.html_report import CORRECT, TRAIN_COLOUR, WRONG, confusion_table, image_tile
from headstart.metrics import Evaluation
from headstart.transforms import preprocess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "model"
    headstart.train(CATS_DOGS_TINY, strategy="mlp", out=out, cache_dir=out.parent / "cache")
    return out


class _ConfusionCells(HTMLParser):
    """The text of each cell of the table with id "confusion", row by row; a cell's text pieces joined by a space."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[list[str]] = []
        self.inside = False
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.inside = ("id", "confusion") in attrs
        elif self.inside and tag == "tr":
            self.rows.append([])
        elif self.inside and tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.inside = False
        elif self.inside and tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append(" ".join(self.cell))
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def confusion_cells(page: str) -> list[list[str]]:
    parser = _ConfusionCells()
    parser.feed(page)
    return parser.rows


TILE = re.compile(
    r'<figure class="tile (ok|wrong)?"><img src="data:image/jpeg;base64,([^"]+)" alt="([^"]*)"[^>]*><figcaption>(.*?)</figcaption>'
)


def tiles(page: str, figure_id: str) -> list[tuple[str, Image.Image, str, str]]:
    """(kind, decoded thumbnail, alt, caption HTML) of each tile inside the figure with id `figure_id`."""
    start = page.index(f'<figure id="{figure_id}">')
    part = page[start : page.index("</section>", start)]
    return [(kind, Image.open(io.BytesIO(base64.b64decode(data))), alt, caption) for kind, data, alt, caption in TILE.findall(part)]


@pytest.mark.slow
def test_report_is_self_contained_with_every_section(trained: Path) -> None:
    page = (trained / "report.html").read_text()
    for section in (
        "summary",
        "training-curves",
        "confusion-matrix",
        "per-class-scores",
        "validation-predictions",
        "top-losses",
        "class-activation-maps",
    ):
        assert f'<section id="{section}">' in page
    (curves,) = re.findall(r'<figure id="curves"><img src="data:image/png;base64,([^"]+)" alt="[^"]+"', page)
    assert Image.open(io.BytesIO(base64.b64decode(curves))).size[0] > 600
    assert 'src="http' not in page and "<script" not in page
    assert "cats" in page and "dogs" in page


MARK = {
    "ok": '<span class="mark" role="img" aria-label="correct">✓</span> ',
    "wrong": '<span class="mark" role="img" aria-label="wrong">✗</span> ',
}


@pytest.mark.slow
def test_report_tiles_are_jpeg_thumbnails_captioned_in_html(trained: Path) -> None:
    page = (trained / "report.html").read_text()
    validation = headstart.load(trained).summary.validation
    assert validation is not None
    n_wrong = validation.n_images - int(np.trace(validation.confusion))
    shown = tiles(page, "predictions")
    assert len(shown) == min(16, validation.n_images)
    for kind, image, alt, caption in shown:
        assert image.format == "JPEG" and image.size == (224, 224) and np.asarray(image).std() > 10  # a photo, not a blank
        assert re.fullmatch(r"(cat|dog)\.\d+\.jpg: true (cats|dogs), predicted (cats|dogs)", alt), alt
        match = re.fullmatch(
            r"true (\w+)<br>pred (\w+) \((\d\.\d\d)\)<br><small title=\"([^\"]+)\">\4</small>", caption.removeprefix(MARK[kind])
        )
        assert match and caption.startswith(MARK[kind]), caption
        assert (match[1] == match[2]) == (kind == "ok") and float(match[3]) >= 0.5
    top = tiles(page, "top-losses") if n_wrong else []
    assert len(top) == min(8, n_wrong) and all(kind == "wrong" for kind, *_ in top)
    assert n_wrong or "No validation image was misclassified." in page
    cams = tiles(page, "gradcam")
    assert len(cams) == 2 * (min(3, validation.n_images - n_wrong) + min(3, n_wrong)) == 2 * page.count('<div class="pair">')
    for (kind, photo, _, _), (cam_kind, heatmap, _, cam_caption) in zip(cams[::2], cams[1::2], strict=True):
        assert kind == cam_kind and re.fullmatch(r"Grad-CAM for &#x27;(cats|dogs)&#x27;", cam_caption.removeprefix(MARK[kind]))
        assert photo.size == heatmap.size == (224, 224)
        assert np.abs(np.asarray(photo, dtype=float) - np.asarray(heatmap, dtype=float)).mean() > 10  # the heatmap is drawn over it


@pytest.mark.slow
def test_report_confusion_table_holds_the_validation_counts(trained: Path) -> None:
    validation = headstart.load(trained).summary.validation
    assert validation is not None
    rows = confusion_cells((trained / "report.html").read_text())
    assert rows[0] == ["", "predicted"] and rows[1] == ["true", *validation.classes]
    totals = validation.support
    for i, row in enumerate(rows[2:]):
        assert row[0] == validation.classes[i]
        assert row[1:] == [f"{n} {n / totals[i]:.2f}" for n in validation.confusion[i]]


def test_confusion_table_escapes_names_and_shades_by_row_fraction() -> None:
    names = ["<script>$x$", 'a&b"q', "empty"]
    evaluation = Evaluation(names, ((3, 1, 0), (0, 4, 0), (0, 0, 0)), 0.1)
    page = confusion_table(evaluation)
    assert "<script" not in page and "&lt;script&gt;$x$" in page and "a&amp;b&quot;q" in page
    rows = confusion_cells(page)
    assert rows[1] == ["true", *names]
    assert rows[2:] == [
        ["<script>$x$", "3 0.75", "1 0.25", "0 0.00"],
        ['a&b"q', "0 0.00", "4 1.00", "0 0.00"],
        ["empty", "0 0.00", "0 0.00", "0 0.00"],  # a class without images: no division by zero
    ]
    backgrounds = re.findall(r'<td(?: class="hit")? style="background:(#[0-9a-f]{6});color:(#[0-9a-f]{6})"', page)
    assert len(backgrounds) == 9
    assert backgrounds[0] != backgrounds[1] and backgrounds[4][1] == "#ffffff" and backgrounds[8] == ("#f7fbff", "#1f2328")


def test_image_tile_escapes_its_text_and_encodes_a_jpeg() -> None:
    image = Image.new("RGB", (50, 40), (200, 30, 30))
    tile = image_tile(image, ["true <script>$x$", "pred a&b"], alt='"><img src=x>', correct=False, note="new\nline.jpg")
    assert "<script" not in tile and "<img src=x" not in tile and "&lt;script&gt;$x$" in tile and "new\\x0aline.jpg" in tile
    assert tile.startswith('<figure class="tile wrong">') and 'aria-label="wrong">✗</span>' in tile
    ((_, decoded, alt, _),) = [(k, i, a, c) for k, i, a, c in tiles(f'<figure id="t">{tile}</figure></section>', "t")]
    assert decoded.size == (50, 40) and alt == "&quot;&gt;&lt;img src=x&gt;"


@pytest.mark.slow
def test_report_with_hostile_class_names(tmp_path: Path) -> None:
    names = ["<script>$x$", "a&b'q"]
    for k, name in enumerate(names):
        for j in range(6):
            write_image(tmp_path / "data" / name / f"<i>{j}$.png", (200 - 150 * k, 60 + 20 * j, 50 + 150 * k))
    model = headstart.train(tmp_path / "data", val_split=0.5, out=tmp_path / "model", cache_dir=tmp_path / "cache")
    page = (tmp_path / "model" / "report.html").read_text()
    assert "<script" not in page and "<i>" not in page
    assert "&lt;script&gt;$x$" in page and "a&amp;b&#x27;q" in page and "&lt;i&gt;" in page
    rows = confusion_cells(page)
    assert rows[1] == ["true", *model.classes] and [row[0] for row in rows[2:]] == model.classes
    captions = [caption for *_, caption in tiles(page, "predictions")]
    assert captions and all("&lt;script&gt;$x$" in c or "a&amp;b&#x27;q" in c for c in captions)


@pytest.mark.browser
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


@pytest.mark.slow
def test_explain_works_for_frozen_finetuned_and_other_backbones(trained: Path, tmp_path: Path) -> None:
    images = sorted((CATS_DOGS_TINY / "val" / "cats").iterdir())[:2]
    result = runner.invoke(app, ["explain", str(trained), *map(str, images), "--out", str(tmp_path / "frozen"), "--class", "dogs"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "frozen").glob("*_gradcam.png"))) == 2
    tuned = headstart.train(FLOWERS_TINY, strategy="finetune", epochs=1, unfreeze=1, cache_dir=tmp_path / "c")
    layered = headstart.train(FLOWERS_TINY, layer=-2, cache_dir=tmp_path / "c")
    for name, model in (("tuned", tuned), ("layer", layered)):
        result = explain(model, [images[0]], tmp_path / name)
        assert not result.skipped and Image.open(result.written[0]).convert("RGB").size[0] > 300
    bad = runner.invoke(app, ["explain", str(trained), str(images[0]), "--class", "horses"])
    assert bad.exit_code == 1 and "Unknown class 'horses'" in bad.output


@pytest.mark.slow
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
    assert Image.open(tmp_path / "imagenet.png").convert("RGB").size[0] > 600


@pytest.mark.slow
def test_report_command_rebuilds_from_other_data(trained: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(trained), str(unseen_cats_dogs(tmp_path / "unseen")), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert '<section id="confusion-matrix">' in (tmp_path / "r.html").read_text()


def test_gradcam_for_a_timm_backbone_with_a_headstart_head(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    from headstart.heads import create_torch_head

    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet").state_dict(), tmp_path / "w.safetensors")
    backbone = create_backbone("timm:test_resnet", tmp_path / "w.safetensors", cache_root=tmp_path)
    batch = torch.from_numpy(preprocess(load_image(PHOTOS / "dog.jpg"), backbone.data_config))[None]
    n, ones = backbone.n_features, np.ones(backbone.n_features, np.float32)
    state = {  # class 0 scores the mean feature, so its evidence is all positive
        "0.mean": np.zeros(n, np.float32),
        "0.scale": ones,
        "1.weight": np.stack([ones, -ones]) / n,
        "1.bias": np.zeros(2, np.float32),
    }
    cam = grad_cam(backbone, batch, 0, create_torch_head(state).eval())
    assert cam.ndim == 2 and cam.shape[0] > 1 and cam.min() >= 0.0 and cam.max() == pytest.approx(1.0)
