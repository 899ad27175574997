"""app.py: the side-by-side comparison behind the Gradio page, on the embedded default pipeline."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import dq
from dq.errors import DQError

REPO = Path(__file__).resolve().parents[1]


def _app():
    sys.path.insert(0, str(REPO))
    return importlib.import_module("app")


@pytest.fixture(scope="module")
def sides():
    return _app().load_sides(None, recipe="w8a8", num_prompts=2, steps=2)


def test_compare_draws_both_from_the_same_seed_and_scores_the_difference(sides) -> None:
    result = sides.compare("a red circle above a blue square", seed=3)
    full, quantized = np.asarray(result.full), np.asarray(result.quantized)
    assert full.shape == quantized.shape == (256, 256, 3)
    assert not np.array_equal(full, quantized)  # really the quantized model
    again = sides.compare("a red circle above a blue square", seed=3)
    assert np.array_equal(np.asarray(again.full), full)
    other = sides.compare("a red circle above a blue square", seed=4)
    assert not np.array_equal(np.asarray(other.full), full)
    # w8a8 stays much closer to full precision than another seed's image does (default model,
    # 2 steps, 2026-11-23: 21.7 dB against 15.8 dB)
    from dq.eval.metrics import psnr

    unrelated = float(psnr([other.full], [result.full]))
    assert result.psnr_db > unrelated + 3 and 0.5 < result.ssim <= 1.0, (result.report, unrelated)
    assert sides.quantized.weight_bytes < sides.full.weight_bytes
    assert "PSNR" in result.report and "dq w8a8" in result.report
    assert sides.quantized.name == "dq w8a8"


def test_compare_rejects_an_empty_prompt_and_bad_steps(sides) -> None:
    with pytest.raises(ValueError, match="prompt is empty"):
        sides.compare("   ")
    with pytest.raises(ValueError, match="steps must be at least 1"):
        sides.compare("a red circle", steps=-2)


def test_a_saved_dq_folder_is_compared_as_is(sides, tmp_path) -> None:
    app = _app()
    folder = dq.save(sides.quantized.pipe, tmp_path / "q")
    loaded = app.load_sides(None, quantized=str(folder), steps=2)
    assert loaded.quantized.name.startswith("dq w8a8")
    a = sides.compare("a green triangle", seed=1)
    b = loaded.compare("a green triangle", seed=1)
    assert np.array_equal(np.asarray(a.quantized), np.asarray(b.quantized))
    assert loaded.quantized.weight_bytes == sides.quantized.weight_bytes

    with pytest.raises(DQError, match="already quantized"):
        app.load_sides(str(folder))
    with pytest.raises(DQError, match="not a folder written by"):
        app.load_sides(None, quantized=str(tmp_path))
    from dq.testing.tiny import default_call_kwargs, tiny_pipeline

    tiny = tiny_pipeline("pixart")
    dq.quantize(
        tiny,
        "w8a8-rtn",
        calib_prompts=["a cat"],
        **default_call_kwargs("pixart"),
    )
    with pytest.raises(DQError, match="made from another model"):
        app.load_sides(None, quantized=str(dq.save(tiny, tmp_path / "tiny")))
    with pytest.raises(DQError, match="num-prompts must be at least 1"):
        app.load_sides(None, num_prompts=0)


def test_main_explains_a_bad_folder(tmp_path, capsys) -> None:
    pytest.importorskip("gradio")
    with pytest.raises(SystemExit, match="not a folder written by"):
        _app().main(["--quantized", str(tmp_path)])


def test_the_app_starts_on_the_embedded_default_on_loopback_offline() -> None:
    app = _app()
    args = app.parse_args([])
    assert (args.model, args.quantized, args.recipe, args.host, args.share) == (None, None, "w8a8", "127.0.0.1", False)
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    pytest.importorskip("gradio")
    theme = app.theme()
    assert theme._stylesheets == [] and all(isinstance(f, str) for f in theme._font + theme._font_mono)
    with pytest.raises(SystemExit):
        app.parse_args(["--seeds", "0"])


def test_lpips_is_only_computed_with_alexnet_weights_and_never_downloaded(tmp_path, monkeypatch) -> None:
    pytest.importorskip("torchmetrics")
    import torch

    import dq.eval.lpips as lpips_module

    app = _app()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub cache

    def no_download(*args, **kwargs):
        raise AssertionError("the app must not build LPIPS (a download) without the weights")

    monkeypatch.setattr(lpips_module, "LpipsScorer", no_download)
    scores, why = app.Scorers().lpips([np.zeros((16, 16, 3), np.uint8)], [np.zeros((16, 16, 3), np.uint8)])
    assert scores is None and "AlexNet weights (alexnet-" in why and "--lpips-weights PATH" in why
    missing = app.Scorers(lpips_weights=str(tmp_path / "alex.pth")).lpips_status()
    assert "alex.pth does not exist" in missing
    # with the file in the hub cache, LPIPS is attempted (here: the stand-in refuses)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / lpips_module.backbone_file("alex")).write_bytes(b"")
    assert app.Scorers().lpips_status() is None


# -- the model cache and the per-model locks (no pipeline needed) --------------------------------


def _fake_side(name: str, width: int = 256, pipe=None):
    from torch import nn

    app = _app()
    pipe = pipe or SimpleNamespace(components={"denoiser": nn.Linear(width, width)})
    return app.Side(name, pipe, 0)


def test_the_cache_drops_the_least_recently_used_model_over_its_cap() -> None:
    app = _app()
    one = _fake_side("a").nbytes()  # 256x256 fp32 weight + bias
    assert one == (256 * 256 + 256) * 4
    cache = app.ModelCache(int(2.5 * one))
    built = []

    def build(name):
        return lambda: built.append(name) or _fake_side(name)

    a, fresh = cache.get(("a",), build("a"))
    assert fresh and cache.get(("a",), build("a")) == (a, False)  # a hit builds nothing
    cache.get(("b",), build("b"))
    cache.get(("a",), build("a"))  # a is now the most recently used
    cache.get(("c",), build("c"))  # over the cap: b goes, not a
    assert cache.keys() == [("a",), ("c",)] and built == ["a", "b", "c"]
    cache.get(("b",), build("b"))  # rebuilt after eviction; a (least recent) goes
    assert cache.keys() == [("c",), ("b",)] and built == ["a", "b", "c", "b"]
    # one model larger than the cap still stays (alone): the request that asked for it needs it
    big, _ = cache.get(("big",), lambda: _fake_side("big", width=1024))
    assert cache.keys() == [("big",)]


def test_two_requests_for_a_new_model_build_it_once() -> None:
    app = _app()
    cache = app.ModelCache(2**30)
    built = []

    def slow_build():
        time.sleep(0.3)
        built.append(1)
        return _fake_side("x")

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: cache.get(("x",), slow_build), range(2)))
    assert len(built) == 1 and results[0][0] is results[1][0]
    assert sorted(fresh for _, fresh in results) == [False, True]


class _RecordingPipe:
    """A pipeline stand-in that records how many calls run inside it at once."""

    def __init__(self, active: dict):
        self.active, self.components = active, {}

    def __call__(self, prompt, generator=None, **kwargs):
        self.active["now"] += 1
        self.active["most"] = max(self.active["most"], self.active["now"])
        time.sleep(0.2)
        self.active["now"] -= 1
        return SimpleNamespace(images=[prompt])


def test_calls_on_one_model_never_interleave_but_two_models_run_at_once() -> None:
    one, both = {"now": 0, "most": 0}, {"now": 0, "most": 0}
    side = _fake_side("one", pipe=_RecordingPipe(one))
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda i: side.draw(f"p{i}", i), range(3)))
    assert one["most"] == 1  # the model's lock kept them apart
    first, second = (_fake_side(n, pipe=_RecordingPipe(both)) for n in ("a", "b"))
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda s: s.draw("p", 0), (first, second)))
    assert both["most"] == 2  # a lock per model, not one for the whole app


# -- the served app, driven through gradio_client and a real browser ---------------------------

PROMPT = "a red circle above a blue square"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    """The app on 127.0.0.1 (embedded default, 128 px, 2 steps, 2 calibration prompts)."""
    pytest.importorskip("gradio")
    app = _app()
    state = app.App(None, recipe="w4a16", num_prompts=2, steps=2, size=128, num_seeds=2)
    demo = app.build_demo(state)
    port = _free_port()
    _, url, _ = app.launch(demo, host="127.0.0.1", port=port, block=False)
    assert url.startswith(f"http://127.0.0.1:{port}")
    yield SimpleNamespace(app=state, url=url, demo=demo)
    demo.close()


def _ask(client, prompt=PROMPT, *, model="", recipe="w4a16", folder="", seed=0, seeds=2):
    return client.predict(prompt, model, recipe, folder, seed, seeds, 2, 4.5, api_name="/generate")


def _image(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def test_the_client_gets_images_and_metrics_for_two_recipes(served) -> None:
    gradio_client = pytest.importorskip("gradio_client")
    client = gradio_client.Client(served.url, verbose=False)
    answers = {}
    for recipe in ("w4a16", "w8a8"):
        slider, grid, metrics, bits, error, caption = _ask(client, recipe=recipe)
        full, quantized = (_image(p) for p in slider)
        assert full.shape == quantized.shape == (128, 128, 3)
        assert full.std() > 5 and not np.array_equal(full, quantized)
        assert len(grid) == 4 and [g["caption"] for g in grid[::2]] == [
            "seed 0: full precision", "seed 1: full precision"]
        assert np.array_equal(_image(grid[0]["image"]), full)  # the slider shows seed 0
        assert not np.array_equal(_image(grid[2]["image"]), full)  # another seed, another image
        assert f"dq {recipe}" in metrics and "LPIPS" in metrics and "evaluator CLIP" in metrics
        psnr_db = float(re.search(r"slider \(seed 0\) \| ([\d.]+) \|", metrics).group(1))
        assert 5 < psnr_db < 60, metrics
        assert re.search(r"latency per image \(mean of 2\) \| [\d.]+ s \| [\d.]+ s \|", metrics)
        assert re.search(r"CLIP score \(mean over seeds\) \| [\d.]+ \| [\d.]+ \|", metrics)
        layers = {row[1]: row[2] for row in bits["data"] if row[3] == "weight"}
        acts = {row[1]: row[2] for row in bits["data"] if row[3] == "activation"}
        sqnr = {row[1]: row[2] for row in error["data"]}
        assert layers and layers.keys() == sqnr.keys() == acts.keys()
        assert "SQNR" in caption and "forward hooks" in caption
        answers[recipe] = (full, quantized, layers, acts, sqnr, metrics)
    # the same full-precision image, two different quantized ones, each recipe's own bits
    assert np.array_equal(answers["w4a16"][0], answers["w8a8"][0])
    assert not np.array_equal(answers["w4a16"][1], answers["w8a8"][1])
    assert set(answers["w4a16"][2].values()) == {4.0} and set(answers["w4a16"][3].values()) == {32.0}
    assert set(answers["w8a8"][2].values()) == {8.0}
    # w8a8 keeps the text projection's activations in float (dq.arch: weight-only by default)
    float_acts = {name for name, b in answers["w8a8"][3].items() if b == 32.0}
    assert all("caption_projection" in name for name in float_acts)
    assert sum(b == 8.0 for b in answers["w8a8"][3].values()) > len(float_acts)
    # 8-bit weights and activations err less per layer than 4-bit weights (median SQNR)
    assert np.median(list(answers["w8a8"][4].values())) > np.median(list(answers["w4a16"][4].values()))
    # denoiser weights: 4-bit < 8-bit < fp32
    weights = [float(re.search(r"weights ([\d.]+) MiB", answers[r][5]).group(1)) for r in ("w4a16", "w8a8")]
    full_mib = float(re.search(r"runtime kernel copies\) \| ([\d.]+) MiB", answers["w8a8"][5]).group(1))
    assert weights[0] < weights[1] < full_mib
    # both quantized models stay cached, with the full-precision one
    assert len(served.app.cache.keys()) == 3


def test_bad_input_is_a_message_and_the_app_stays_up(served, tmp_path) -> None:
    gradio_client = pytest.importorskip("gradio_client")
    from gradio_client.exceptions import AppError

    client = gradio_client.Client(served.url, verbose=False)
    bad_recipe = tmp_path / "bad.yaml"
    bad_recipe.write_text("base: w8a8\nweight: {bits: 12}\n")
    failing = tmp_path / "fails.yaml"  # valid, but its calibration cannot run
    failing.write_text(f"base: w8a8-rtn\ncalib_prompts: {tmp_path / 'no-prompts.txt'}\n")
    cases = [
        ({"prompt": "   "}, "the prompt is empty"),
        ({"model": str(tmp_path / "no-such-model")}, "no such folder"),
        ({"recipe": "no-such-recipe"}, "unknown recipe 'no-such-recipe'; presets are"),
        ({"recipe": str(bad_recipe)}, "bit width 12 is out of range; use an integer from 2 to 8"),
        ({"recipe": str(failing)}, f"no prompt file '{tmp_path / 'no-prompts.txt'}'; give a path"),
        ({"folder": str(tmp_path)}, "not a folder written by"),
        ({"folder": str(tmp_path / "gone")}, "no such folder"),
        ({"seeds": 0}, "Value 0 is less than minimum value 1"),  # Gradio checks the slider itself
    ]
    for kwargs, message in cases:
        with pytest.raises(AppError, match=re.escape(message)):
            _ask(client, **{"seeds": 1, **kwargs})
    assert not any("no-prompts" in str(key) for key in served.app.cache.keys())  # no broken entry
    slider, *_ = _ask(client, seeds=1)  # still serving
    assert _image(slider[0]).std() > 5


def test_the_first_request_for_a_recipe_reports_calibration(served) -> None:
    said: list[str] = []
    served.app.run(PROMPT, recipe="w4a16", num_seeds=1)  # built now or by an earlier test
    served.app.run(PROMPT, recipe="w4a16", num_seeds=1, progress=said.append)  # cached
    assert said and not any("calibrating" in s for s in said), said
    said.clear()
    served.app.run(PROMPT, recipe="w8a8-rtn", num_seeds=1, progress=said.append)
    assert said[0].startswith("calibrating and quantizing the embedded default with w8a8-rtn"), said


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (the app extra)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("the browser test needs Debian's chromium and chromium-driver: run .ci/setup as root "
                    "(it apt-get installs them), or apt-get install -y chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,2000",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def _wait(until, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = until()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"waited {seconds} s for {what}")


def test_the_page_in_a_real_browser(served, tmp_path, monkeypatch) -> None:
    import threading

    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    seen_progress = threading.Event()
    browser = _browser()
    try:
        browser.get(served.url)
        box = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#prompt textarea"), 60, "the page")[0]
        box.clear()
        box.send_keys("a green triangle to the left of a yellow circle")
        browser.find_element(By.CSS_SELECTOR, "#generate").click()

        def loaded(selector: str, count: int):
            images = browser.find_elements(By.CSS_SELECTOR, f"{selector} img")
            done = [browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
                    for i in images]
            return images if len(images) >= count and all(done) else None

        slider_images = _wait(lambda: loaded("#slider", 2), 120, "both images in the slider")
        _wait(lambda: loaded("#grid", 4), 30, "the grid over two seeds")
        _wait(lambda: "PSNR" in browser.find_element(By.CSS_SELECTOR, "#metrics").text, 30, "the metrics")
        time.sleep(0.5)  # let the last paint land
        handle = browser.find_element(By.CSS_SELECTOR, "#slider .icon-wrap")
        assert handle.is_displayed()
        shot = tmp_path / "app.png"
        browser.save_screenshot(str(shot))
        if os.environ.get("DQ_APP_SCREENSHOT"):  # how docs/app.png is made
            shutil.copy(shot, os.environ["DQ_APP_SCREENSHOT"])
        pixels = np.asarray(Image.open(shot).convert("RGB")).astype(float)
        assert pixels.std() > 20, "the screenshot is blank"
        rect = browser.execute_script("return arguments[0].getBoundingClientRect().toJSON()", slider_images[0])
        top, left = int(rect["top"]), int(rect["left"])
        bottom, right = int(rect["bottom"]), int(rect["right"])
        grip = browser.execute_script("return arguments[0].getBoundingClientRect().toJSON()", handle)
        middle = int(grip["left"] + grip["width"] / 2)
        assert left + 20 < middle < right - 20, (rect, grip)
        for name, part in (("left", pixels[top:bottom, left:middle - 15]),
                           ("right", pixels[top:bottom, middle + 15:right])):
            drawn = (np.abs(part - 255).sum(axis=2) > 60).mean()  # pixels away from white
            assert part.std() > 10 and drawn > 0.01, f"the slider's {name} side is not drawn"
        grip_pixels = pixels[int(grip["top"]):int(grip["bottom"]), int(grip["left"]):int(grip["right"])]
        orange = (grip_pixels[..., 0] > 200) & (grip_pixels[..., 1] < 160) & (grip_pixels[..., 2] < 100)
        assert orange.mean() > 0.2, "the slider's handle is not drawn"
        # offline: everything the page fetched came from the app itself (or was inline)
        fetched = {
            json.loads(entry["message"])["message"]["params"]["request"]["url"]
            for entry in browser.get_log("performance")
            if json.loads(entry["message"])["message"]["method"] == "Network.requestWillBeSent"
        }
        remote = sorted(u for u in fetched if not u.startswith((served.url.rstrip("/"), "data:", "blob:")))
        assert fetched and not remote, remote
        # a bad request is a readable message in the page, and the page keeps working
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.BACKSPACE)
        browser.find_element(By.CSS_SELECTOR, "#generate").click()
        _wait(lambda: "the prompt is empty" in browser.find_element(By.TAG_NAME, "body").text, 30,
              "the empty-prompt message")
        # a recipe not cached yet: the page shows calibration progress, then its results.
        # A tiny RTN recipe calibrates in well under a poll interval on a fast machine, so the
        # build is held until the page has been seen saying so (or 60 s have passed).
        module = _app()
        real_quantize_side = module.quantize_side

        held_too_long = []

        def held_quantize_side(*args, **kwargs):
            if not seen_progress.wait(60):
                held_too_long.append(True)
            return real_quantize_side(*args, **kwargs)

        monkeypatch.setattr(module, "quantize_side", held_quantize_side)
        box.send_keys("a purple square")
        recipe = browser.find_element(By.CSS_SELECTOR, "#recipe input")
        recipe.click()
        recipe.send_keys(Keys.CONTROL, "a")
        recipe.send_keys(Keys.BACKSPACE)
        recipe.send_keys("w4a8-rtn", Keys.ENTER)
        browser.find_element(By.CSS_SELECTOR, "#generate").click()

        def progress_text() -> str:  # one round trip: polls must be quick on a busy machine
            return browser.execute_script(
                "return Array.from(document.querySelectorAll('[data-testid=status-tracker]'))"
                ".map(t => t.textContent).join(' ') + ' | ' + document.querySelector('#metrics').textContent")

        assert recipe.get_attribute("value") == "w4a8-rtn"
        seen: list[str] = []

        def calibrating() -> bool:
            seen.append(progress_text())
            if "calibrating and quantizing" in seen[-1]:
                seen_progress.set()
            return "calibrating" in seen[-1] or "dq w4a8-rtn" in seen[-1]

        _wait(calibrating, 120, "calibration progress in the page")
        # the app's own line (not only dq's calibration bar), seen while the build was held
        assert any("calibrating and quantizing" in text for text in seen), sorted(set(seen))[-20:]
        assert not held_too_long, "the page did not show the app's progress line within 60 s"
        _wait(lambda: "dq w4a8-rtn" in browser.find_element(By.CSS_SELECTOR, "#metrics").text, 180,
              "the new recipe's metrics")
    finally:
        seen_progress.set()  # never leave a held build waiting
        browser.quit()


def test_the_bit_budget_slider_reaches_the_recipe_and_the_cache_key(monkeypatch) -> None:
    """Mixed precision exists (dq.Recipe has `budget`): the page's slider value becomes the
    recipe's budget, and each budget is its own cached model (0 = the recipe as is)."""
    app = _app()
    assert app.HAS_BUDGET
    made = []

    def fake_quantize_side(model, recipe, **kwargs):
        made.append(recipe)
        return _fake_side(recipe.name)

    monkeypatch.setattr(app, "quantize_side", fake_quantize_side)
    monkeypatch.setattr(app, "open_full", lambda model, device=None: _fake_side("full"))
    page = app.App(recipe="w4a8-rtn", num_prompts=1, steps=1, size=64)
    page.quantized_side(None, "w4a8-rtn", None, budget=6.0)
    page.quantized_side(None, "w4a8-rtn", None, budget=6.0)  # cached
    page.quantized_side(None, "w4a8-rtn", None, budget=5.0)
    page.quantized_side(None, "w4a8-rtn", None, budget=0)
    assert [r.budget for r in made] == [6.0, 5.0, None]
