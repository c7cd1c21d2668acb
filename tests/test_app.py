"""The Gradio app (`model_card/app.py`): its scoring function, and the app end to end in a real headless browser."""

import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from qualiclip_hf.scoring import read_image
from training.degradations import apply_distortion

from .conftest import REPO_ROOT, direct_scores, load_module_from_file, photo

# No usage statistics, update checks or share links: the tests must not reach the network.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
gr = pytest.importorskip("gradio")

APP_FILE = REPO_ROOT / "model_card" / "app.py"
CHROMIUM = Path("/usr/bin/chromium")
# Screenshots of the browser test land here (and in the test's tmp_path); `/tests/artifacts/` is gitignored.
ARTIFACTS = Path(os.environ.get("QUALICLIP_TEST_ARTIFACTS", Path(__file__).resolve().parent / "artifacts"))


@pytest.fixture(scope="module")
def app_module():
    return load_module_from_file(APP_FILE, "qualiclip_space_app")


def _direct_score(demo, path: Path) -> float:
    return direct_scores(*demo, [read_image(path)]).item()


@pytest.fixture(scope="module")
def noisy_photo(tmp_path_factory) -> Path:
    """A held-out photo with mild white noise: the demo model gives it a score well inside (0, 1)."""
    image = torch.from_numpy(np.asarray(data.coffee()).copy()).permute(2, 0, 1).float()[None] / 255
    image = torch.nn.functional.interpolate(image, size=(192, 288), mode="bicubic", antialias=True).clamp(0, 1)
    noisy = apply_distortion(image, "white_noise", 1, torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("app_images") / "noisy_coffee.png"
    Image.fromarray((noisy[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()).save(path)
    return path


def test_analyse_scores_each_file_and_reports_bad_ones(app_module, demo, noisy_photo, tmp_path):
    model, processor = demo
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    small = tmp_path / "small.png"
    photo(16, 24).save(small)
    clean = tmp_path / "clean.png"
    photo(64, 96, seed=2).save(clean)

    rows, gallery = app_module.analyse([noisy_photo, broken, small, clean], model, processor)
    assert [row[0] for row in rows] == ["noisy_coffee.png", "broken.jpg", "small.png", "clean.png"]
    for row, path in ((rows[0], noisy_photo), (rows[3], clean)):
        assert row[1] == f"{_direct_score(demo, path):.4f}" and row[2] == ""
    assert rows[1][1] == "" and rows[1][2].startswith("not an image file")
    assert rows[2][1] == "" and "below the model's 32x32 minimum" in rows[2][2]
    assert str(tmp_path) not in rows[1][2]  # the uploaded copy's path is not shown
    assert [caption for _, caption in gallery] == [f"noisy_coffee.png: {rows[0][1]}", f"clean.png: {rows[3][1]}"]
    assert gallery[0][0].size == (288, 192) and gallery[1][0].size == (96, 64)

    rows, gallery = app_module.analyse([noisy_photo], model, processor, max_size=144)
    assert gallery[0][0].size == (144, 96)


def test_default_model(app_module, monkeypatch, tmp_path):
    monkeypatch.delenv("QUALICLIP_MODEL", raising=False)
    monkeypatch.setattr(app_module, "APP_DIR", tmp_path)
    assert app_module.default_model() == "demo"
    (tmp_path / "config.json").write_text("{}")  # deployed beside the model's files: that model
    assert app_module.default_model() == str(tmp_path)
    monkeypatch.setenv("QUALICLIP_MODEL", "some/repo")
    assert app_module.default_model() == "some/repo"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)")
def test_app_in_a_headless_browser(app_module, demo, noisy_photo, tmp_path, request):
    """Uploads an image and a broken file in Chromium, reads the scores back from the page, keeps a screenshot."""
    sync_api = pytest.importorskip("playwright.sync_api")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    expected = _direct_score(demo, noisy_photo)

    app = app_module.build_app("demo")
    port = _free_port()
    app.launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, quiet=True, ssr_mode=False
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                user_data_dir=str(tmp_path / "chromium-profile"),
                executable_path=str(CHROMIUM),
                headless=True,
                viewport={"width": 1280, "height": 1100},
                args=[
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                ],
            )
            try:
                # Only the app itself may be reached (the page would otherwise ask for web fonts).
                browser.route(
                    "**/*",
                    lambda route: route.continue_() if route.request.url.startswith(url.rstrip("/")) else route.abort(),
                )
                page = browser.pages[0] if browser.pages else browser.new_page()
                page.goto(url, timeout=30_000)
                page.locator("#images input[type=file]").set_input_files([str(noisy_photo), str(broken)])
                # Gradio's table renders its body as ARIA grid rows of grid cells (the header row has none).
                rows = page.locator("#scores [role=row]:has([role=gridcell])")
                sync_api.expect(rows).to_have_count(2, timeout=30_000)
                sync_api.expect(page.locator("#heatmaps img").first).to_be_visible(timeout=30_000)
                cells = [
                    [cell.inner_text().strip() for cell in row.locator("[role=gridcell]").all()] for row in rows.all()
                ]
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
                shutil.copyfile(tmp_path / "app.png", ARTIFACTS / "app_screenshot.png")
                heatmap_width = page.locator("#heatmaps img").first.evaluate("image => image.naturalWidth")
            finally:
                browser.close()
    finally:
        app.close()

    request.node.user_properties.append(("screenshot", str(ARTIFACTS / "app_screenshot.png")))
    print(f"screenshot: {ARTIFACTS / 'app_screenshot.png'}")
    by_file = {row[0]: row[1:] for row in cells}
    assert set(by_file) == {"noisy_coffee.png", "broken.png"}, cells
    shown, error = by_file["noisy_coffee.png"]
    assert error == "" and len(shown.split(".")[-1]) == 4, cells
    assert abs(float(shown) - expected) <= 0.5e-4 + 1e-6, (shown, expected)
    assert 0.05 < expected < 0.95  # a score that says something about the image, not a saturated one
    assert by_file["broken.png"][0] == "" and "not an image file" in by_file["broken.png"][1], cells
    assert heatmap_width == 288
