"""Shared fixtures: tiny random pipelines (PyTorch) and their OpenVINO IR, built once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import blip_helper  # noqa: E402
from pipeline_builder import build_tiny_pipelines  # noqa: E402

F32 = {"INFERENCE_PRECISION_HINT": "f32"}


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    return build_tiny_pipelines(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def pipe(tiny_dirs):
    return blip_helper.load_pipeline(tiny_dirs[0])


@pytest.fixture(scope="session")
def controlnet_pipe(tiny_dirs):
    return blip_helper.load_pipeline(tiny_dirs[1], controlnet=True)


@pytest.fixture(scope="session")
def ir_fp32(pipe, controlnet_pipe, tmp_path_factory):
    """Bit-exact weights: what the parity tests compare against PyTorch."""
    ir_dir = tmp_path_factory.mktemp("ir") / "fp32"
    blip_helper.convert_pipeline(pipe, ir_dir, controlnet_pipe=controlnet_pipe, weight_format="fp32")
    return ir_dir


@pytest.fixture(scope="session")
def ir_fp16(pipe, controlnet_pipe, tmp_path_factory):
    """The default conversion, as users get it."""
    ir_dir = tmp_path_factory.mktemp("ir") / "fp16"
    blip_helper.convert_pipeline(pipe, ir_dir, controlnet_pipe=controlnet_pipe)
    return ir_dir


@pytest.fixture(scope="session")
def ov_pipe(ir_fp32):
    pipe = blip_helper.OVBlipDiffusionPipeline.from_pretrained(ir_fp32, ov_config=F32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def ir_base_only(pipe, tmp_path_factory):
    ir_dir = tmp_path_factory.mktemp("ir") / "base_only"
    blip_helper.convert_pipeline(pipe, ir_dir, weight_format="fp32")
    return ir_dir


def random_image(seed: int, size=(40, 52), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).convert(mode)
