"""The `headstart serve` page in headless Chromium: photos in, the model's top class out, hostile names shown as text."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import headstart
from conftest import CATS_DOGS_TINY, PHOTOS, start_server
from headstart.server import create_app

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]
sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",  # allow the camera without asking
    "--use-fake-device-for-media-stream",  # a synthetic camera
]
# Class folders that are markup, mathtext and an HTML entity: the page must show them as the text they are.
CATS = "<img src=x onerror=window.pwned=1>cats"
DOGS = "dogs $x$ &amp; [b]"
PHOTOS_IN = [PHOTOS / "dog.jpg", PHOTOS / "sk_chelsea.png", CATS_DOGS_TINY / "val" / "cats" / "cat.4003.jpg"]


@pytest.fixture(scope="module")
def hostile_model(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, headstart.Model]:
    """cats_dogs_tiny with hostile class folder names, trained (features from the shared cache) and saved with a report page."""
    data = tmp_path_factory.mktemp("hostile") / "data"
    for split in ("train", "val"):
        for old, new in (("cats", CATS), ("dogs", DOGS)):
            shutil.copytree(CATS_DOGS_TINY / split / old, data / split / new)
    model = headstart.train(data, cache_dir=cache_dir)
    model_dir = model.save(data.parent / "model")
    (model_dir / "report.html").write_text("<!doctype html><title>report</title><h1 id=report-title>the report</h1>")
    return model_dir, model


@pytest.fixture(scope="module")
def url(hostile_model: tuple[Path, headstart.Model], cache_dir: Path) -> Iterator[str]:
    server, thread, address = start_server(create_app(hostile_model[0], cache_root=cache_dir))
    try:
        yield address
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, url: str) -> Iterator[Any]:
    context = browser.new_context()
    context.grant_permissions(["camera"], origin=url)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url + "/")
    sync_api.expect(page.get_by_test_id("backbone")).to_have_text("efficientnet_lite0")
    yield page
    context.close()
    assert not errors, errors


def cards(page: Any) -> dict[str, str]:
    """File name -> the predicted class (or the error) shown on each card."""
    shown = {}
    for card in page.get_by_test_id("card").all():
        outcome = card.locator("[data-testid=label], [data-testid=error]")
        shown[card.locator(".name").inner_text()] = outcome.inner_text()
    return shown


def test_the_page_shows_the_model_and_its_hostile_class_names_as_text(page: Any, hostile_model: tuple[Path, headstart.Model]) -> None:
    _, model = hostile_model
    assert sorted(model.classes) == sorted([CATS, DOGS])
    items = page.get_by_test_id("classes").locator("li")
    assert items.all_text_contents() == model.classes
    assert page.get_by_test_id("classes").locator("img").count() == 0
    assert page.evaluate("window.pwned") is None  # the markup never ran
    assert model.summary.validation is not None
    accuracy = page.get_by_test_id("accuracy").inner_text()
    assert accuracy.endswith("%") and abs(float(accuracy[:-1]) - 100 * model.summary.validation.accuracy) < 0.6
    link = page.get_by_test_id("report-link")
    link.click()
    sync_api.expect(page.locator("#report-title")).to_have_text("the report")


def test_photos_given_to_the_file_input_show_headstart_predicts_top_class(page: Any, hostile_model: tuple[Path, headstart.Model]) -> None:
    _, model = hostile_model
    want = {path.name: p.label for path, p in zip(PHOTOS_IN, headstart.predict(model, PHOTOS_IN).predictions)}
    assert set(want.values()) == {CATS, DOGS}  # both hostile names get shown
    page.get_by_test_id("file-input").set_input_files([str(path) for path in PHOTOS_IN])
    sync_api.expect(page.get_by_test_id("label")).to_have_count(len(PHOTOS_IN), timeout=60_000)
    assert cards(page) == want
    for bars in page.locator(".bars").all():  # the top 2, as bars with percentages summing to about 100
        percentages = [float(text.rstrip("%")) for text in bars.locator(".pct").all_inner_texts()]
        assert len(percentages) == 2 and abs(sum(percentages) - 100) < 1.5
    assert page.evaluate("window.pwned") is None


def test_an_unreadable_file_shows_the_servers_error_on_its_card(page: Any, tmp_path: Path) -> None:
    bad = tmp_path / "notes <b>.jpg"
    bad.write_text("not an image")
    page.get_by_test_id("file-input").set_input_files([str(bad), str(PHOTOS_IN[0])])
    sync_api.expect(page.get_by_test_id("error")).to_have_count(1, timeout=60_000)
    sync_api.expect(page.get_by_test_id("label")).to_have_count(1, timeout=60_000)
    shown = cards(page)
    assert "is not a readable image: cannot identify image file" in shown["notes <b>.jpg"]
    assert shown[PHOTOS_IN[0].name] == DOGS


def test_a_webcam_snapshot_is_predicted(page: Any) -> None:
    webcam = page.locator("#webcam")
    sync_api.expect(webcam).to_be_visible()  # localhost is a secure context: the camera is offered
    webcam.click()
    deadline = time.monotonic() + 30  # polled from here: the page's CSP forbids the string evaluation wait_for_function uses
    while not page.evaluate("document.getElementById('video').videoWidth"):
        assert time.monotonic() < deadline, "the fake camera never showed a frame"
        time.sleep(0.05)
    page.locator("#snap").click()
    sync_api.expect(page.get_by_test_id("label")).to_have_count(1, timeout=60_000)
    assert page.get_by_test_id("label").inner_text() in (CATS, DOGS, "unknown")  # Chromium's fake camera films a test pattern
    assert page.locator(".card .name").inner_text().startswith("webcam-")
    page.locator("#close-camera").click()
