"""NNCF INT8 compression of a converted pipeline, on the tiny pipelines."""

from __future__ import annotations

import json

import numpy as np
import openvino as ov
import pytest
import torch
from conftest import random_image

import blip_helper
from blip_helper import OVBlipDiffusionPipeline

# Measured on the tiny pipelines (64x48, 3 steps, default precision): INT8 against the FP16 IR, mean
# abs pixel difference 0.010 / 0.006, max 0.08 / 0.045 (plain / ControlNet); the bounds leave room for other CPUs.
INT8_MEAN_DIFF = 0.05
INT8_MAX_DIFF = 0.4

CALIBRATION = [
    {"prompt": "on the beach", "reference_image": random_image(11), "source_subject_category": "dog", "target_subject_category": "dog"},
    {"prompt": "in the snow", "reference_image": random_image(12), "source_subject_category": "cat", "target_subject_category": "cat",
     "conditioning_image": random_image(13)},
]


@pytest.fixture(scope="session")
def ir_int8(ir_fp16, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "ir"
    blip_helper.compress_pipeline(ir_fp16, out, calibration=CALIBRATION, subset_size=8, calibration_size=64)
    return out


def _ops(ir_dir, part):
    return ov.Core().read_model(ir_dir / part / "openvino_model.xml").get_ops()


def _int8_weight_share(ops) -> float:
    """Share of weight bytes stored in 8 bits."""
    sizes = {}
    for op in ops:
        if op.get_type_name() == "Constant" and op.get_output_size() == 1 and op.shape and len(op.shape) >= 2:
            kind = op.get_output_element_type(0).get_type_name()
            sizes[kind] = sizes.get(kind, 0) + op.get_byte_size()
    return (sizes.get("i8", 0) + sizes.get("u8", 0)) / sum(sizes.values())


@pytest.mark.parametrize("part", ["qformer", "text_encoder", "vae_decoder", "unet", "controlnet"])
def test_int8_parts_hold_8_bit_weights(part, ir_int8, ir_fp16):
    ops = _ops(ir_int8, part)
    assert _int8_weight_share(ops) > 0.5
    assert _int8_weight_share(_ops(ir_fp16, part)) == 0
    fake_quantize = sum(op.get_type_name() == "FakeQuantize" for op in ops)
    config = json.loads((ir_int8 / part / "config.json").read_text())
    if part in blip_helper.ACTIVATION_PARTS:
        assert fake_quantize > 10 and config["quantization"] == blip_helper.ACTIVATION_SCHEME  # activations too
    else:
        assert fake_quantize == 0 and config["quantization"] == blip_helper.WEIGHT_ONLY_SCHEME


def test_int8_pipeline_generates_close_to_fp(ir_int8, ir_fp16):
    images = {}
    for name, ir_dir in (("fp", ir_fp16), ("int8", ir_int8)):
        pipe = OVBlipDiffusionPipeline.from_pretrained(ir_dir)
        # On the CPU the model cache pays for INT8 only (see default_ov_config).
        assert pipe.ov_config.get("CACHE_DIR") == (str(ir_dir / "model_cache") if name == "int8" else None)
        pipe.set_progress_bar_config(disable=True)
        images[name] = [
            pipe("swimming underwater", random_image(0), "dog", "dog", height=64, width=48, num_inference_steps=3,
                 output_type="np", generator=torch.Generator().manual_seed(0), conditioning_image=cond).images
            for cond in (None, random_image(6))
        ]
    for fp, int8 in zip(images["fp"], images["int8"]):
        assert int8.shape == (1, 64, 48, 3)
        diff = np.abs(int8 - fp)
        print(f"INT8 vs FP: max {diff.max():.4f}, mean {diff.mean():.5f}")
        assert diff.mean() <= INT8_MEAN_DIFF and diff.max() <= INT8_MAX_DIFF
        assert diff.max() > 0  # it is really another model


def test_int8_weights_are_smaller(ir_int8, ir_fp16):
    # The weights (.bin); in the tiny models the XML (which grows with the quantization nodes) dominates.
    for part in blip_helper.PART_NAMES:
        fp_bin = (ir_fp16 / part / "openvino_model.bin").stat().st_size
        int8_bin = (ir_int8 / part / "openvino_model.bin").stat().st_size
        assert int8_bin < 0.75 * fp_bin, part  # tiny models: biases and norms weigh more than in real ones


def test_calibration_data_comes_from_the_pipeline(ir_fp16):
    data = blip_helper.collect_calibration_data(ir_fp16, CALIBRATION, subset_size=8, height=64, width=64)
    # 2 generations x (3 steps + PNDM's extra one); the ControlNet only in the controlled generation.
    assert len(data["unet"]) == 8 and len(data["controlnet"]) == 4
    timesteps = {int(sample["timestep"][0]) for sample in data["unet"]}
    assert len(timesteps) >= 3  # spread over the denoising trajectory
    assert data["unet"][0]["sample"].shape == (2, 4, 8, 8)  # guidance doubles the batch
    assert any(np.abs(sample["mid_block_res"]).max() > 0 for sample in data["unet"])  # ControlNet residuals seen


def test_compression_resumes_and_never_looks_complete(ir_fp16, tmp_path, monkeypatch):
    out = tmp_path / "int8"

    def interrupted(model, samples):
        raise KeyboardInterrupt

    monkeypatch.setattr(blip_helper, "_quantize_denoiser", interrupted)
    with pytest.raises(KeyboardInterrupt):
        blip_helper.compress_pipeline(ir_fp16, out, calibration=CALIBRATION[:1], subset_size=2, calibration_size=64)
    assert not (out / "pipeline_config.json").exists() and not (out / "unet").exists()
    assert not list(out.glob(".*partial"))
    with pytest.raises(FileNotFoundError, match="incomplete"):
        OVBlipDiffusionPipeline.from_pretrained(out)
    stamp = (out / "qformer" / "openvino_model.bin").stat().st_mtime_ns
    monkeypatch.undo()
    blip_helper.compress_pipeline(ir_fp16, out, calibration=CALIBRATION, subset_size=4, calibration_size=64)
    assert (out / "qformer" / "openvino_model.bin").stat().st_mtime_ns == stamp  # done parts are skipped
    OVBlipDiffusionPipeline.from_pretrained(out)


BAD_ARGUMENTS = {
    "same directory": ({"same_dir": True}, ValueError, "output_dir must differ"),
    "subset size": ({"subset_size": 0}, ValueError, "subset_size"),
    "calibration size": ({"calibration_size": 60}, ValueError, "calibration_size"),
    "calibration not a list of dicts": ({"calibration": {"prompt": "x"}}, ValueError, "calibration"),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_bad_arguments(case, ir_fp16, tmp_path):
    kwargs, error, message = BAD_ARGUMENTS[case]
    out = ir_fp16 if kwargs.pop("same_dir", False) else tmp_path / "out"
    with pytest.raises(error, match=message):
        blip_helper.compress_pipeline(ir_fp16, out, **kwargs)


def test_missing_or_incomplete_source(tmp_path, ir_fp16):
    with pytest.raises(FileNotFoundError, match="No IR directory"):
        blip_helper.compress_pipeline(tmp_path / "nothing", tmp_path / "out")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "qformer").mkdir()
    with pytest.raises(FileNotFoundError, match="pipeline_config.json is missing"):
        blip_helper.compress_pipeline(tmp_path / "half", tmp_path / "out")
