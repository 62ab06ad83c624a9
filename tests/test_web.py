"""The web page's logic (diffsr.studio) against the API and the CLI, and the page itself in a real
browser (Debian's chromium-headless-shell driven by Playwright; marker `browser`)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image

from diffsr.io import ImageData, read_image
from diffsr.studio import ModelPool, PisaSession, cli_command, output_name, save_result

ARTIFACTS = Path(
    os.environ.get("DIFFSR_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / ".artifacts")
)


@pytest.fixture(scope="module")
def pool(tiny_sd_dir, pisa_dir):
    return ModelPool.from_args(
        ["pisa"], device="cpu", per_method={"pisa": {"weights": str(pisa_dir), "base": str(tiny_sd_dir)}}
    )


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    g = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:48]
    a = np.stack([127 + 90 * np.sin(xx / 4), 127 + 90 * np.cos(yy / 5), g.integers(0, 255, (40, 48))], -1)
    path = tmp_path_factory.mktemp("web") / "photo.png"
    Image.fromarray(a.astype(np.uint8)).save(path)
    return path


def _unet_calls(up) -> tuple[list, object]:
    calls: list = []
    return calls, up.model.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))


def test_pisa_session_renders_equal_the_api_bit_for_bit(pool, photo):
    up = pool.get("pisa")
    image = read_image(photo)
    calls, h = _unet_calls(up)
    try:
        session = PisaSession(up, image)
        r1 = session.render(0.5, 0.8)
        r2 = session.render(1.3, 0.2)
        again = session.render(0.5, 0.8)
        grid = session.grid((0.5, 1.0))
    finally:
        h.remove()
    assert calls == [2]  # ONE batched UNet call for the upload; renders and the grid run none
    assert again is r1 and session.renders == 2 + 4  # the repeat came from the cache
    assert [(r.settings["lambda_pix"], r.settings["lambda_sem"]) for r in grid] == [
        (0.5, 0.5), (0.5, 1.0), (1.0, 0.5), (1.0, 1.0)]  # fmt: skip
    api, _ = up.process(image, lambda_pix=0.5, lambda_sem=0.8)  # what diffsr.load(...).upscale does
    assert np.array_equal(r1.image.pixels, api.pixels)
    assert not np.array_equal(r1.image.pixels, r2.image.pixels)


def test_saved_png_carries_settings_and_the_cli_command_reproduces_it(pool, photo, tmp_path):
    from diffsr.cli import main

    up = pool.get("pisa")
    result = PisaSession(up, read_image(photo)).render(0.6, 1.2)
    command = cli_command(result, str(photo), pool.load_args["pisa"])
    saved = save_result(result, tmp_path / "page", "photo", command)
    assert saved.name == "photo_pisa_lp0.6_ls1.2.png" == output_name("photo", result)
    with Image.open(saved) as im:
        assert json.loads(im.text["diffsr:settings"]) == {
            "method": "pisa",
            "lambda_pix": 0.6,
            "lambda_sem": 1.2,
        }
        assert im.text["diffsr:command"] == command
    args = shlex.split(command)
    assert args[:2] == ["diffsr", "upscale"] and "--lambda-pix" in args and "--weights" in args
    out = tmp_path / "cli"
    args[args.index("-o") + 1] = str(out)
    assert main(args[1:] + ["--quiet"]) == 0
    cli_png = np.asarray(Image.open(out / "photo.png"))
    assert np.array_equal(cli_png, np.asarray(Image.open(saved)))


def test_sixteen_bit_upload_keeps_sixteen_bits(pool, tmp_path):
    import cv2

    a = (np.random.default_rng(1).random((24, 28, 3)) * 65535).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), a)
    image = read_image(tmp_path / "deep.png")
    assert image.bit_depth == 16
    result = PisaSession(pool.get("pisa"), image).render(0.7, 0.7)
    saved = save_result(result, tmp_path, "deep")
    assert read_image(saved).bit_depth == 16


def test_pool_loads_each_method_once_and_names_unknown_ones():
    from diffsr.errors import ConfigError

    made = []
    pool = ModelPool({"pisa": lambda: made.append(1) or "model"})
    assert pool.get("pisa") == pool.get("pisa") == "model" and made == [1]
    with pytest.raises(ConfigError, match="not served"):
        pool.get("s3diff")


# ------------------------------------------------------------------------------------------ browser
BROWSER = shutil.which("chromium-headless-shell") or "/usr/bin/chromium-headless-shell"


def _browser_or_skip():
    """Playwright driving Debian's chromium-headless-shell; CI sets DIFFSR_REQUIRE_BROWSER=1 so that a
    missing browser fails instead of skipping."""
    required = os.environ.get("DIFFSR_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            raise
        pytest.skip("playwright is not installed (pip install diffsr[test])")
    if not os.path.exists(BROWSER):
        if required:
            pytest.fail(f"{BROWSER} is missing (apt-get install chromium-headless-shell)")
        pytest.skip("chromium-headless-shell is not installed")
    return sync_playwright


def _launch(p):
    """Debian's headless Chromium, with nothing of its own reaching out (no updates, sync, …)."""
    return p.chromium.launch(executable_path=BROWSER, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"])  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.browser
def test_page_in_a_real_browser(pool, photo, tmp_path):
    sync_playwright = _browser_or_skip()
    from diffsr.web import serve

    up = pool.get("pisa")
    port = _free_port()
    demo = serve(pool, port=port, block=False)
    calls, h = _unet_calls(up)
    requests: list[str] = []
    try:
        with sync_playwright() as p:
            browser = _launch(p)
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(f"http://127.0.0.1:{port}/", wait_until="load")  # a heartbeat keeps the network busy
            upload = page.locator("#pisa-input input[type=file]")
            upload.wait_for(state="attached", timeout=60_000)
            upload.set_input_files(str(photo))
            link = page.locator("#pisa-download a[download]").first
            link.wait_for(timeout=120_000)
            assert "photo_pisa_lp1_ls1.png" in (link.get_attribute("download") or link.inner_text())

            def set_lambda(elem: str, value: str, name: str) -> bytes:
                box = page.locator(f"#{elem} input[type=number]")
                box.fill(value)
                box.press("Enter")
                page.locator(f"#pisa-download a[download='{name}']").wait_for(timeout=60_000)
                href = page.locator("#pisa-download a[download]").first.get_attribute("href")
                return page.request.get(
                    href if href.startswith("http") else f"http://127.0.0.1:{port}{href}"
                ).body()

            set_lambda("pisa-lp", "0.5", "photo_pisa_lp0.5_ls1.png")
            png = set_lambda("pisa-ls", "0.8", "photo_pisa_lp0.5_ls0.8.png")
            set_lambda("pisa-lp", "1.3", "photo_pisa_lp1.3_ls0.8.png")
            page.wait_for_timeout(500)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "web.png"), full_page=True)
            status = page.locator("#pisa-status").inner_text()
            browser.close()
    finally:
        h.remove()
        demo.close()
    assert calls == [2], calls  # upload: one batched UNet call; three λ renders: none
    assert "renders: 4" in status
    (tmp_path / "page.png").write_bytes(png)
    page_px = np.asarray(Image.open(tmp_path / "page.png"))
    api, _ = up.process(read_image(photo), lambda_pix=0.5, lambda_sem=0.8)
    from diffsr.io import write_image

    write_image(tmp_path / "api.png", api)
    assert np.array_equal(page_px, np.asarray(Image.open(tmp_path / "api.png")))
    hosts = {urlparse(u).hostname for u in requests if urlparse(u).scheme in ("http", "https", "ws", "wss")}
    assert hosts == {"127.0.0.1"}, hosts  # nothing leaves the machine


def test_s3diff_run_reports_estimate_and_override(s3diff):
    from diffsr.api import Upscaler
    from diffsr.studio import run_s3diff

    up = Upscaler(s3diff)
    image = ImageData(np.random.default_rng(2).random((16, 20, 3)).astype(np.float32), None, 8)
    est = run_s3diff(up, image)
    over = run_s3diff(up, image, blur=0.9, noise=0.05, guidance_scale=1.5)
    assert set(est.info["estimated"]) == {"blur", "noise"} and est.info["used"] == est.info["estimated"]
    assert over.info["used"] == {"blur": 0.9, "noise": 0.05} and over.info["guidance_scale"] == 1.5
    assert over.settings == {"method": "s3diff", "blur": 0.9, "noise": 0.05, "guidance_scale": 1.5}
    api, _ = up.process(image, blur=0.9, noise=0.05, guidance_scale=1.5)
    assert np.array_equal(over.image.pixels, api.pixels)
    assert "--blur 0.9 --noise 0.05 --guidance-scale 1.5" in cli_command(over, "in.png")


def test_patchscaler_run_draws_the_group_map():
    from diffsr.api import Upscaler
    from diffsr.bench import random_model
    from diffsr.studio import GROUP_COLOURS, run_patchscaler

    up = Upscaler(random_model("patchscaler", "tiny", device=torch.device("cpu"), dtype=torch.float32))
    image = ImageData(np.random.default_rng(3).random((24, 16, 3)).astype(np.float32), None, 8)
    result, picture = run_patchscaler(up, image, thresholds=(0.999, 0.998))  # hard and medium windows
    assert picture.pixels.shape == result.image.pixels.shape == (96, 64, 3)
    assert result.info["patches"] == sum(result.info["groups"].values())
    _, groups, _ = up.model.group_map(
        torch.from_numpy(image.pixels).permute(2, 0, 1)[None], thresholds=(0.999, 0.998)
    )
    overlay = ((picture.pixels - 0.45 * result.image.pixels) / 0.55).reshape(-1, 3)
    colours = np.array(GROUP_COLOURS, np.float32)
    nearest = np.abs(overlay[:, None] - colours[None]).max(-1)  # (pixels, 3 groups)
    assert nearest.min(1).max() < 1e-4  # every pixel shows one group's colour over the result
    assert set(nearest.argmin(1).tolist()) == set(groups.tolist())


@pytest.mark.browser
def test_page_shows_a_one_line_error_and_no_image(photo):
    """A model that cannot load (no weights) gives one line in the page, and no output image."""
    sync_playwright = _browser_or_skip()
    from diffsr.errors import WeightsNotFoundError
    from diffsr.web import serve

    def missing():
        raise WeightsNotFoundError("pisa_sr.pkl: no such file or folder. Pass --weights PATH")

    port = _free_port()
    demo = serve(ModelPool({"pisa": missing}), port=port, block=False)
    try:
        with sync_playwright() as p:
            browser = _launch(p)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
            upload = page.locator("#pisa-input input[type=file]")
            upload.wait_for(state="attached", timeout=60_000)
            upload.set_input_files(str(photo))
            toast = page.get_by_text("pisa_sr.pkl: no such file or folder. Pass --weights PATH")
            toast.first.wait_for(timeout=60_000)
            assert page.locator("#pisa-slider img").count() == 0
            assert page.locator("#pisa-download a[download]").count() == 0
            browser.close()
    finally:
        demo.close()
