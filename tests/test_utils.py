"""The notebook's helpers: control maps, example images, comparisons, tables and timings."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

import blip_helper


def test_example_images_ship_offline():
    images = blip_helper.example_images()
    assert set(images) >= {"cat", "coffee", "horse"}
    for image in images.values():
        assert image.mode == "RGB" and min(image.size) >= 256


def _white_share(image: Image.Image) -> float:
    array = np.asarray(image)
    assert set(np.unique(array)) <= {0, 255}, "control maps are white lines on black"
    return float((array == 255).mean())


def test_canny_map_is_white_edges_on_black():
    square = Image.new("RGB", (64, 64))
    square.paste((255, 255, 255), (16, 16, 48, 48))
    edges = blip_helper.canny_map(square)
    assert edges.size == (64, 64) and edges.mode == "RGB"
    assert 0.01 < _white_share(edges) < 0.2
    assert np.asarray(edges)[32, 32].sum() == 0  # the inside of the square is no edge


def test_scribble_map_outlines_a_silhouette():
    horse = blip_helper.example_images()["horse"]
    scribble = blip_helper.scribble_map(horse)
    assert scribble.size == horse.size
    assert 0.02 < _white_share(scribble) < 0.3
    assert blip_helper.scribble_map(Image.new("L", (50, 50), 128)).getextrema() == ((0, 0),) * 3  # flat: no strokes


def test_image_difference():
    a = Image.new("RGB", (4, 4), (0, 0, 0))
    b = Image.new("RGB", (4, 4), (255, 0, 0))
    diff = blip_helper.image_difference(a, b)
    assert diff["max_abs_diff"] == 1.0 and math.isclose(diff["mean_abs_diff"], 1 / 3)
    assert math.isclose(diff["psnr_db"], 10 * math.log10(3))
    assert blip_helper.image_difference(a, a)["psnr_db"] == math.inf
    with pytest.raises(ValueError, match="shape"):
        blip_helper.image_difference(a, Image.new("RGB", (4, 5)))


def test_markdown_table():
    table = blip_helper.markdown_table(["task", "seconds"], [["zero-shot", 12.3456], ["canny", 7]])
    assert table.splitlines() == ["| task | seconds |", "|---|---|", "| zero-shot | 12.3 |", "| canny | 7 |"]


def test_time_unet_step(ov_pipe):
    seconds = blip_helper.time_unet_step(ov_pipe, 64, 48, repeats=2)
    assert 0 < seconds < 10
    assert ov_pipe.unet._compiled_shapes["sample"] == (2, 4, 8, 6)
