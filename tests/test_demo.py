"""The Gradio demo, served on localhost around the tiny pipeline.

Every tab is driven through its API with gradio_client, and the page itself in headless Chromium
(Debian's /usr/bin/chromium through Playwright; CI installs it in .ci/run).
"""

from __future__ import annotations

import asyncio
import io
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image, ImageDraw

import blip_helper

CHROMIUM = "/usr/bin/chromium"
# Without the networking flags Chromium keeps calling home, which a closed network punishes with timeouts.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT_COPY = Path("/tmp/demo_screenshot.png")  # a fixed place to look at the page after a run
# Small and fast: the tiny pipeline at 64x64 with 2 steps takes milliseconds.
FAST = {"steps": 2, "height": 64, "width": 64, "seed": 1234, "random_seed": False}


class CallRecorder:
    """The pipeline, recording its calls and how many ran at once (the demo must never overlap them)."""

    def __init__(self, pipe, hold_seconds: float = 0.2):
        self.pipe = pipe
        self.hold_seconds = hold_seconds  # keeps each call open long enough for an overlap to show
        self.calls: list[dict] = []
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, *args, **kwargs):
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.calls.append(kwargs)
        try:
            time.sleep(self.hold_seconds)
            return self.pipe(*args, **kwargs)
        finally:
            with self._lock:
                self.running -= 1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def recorder(ov_pipe):
    return CallRecorder(ov_pipe)


@pytest.fixture(scope="module")
def served(recorder):
    """The demo launched as users launch it, on a free port; (demo, local_url, share_url)."""
    demo = blip_helper.make_demo(recorder)
    _, local_url, share_url = blip_helper.launch_demo(demo, server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    yield demo, local_url, share_url
    demo.close()


@pytest.fixture(scope="module")
def client(served, tmp_path_factory):
    return Client(served[1], verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Upload files: the example pictures, a blank canvas, a stroke layer and a broken "PNG"."""
    folder = tmp_path_factory.mktemp("uploads")
    paths = {}
    for name, image in blip_helper.example_images().items():
        paths[name] = folder / f"{name}.png"
        image.save(paths[name])
    # A Gradio 6 sketchpad drawing: a white canvas, black strokes on a transparent layer, and both flattened.
    canvas = Image.new("RGBA", (256, 256), "white")
    strokes = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    ImageDraw.Draw(strokes).line([(40, 128), (216, 128)], fill="black", width=24)  # a band across the middle
    for name, image in {"canvas": canvas, "strokes": strokes, "drawing": Image.alpha_composite(canvas, strokes)}.items():
        paths[name] = folder / f"{name}.png"
        image.save(paths[name])
    paths["broken"] = folder / "broken.png"
    paths["broken"].write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return {name: str(path) for name, path in paths.items()}


def _sketch(files, background=None, layers=(), composite=None) -> dict:
    """An ImageEditor value as the browser sends it."""
    def upload(name):
        return handle_file(files[name]) if name else None

    return {"background": upload(background), "layers": [upload(name) for name in layers], "composite": upload(composite)}


def _inputs(files, tab: str, **overrides) -> dict:
    """The API arguments of a tab: the notebook's example for that task, small and fast."""
    inputs = {
        "zero_shot": {"reference_image": handle_file(files["cat"]), "prompt": "swimming underwater",
                      "source_category": "cat", "target_category": "cat"},
        "canny": {"reference_image": handle_file(files["cat"]), "control_image": handle_file(files["coffee"]),
                  "prompt": "on a marble table", "source_category": "cat", "target_category": "cup"},
        "scribble": {"reference_image": handle_file(files["coffee"]), "control_image": _sketch(files, "canvas", ["strokes"], "drawing"),
                     "prompt": "in a meadow", "source_category": "coffee", "target_category": "horse"},
    }[tab]  # fmt: skip
    return {**inputs, **FAST, **overrides}


def _generate(client, files, tab, **overrides):
    return client.predict(**_inputs(files, tab, **overrides), api_name=f"/{tab}")


def _gray(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


def _assert_white_on_black(control_map: np.ndarray) -> None:
    white = control_map > 127
    assert white.any(), "the control map has no white lines"
    assert white.mean() < 0.5, f"the control map should be white lines on black, but {white.mean():.0%} is white"
    assert np.median(control_map) == 0, "the background of the control map is not black"


# -- module level ------------------------------------------------------------------------------------


def test_importing_the_module_does_not_import_gradio():
    code = "import sys, blip_helper; print('gradio' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_building_the_demo_uses_no_deprecated_gradio_api(ov_pipe):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        blip_helper.make_demo(ov_pipe)
    # ResourceWarnings are Gradio's own event loops being collected, nothing the demo asked for.
    assert [str(warning.message) for warning in caught if warning.category is not ResourceWarning] == []


class TestSketchToScribble:
    """Gradio 6's ImageEditor value: {"background", "layers", "composite"} as PIL images."""

    canvas = Image.new("RGBA", (100, 80), "white")

    @staticmethod
    def _layer(color="black", box=(10, 30, 90, 40)):
        layer = Image.new("RGBA", (100, 80), (0, 0, 0, 0))
        ImageDraw.Draw(layer).rectangle(box, fill=color)
        return layer

    def test_strokes_of_any_colour_become_white_on_black(self):
        layer = self._layer(color="red")
        scribble = blip_helper.sketch_to_scribble(
            {"background": self.canvas, "layers": [layer], "composite": Image.alpha_composite(self.canvas, layer)}
        )
        expected = np.zeros((80, 100), np.uint8)
        expected[30:41, 10:91] = 255
        assert scribble.mode == "RGB" and scribble.size == (100, 80)
        np.testing.assert_array_equal(np.asarray(scribble.convert("L")), expected)

    def test_strokes_drawn_over_an_upload_replace_its_outlines(self):
        photo = blip_helper.example_images()["coffee"].resize((100, 80))
        scribble = blip_helper.sketch_to_scribble({"background": photo, "layers": [self._layer()], "composite": photo})
        assert np.asarray(scribble.convert("L"))[:30].max() == 0  # nothing of the photo above the stroke

    def test_an_upload_without_strokes_is_traced_with_scribble_map(self):
        horse = blip_helper.example_images()["horse"]
        empty_layer = Image.new("RGBA", horse.size, (0, 0, 0, 0))
        scribble = blip_helper.sketch_to_scribble({"background": horse, "layers": [empty_layer], "composite": horse})
        np.testing.assert_array_equal(np.asarray(scribble), np.asarray(blip_helper.scribble_map(horse)))

    @pytest.mark.parametrize(
        "sketch",
        [None, {"background": None, "layers": [], "composite": None}, "blank canvas"],
        ids=["none", "nothing drawn", "blank canvas"],
    )
    def test_nothing_drawn_or_uploaded_gives_none(self, sketch):
        if sketch == "blank canvas":
            sketch = {"background": self.canvas, "layers": [Image.new("RGBA", (100, 80), (0, 0, 0, 0))], "composite": self.canvas}
        assert blip_helper.sketch_to_scribble(sketch) is None


# -- launching -----------------------------------------------------------------------------------------


def test_served_on_localhost_without_a_share_link(served):
    demo, local_url, share_url = served
    assert local_url.startswith("http://127.0.0.1:")
    assert demo.server_name == "127.0.0.1"
    assert share_url is None and demo.share is False


@pytest.mark.parametrize("in_jupyter", [True, False])
def test_launch_demo_blocks_only_outside_jupyter(monkeypatch, in_jupyter):
    class FakeDemo:
        def launch(self, **kwargs):
            self.kwargs = kwargs

    monkeypatch.setattr("gradio.utils.ipython_check", lambda: in_jupyter)
    demo = FakeDemo()
    blip_helper.launch_demo(demo)
    assert demo.kwargs == {"server_name": "127.0.0.1", "server_port": None, "share": False, "prevent_thread_lock": in_jupyter}


# -- the API, tab by tab -------------------------------------------------------------------------------


def test_zero_shot_generates_an_image_of_the_requested_size_with_the_settings(client, files, recorder):
    image, seed = _generate(client, files, "zero_shot", height=64, width=96, guidance_scale=3.0)
    assert Image.open(image).size == (96, 64)
    assert seed == FAST["seed"]
    call = recorder.calls[-1]
    assert (call["num_inference_steps"], call["guidance_scale"], call["conditioning_image"]) == (2, 3.0, None)
    assert call["neg_prompt"] == blip_helper.DEFAULT_NEGATIVE_PROMPT  # the prefilled default


def test_the_same_seed_gives_the_same_image(client, files):
    first, _ = _generate(client, files, "zero_shot", seed=7)
    second, _ = _generate(client, files, "zero_shot", seed=7)
    other, _ = _generate(client, files, "zero_shot", seed=8)
    assert np.array_equal(_gray(first), _gray(second))
    assert not np.array_equal(_gray(first), _gray(other))


def test_random_seed_reports_the_seed_it_used(client, files):
    image, seed = _generate(client, files, "zero_shot", seed=0, random_seed=True)
    assert isinstance(seed, int) and 0 <= seed <= blip_helper.DEMO_MAX_SEED
    again, same_seed = _generate(client, files, "zero_shot", seed=seed, random_seed=False)
    assert same_seed == seed
    assert np.array_equal(_gray(image), _gray(again))


def test_canny_shows_the_white_on_black_edge_map_it_used(client, files, recorder):
    image, edge_map, seed = _generate(client, files, "canny", height=64, width=96)
    assert Image.open(image).size == Image.open(edge_map).size == (96, 64)
    assert seed == FAST["seed"]
    edges = _gray(edge_map)
    _assert_white_on_black(edges)
    assert set(np.unique(edges)) <= {0, 255}  # Canny's binary edges, kept lossless
    np.testing.assert_array_equal(np.asarray(recorder.calls[-1]["conditioning_image"].convert("L")), edges)


def test_scribble_drawn_on_the_sketchpad_becomes_white_strokes_on_black(client, files, recorder):
    image, scribble, _ = _generate(client, files, "scribble")
    assert Image.open(image).size == Image.open(scribble).size == (64, 64)
    scribble = _gray(scribble)
    _assert_white_on_black(scribble)
    # The black band drawn across the middle of the white canvas, scaled from 256 to 64 pixels.
    assert scribble[32, 16:48].min() > 200
    assert scribble[:20].max() == 0 and scribble[44:].max() == 0
    assert recorder.calls[-1]["conditioning_image"] is not None


def test_scribble_traced_from_an_uploaded_silhouette(client, files):
    _, scribble, _ = _generate(client, files, "scribble", control_image=_sketch(files, "horse", [], "horse"))
    _assert_white_on_black(_gray(scribble))


@pytest.mark.parametrize(
    "tab, overrides, message",
    [
        ("zero_shot", {"reference_image": None}, "Reference image: upload a picture of the subject"),
        ("zero_shot", {"reference_image": "broken"}, "Reference image: the uploaded file could not be read as an image"),
        ("zero_shot", {"source_category": ""}, "Source category must name the subject"),
        ("canny", {"target_category": "  "}, "Target category must name the subject"),
        ("zero_shot", {"height": 100}, "Height must be a positive multiple of 8, got 100"),
        ("zero_shot", {"width": 2048}, "Width must be from 64 to 1024, got 2048"),
        ("zero_shot", {"steps": 0}, "Steps must be from 1 to 100, got 0"),
        ("zero_shot", {"guidance_scale": -1}, "Guidance scale must be a number >= 0"),
        ("zero_shot", {"negative_prompt": None}, "Negative prompt must be a string"),
        ("canny", {"control_image": None}, "Edge source: upload a photo"),
        ("canny", {"control_image": "broken"}, "Edge source: the uploaded file could not be read as an image"),
        ("scribble", {"control_image": None}, "Scribble: draw one on the canvas, or upload a photo or silhouette"),
        ("scribble", {"control_image": "blank"}, "Scribble: draw one on the canvas, or upload a photo or silhouette"),
    ],
)
def test_missing_or_bad_input_says_what_to_fix(client, files, tab, overrides, message):
    substitutes = {"broken": handle_file(files["broken"]), "blank": _sketch(files, "canvas", [], "canvas")}
    overrides = {key: substitutes.get(value, value) if isinstance(value, str) else value for key, value in overrides.items()}
    with pytest.raises(AppError) as error:
        _generate(client, files, tab, **overrides)
    assert str(error.value).startswith(message)


def test_keeps_serving_after_an_error(client, files):
    with pytest.raises(AppError):
        _generate(client, files, "zero_shot", reference_image=None)
    image, _ = _generate(client, files, "zero_shot")
    assert Image.open(image).size == (64, 64)


def test_controlled_tabs_without_a_controlnet_say_how_to_get_one(ir_base_only, files):
    pipe = blip_helper.OVBlipDiffusionPipeline.from_pretrained(ir_base_only)
    demo = blip_helper.make_demo(pipe)
    _, local_url, _ = blip_helper.launch_demo(demo, server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(local_url, verbose=False)
        with pytest.raises(AppError, match="^Control image was given, but the IR directory .* has no ControlNet; convert one"):
            _generate(client, files, "canny")
        image, _ = _generate(client, files, "zero_shot")  # the rest works
        assert Image.open(image).size == (64, 64)
    finally:
        demo.close()


def test_two_users_at_once_both_get_their_image_one_after_the_other(served, files, recorder):
    users = [Client(served[1], verbose=False) for _ in range(2)]
    jobs = [
        users[0].submit(**_inputs(files, "zero_shot"), api_name="/zero_shot"),
        users[1].submit(**_inputs(files, "canny"), api_name="/canny"),
        users[1].submit(**_inputs(files, "zero_shot", width=72), api_name="/zero_shot"),
    ]
    sizes = [Image.open(job.result(timeout=120)[0]).size for job in jobs]
    assert sizes == [(64, 64), (64, 64), (72, 64)]
    assert recorder.most_at_once == 1  # the pipeline is not thread-safe: the queue runs one call at a time


def test_progress_follows_the_denoising_steps(client, files, ov_pipe):
    steps = 50  # a few milliseconds each: long enough for Gradio's progress updates (every 10 ms)
    scheduler = ov_pipe.scheduler.from_config(ov_pipe.scheduler.config)
    scheduler.set_timesteps(steps)  # PNDM's PLMS steps: one more denoising iteration than asked for
    job = client.submit(**_inputs(files, "zero_shot", steps=steps), api_name="/zero_shot")
    job.result(timeout=120)

    async def updates():
        return [update async for update in job]

    progress = [unit for update in asyncio.run(updates()) for unit in getattr(update, "progress_data", None) or []]
    assert progress, "no progress update arrived"
    assert {(unit.unit, unit.length) for unit in progress} == {("steps", len(scheduler.timesteps))}


# -- the page in a real browser ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outside_requests() -> list[str]:
    """What the page asked of anything but the demo's server: it must work offline."""
    return []


@pytest.fixture(scope="module")
def page(served, outside_requests):
    """A Chromium page on the demo; fails (never skips) when Chromium cannot start."""
    from playwright.sync_api import Error, sync_playwright

    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Error as err:
            pytest.fail(
                f"Chromium did not start from {CHROMIUM}: install Debian's chromium (`apt-get install -y chromium`, "
                f"as .ci/run does). {err}",
                pytrace=False,
            )
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.on("request", lambda request: request.url.startswith(served[1]) or outside_requests.append(request.url))
        page.goto(served[1])
        yield page
        browser.close()


def _fill_in(page, tab: str, reference: str, prompt: str, source: str, target: str) -> None:
    page.locator(f"#{tab}_reference input[type=file]").set_input_files(reference)
    page.fill(f"#{tab}_prompt textarea", prompt)
    page.fill(f"#{tab}_source textarea", source)
    page.fill(f"#{tab}_target textarea", target)
    page.click(f"#{tab}_settings")  # the accordion
    for name, value in (("steps", 2), ("height", 64), ("width", 64)):
        number = page.locator(f"#{tab}_{name} input[type=number]")
        number.fill(str(value))
        number.press("Enter")


def test_browser_zero_shot(page, outside_requests, files, tmp_path):
    _fill_in(page, "zero_shot", files["cat"], "swimming underwater", "cat", "cat")
    page.click("#zero_shot_generate")
    result = page.locator("#zero_shot_result img")
    try:
        result.wait_for(timeout=60_000)
    finally:
        page.screenshot(path=tmp_path / "zero_shot.png", full_page=True)
        shutil.copy(tmp_path / "zero_shot.png", SCREENSHOT_COPY)
    assert result.evaluate("image => [image.naturalWidth, image.naturalHeight]") == [64, 64]
    # 'Random seed' is ticked by default: the seed box now shows the seed drawn instead of the initial 88888.
    seed = page.locator("#zero_shot_seed input").input_value()
    assert seed.isdigit() and seed != "88888"
    assert outside_requests == []


def _draw_a_stroke(page, editor: str, timeout: float = 90) -> None:
    """Drag the brush across the middle of an ImageEditor's canvas until the stroke shows.

    The canvas takes seconds to come alive in headless Chromium (software WebGL on a small CPU):
    clicks before that are lost, so pick the brush and draw again until a black stroke is on screen.
    """
    brush = page.locator(f"{editor} button[aria-label=Brush]")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "highlight" not in (brush.get_attribute("class") or ""):
            brush.click()
        box = page.locator(f"{editor} canvas").first.bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(x - 60, y)
        page.mouse.down()
        page.mouse.move(x + 60, y, steps=6)
        page.mouse.up()
        page.mouse.move(0, 0)  # the brush cursor, a black ring, out of the picture
        stroke = page.screenshot(clip={"x": x - 50, "y": y - 4, "width": 100, "height": 8})
        if np.mean(np.asarray(Image.open(io.BytesIO(stroke)).convert("L")) < 64) > 0.9:
            return
        time.sleep(0.5)
    raise AssertionError(f"no stroke appeared on the canvas of {editor} in {timeout} s")


def test_browser_scribble_drawn_with_the_mouse(page, outside_requests, files, tmp_path):
    page.get_by_role("tab", name="Scribble").click()
    _fill_in(page, "scribble", files["coffee"], "in a meadow", "coffee", "horse")
    _draw_a_stroke(page, "#scribble_control")
    page.click("#scribble_generate")
    control_map = page.locator("#scribble_control_map img")
    try:
        control_map.wait_for(timeout=60_000)
    finally:
        page.screenshot(path=tmp_path / "scribble.png", full_page=True)
    downloaded = tmp_path / "scribble_used.png"
    downloaded.write_bytes(page.request.get(control_map.get_attribute("src")).body())
    scribble = _gray(downloaded)
    _assert_white_on_black(scribble)
    # The horizontal stroke across the middle of the canvas, and nothing near the top or bottom.
    assert scribble[30:34].max() > 200 and scribble[:16].max() == 0 and scribble[48:].max() == 0
    assert outside_requests == []
