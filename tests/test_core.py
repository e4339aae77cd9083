"""Core: loading, conversion and the OpenVINO pipeline, compared with diffusers on tiny random pipelines."""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
import torch
from conftest import F32, ROOT, random_image
from PIL import Image

import blip_helper
from blip_helper import OVBlipDiffusionPipeline

# f32 inference against PyTorch f32: the images must agree to this (the bound).
PARITY_ATOL = 2e-3
# Per-part outputs, f32 against f32.
PART_ATOL = 1e-4


def _inputs(**overrides):
    kwargs = {
        "prompt": "swimming underwater",
        "reference_image": random_image(0),
        "source_subject_category": "dog",
        "target_subject_category": "dog",
        "height": 64,
        "width": 64,
        "num_inference_steps": 3,
        "output_type": "np",
    }
    kwargs.update(overrides)
    return kwargs


def _generate(pipeline, seed=0, **overrides):
    return pipeline(**_inputs(**overrides), generator=torch.Generator().manual_seed(seed)).images


# ------------------------------------------------------------------------------------------ loading


def test_load_pipeline_returns_eval_pipelines(pipe, controlnet_pipe):
    assert isinstance(pipe, blip_helper.BlipDiffusionPipeline)
    assert isinstance(controlnet_pipe, blip_helper.BlipDiffusionControlNetPipeline)
    for module in (pipe.unet, pipe.qformer, pipe.text_encoder, pipe.vae, controlnet_pipe.controlnet):
        assert not module.training


def test_load_pipeline_ignores_library_names_in_model_index(tiny_dirs, tmp_path, pipe):
    # The hub's index names the BLIP-Diffusion parts under "blip_diffusion"; other diffusers releases
    # write other names. The loader must not care.
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dirs[0], copy)
    index = json.loads((copy / "model_index.json").read_text())
    for name in ("qformer", "text_encoder", "image_processor"):
        index[name] = ["diffusers", index[name][1]]
    (copy / "model_index.json").write_text(json.dumps(index))
    loaded = blip_helper.load_pipeline(copy)
    torch.testing.assert_close(loaded.unet.state_dict(), pipe.unet.state_dict(), rtol=0, atol=0)
    assert loaded.config.ctx_begin_pos == 2


def test_load_pipeline_unavailable_model_names_it_and_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(blip_helper.ModelNotAvailableError, match="nobody/no-such-blipdiffusion.*local"):
        blip_helper.load_pipeline("nobody/no-such-blipdiffusion")
    with pytest.raises(blip_helper.ModelNotAvailableError, match="no directory at"):
        blip_helper.load_pipeline("./no/such/dir")


def test_load_pipeline_controlnet_requires_a_controlnet(tiny_dirs):
    with pytest.raises(ValueError, match="controlnet=True"):
        blip_helper.load_pipeline(tiny_dirs[0], controlnet=True)


# ------------------------------------------------------------------------------- per-part parity


def test_load_pipeline_uses_given_components_instead_of_loading_them(tiny_dirs, pipe, controlnet_pipe):
    shared = blip_helper.shared_components(pipe)
    lean = blip_helper.load_pipeline(tiny_dirs[1], controlnet=True, **shared)
    assert all(getattr(lean, name) is module for name, module in shared.items())
    assert blip_helper._same_weights(lean.controlnet, controlnet_pipe.controlnet)
    with pytest.raises(ValueError, match=r"unknown components \['unett'\]"):
        blip_helper.load_pipeline(tiny_dirs[0], unett=pipe.unet)


def test_qformer_parity(pipe, ov_pipe):
    pixels = pipe.image_processor.preprocess(
        [random_image(1), random_image(2)], image_mean=pipe.config.mean, image_std=pipe.config.std, return_tensors="pt"
    )["pixel_values"]
    categories = ["dog", "teddy bear"]
    with torch.no_grad():
        expected = pipe.qformer(text_input=categories, image_input=pixels, return_dict=False).numpy()
    tokens = ov_pipe.qformer_tokenizer(categories, return_tensors="np", padding=True)
    actual = ov_pipe.qformer(
        pixel_values=pixels.numpy(), input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
    )["query_embeds"]
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=PART_ATOL, rtol=0)


def test_text_encoder_parity_with_and_without_context(pipe, ov_pipe):
    num_query = pipe.qformer.config.num_query_tokens
    max_len = pipe.text_encoder.text_model.config.max_position_embeddings
    ctx = torch.randn(2, num_query, pipe.text_encoder.text_model.config.hidden_size)
    ids = pipe.tokenizer(["a dog on the beach", "a cat"], padding="max_length", max_length=max_len - num_query, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = pipe.text_encoder(input_ids=ids, ctx_embeddings=ctx, ctx_begin_pos=[2, 2])[0].numpy()
    actual = ov_pipe.text_encoder(input_ids=ids.numpy(), ctx_embeddings=ctx.numpy())["last_hidden_state"]
    np.testing.assert_allclose(actual, expected, atol=PART_ATOL, rtol=0)

    neg_ids = pipe.tokenizer(["blurry"], padding="max_length", max_length=max_len, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = pipe.text_encoder(input_ids=neg_ids, ctx_embeddings=None)[0].numpy()
    np.testing.assert_allclose(ov_pipe.encode_negative_prompt("blurry"), expected, atol=PART_ATOL, rtol=0)


def _denoiser_inputs(pipe, batch=2, height=12, width=20):
    max_len = pipe.text_encoder.text_model.config.max_position_embeddings
    hidden = pipe.text_encoder.text_model.config.hidden_size
    gen = torch.Generator().manual_seed(3)
    return {
        "sample": torch.randn(batch, 4, height, width, generator=gen),
        "timestep": torch.tensor([501]),
        "encoder_hidden_states": torch.randn(batch, max_len, hidden, generator=gen),
    }


def test_controlnet_and_unet_parity(pipe, controlnet_pipe, ov_pipe):
    inputs = _denoiser_inputs(pipe)
    cond = torch.rand(2, 3, 12 * ov_pipe.latent_scale_factor, 20 * ov_pipe.latent_scale_factor)
    numpy_inputs = {name: value.numpy() for name, value in inputs.items()}
    with torch.no_grad():
        down, mid = controlnet_pipe.controlnet(**inputs, controlnet_cond=cond, return_dict=False)
    residuals = ov_pipe.controlnet(**numpy_inputs, controlnet_cond=cond.numpy())
    assert list(residuals) == [f"down_block_res_{i}" for i in range(len(down))] + ["mid_block_res"]
    for expected, actual in zip([*down, mid], residuals.values()):
        np.testing.assert_allclose(actual, expected.numpy(), atol=PART_ATOL, rtol=0)
    assert float(mid.abs().mean()) > 1e-2  # the tiny ControlNet really acts

    with torch.no_grad():
        expected = pipe.unet(**inputs, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        plain = pipe.unet(**inputs).sample
    actual = ov_pipe.unet(**numpy_inputs, **residuals)["noise_pred"]
    np.testing.assert_allclose(actual, expected.numpy(), atol=PART_ATOL, rtol=0)
    zeros = {name: np.zeros_like(value) for name, value in residuals.items()}
    np.testing.assert_allclose(ov_pipe.unet(**numpy_inputs, **zeros)["noise_pred"], plain.numpy(), atol=PART_ATOL, rtol=0)


def test_vae_decoder_parity(pipe, ov_pipe):
    latents = torch.randn(2, 4, 10, 14, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = pipe.vae.decode(latents, return_dict=False)[0].numpy()
    actual = ov_pipe.vae_decoder(latent_sample=latents.numpy())["sample"]
    assert actual.shape == (2, 3, 80, 112)
    np.testing.assert_allclose(actual, expected, atol=PART_ATOL, rtol=0)


# --------------------------------------------------------------------------- whole-pipeline parity

CASES = {
    "zero_shot": {},
    "no_guidance": {"guidance_scale": 1.0},
    "batch_of_two": {
        "prompt": ["swimming underwater", "on the beach"],
        "source_subject_category": ["dog", "cat"],
        "target_subject_category": ["dog", "cat"],
    },
    "non_square": {"height": 48, "width": 80},
    "rgba_reference_and_negative_prompt": {"reference_image": random_image(5, mode="RGBA"), "neg_prompt": "blurry"},
}


@pytest.mark.parametrize("case", CASES)
def test_pipeline_matches_diffusers(case, pipe, ov_pipe):
    overrides = CASES[case]
    expected = _generate(pipe, **overrides)
    actual = _generate(ov_pipe, **overrides)
    assert actual.shape == expected.shape
    assert expected.std() > 0.05  # a real image, not a flat one
    assert np.abs(actual - expected).max() <= PARITY_ATOL


def test_controlnet_pipeline_matches_diffusers(controlnet_pipe, ov_pipe):
    cond = random_image(6, size=(30, 30))
    expected = controlnet_pipe(**_inputs(), condtioning_image=cond, generator=torch.Generator().manual_seed(0)).images
    actual = _generate(ov_pipe, conditioning_image=cond)
    assert np.abs(actual - expected).max() <= PARITY_ATOL
    # The control map changes the result: it reaches the UNet.
    assert np.abs(actual - _generate(ov_pipe)).mean() > 1e-2


def test_same_seed_same_image_and_other_seed_other_image(ov_pipe):
    first, again, other = _generate(ov_pipe, seed=7), _generate(ov_pipe, seed=7), _generate(ov_pipe, seed=8)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).mean() > 1e-2


# Measured with the fp16 IR at the device's default precision (bf16 on AMX CPUs) against PyTorch f32:
# max 0.075, mean 0.007 on the tiny pipelines (bf16 with AVX512-BF16); the bounds leave room for other CPUs.
DEFAULT_PRECISION_MAX = 0.15
DEFAULT_PRECISION_MEAN = 0.02


def test_default_precision_and_fp16_weights_stay_close(pipe, ir_fp16):
    ov_default = OVBlipDiffusionPipeline.from_pretrained(ir_fp16)
    ov_default.set_progress_bar_config(disable=True)
    expected, actual = _generate(pipe), _generate(ov_default)
    diff = np.abs(actual - expected)
    print(f"default precision ({ov_default.core.get_property('CPU', 'INFERENCE_PRECISION_HINT')}): max {diff.max():.4f}, mean {diff.mean():.5f}")
    assert diff.max() <= DEFAULT_PRECISION_MAX and diff.mean() <= DEFAULT_PRECISION_MEAN


def test_pil_output_and_return_dict_false(ov_pipe):
    (images,) = ov_pipe(**_inputs(output_type="pil", height=40, width=56), return_dict=False)
    assert len(images) == 1 and isinstance(images[0], Image.Image)
    assert images[0].size == (56, 40) and images[0].mode == "RGB"


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "I;16", "CMYK"])
def test_images_in_any_mode_are_accepted(mode, ov_pipe):
    if mode == "I;16":
        image = Image.fromarray((np.random.default_rng(0).random((30, 30)) * 60000).astype(np.uint16))
        assert image.mode == "I;16"
    else:
        image = random_image(9, mode=mode)
    out = _generate(ov_pipe, reference_image=image, conditioning_image=image)
    assert out.shape == (1, 64, 64, 3)


def test_to_rgb_scales_16_bit_images():
    image = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert np.asarray(blip_helper.to_rgb(image))[0, :, 0].tolist() == [0, 127, 255]


# ---------------------------------------------------------------------------------------- bad input

BAD_INPUTS = {
    "no reference image": ({"reference_image": None}, "reference_image"),
    "reference not an image": ({"reference_image": np.zeros((8, 8, 3))}, "reference_image"),
    "category list length": ({"prompt": ["a", "b"], "source_subject_category": ["dog"]}, "source_subject_category"),
    "empty source category": ({"source_subject_category": "  "}, "source_subject_category"),
    "empty target category": ({"target_subject_category": ""}, "target_subject_category"),
    "empty prompt list": ({"prompt": []}, "prompt"),
    "height not multiple of 8": ({"height": 60}, "height"),
    "width zero": ({"width": 0}, "width"),
    "negative height": ({"height": -64}, "height"),
    "float width": ({"width": 64.0}, "width"),
    "zero steps": ({"num_inference_steps": 0}, "num_inference_steps"),
    "negative guidance": ({"guidance_scale": -1.0}, "guidance_scale"),
    "nan guidance": ({"guidance_scale": float("nan")}, "guidance_scale"),
    "output type": ({"output_type": "pt"}, "output_type"),
    "latents shape": ({"latents": torch.zeros(1, 4, 4, 4)}, "latents"),
    "generator list length": ({"generator": [torch.Generator(), torch.Generator()]}, "generator"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_value_error_naming_the_argument(case, ov_pipe):
    overrides, argument = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=argument):
        ov_pipe(**_inputs(**overrides))


def test_conditioning_image_without_controlnet(ir_base_only):
    ov_base = OVBlipDiffusionPipeline.from_pretrained(ir_base_only, ov_config=F32)
    assert not ov_base.has_controlnet
    with pytest.raises(ValueError, match="conditioning_image.*no ControlNet"):
        ov_base(**_inputs(conditioning_image=random_image(1)))


def test_unavailable_device_lists_available_ones(ir_fp32):
    with pytest.raises(ValueError, match=r"NPU.*not available.*CPU"):
        OVBlipDiffusionPipeline.from_pretrained(ir_fp32, device="NPU")


# --------------------------------------------------------------------- IR directory and conversion


def test_ir_directory_layout_and_sizes(ir_fp32, ir_fp16):
    for name in blip_helper.PART_NAMES:
        part = ir_fp32 / name
        assert (part / "openvino_model.xml").is_file() and (part / "config.json").is_file()
    # One UNet IR: nothing else in the directory holds UNet weights.
    assert sorted(p.name for p in ir_fp32.glob("**/*.xml")) == ["openvino_model.xml"] * len(blip_helper.PART_NAMES)
    unet = ov.Core().read_model(ir_fp32 / "unet" / "openvino_model.xml")
    assert [p.get_any_name() for p in unet.inputs][:3] == ["sample", "timestep", "encoder_hidden_states"]
    sizes32, sizes16 = blip_helper.ir_sizes(ir_fp32), blip_helper.ir_sizes(ir_fp16)
    assert sizes32["total"] == sum(v for k, v in sizes32.items() if k != "total")
    weights32, weights16 = ((d / "unet" / "openvino_model.bin").stat().st_size for d in (ir_fp32, ir_fp16))
    assert 0.45 < weights16 / weights32 < 0.55  # fp16 weights (the XML dominates the tiny models' totals)


def test_missing_or_incomplete_ir_directory(tmp_path, ir_fp32):
    with pytest.raises(FileNotFoundError, match="No IR directory"):
        OVBlipDiffusionPipeline.from_pretrained(tmp_path / "nothing")
    broken = tmp_path / "broken"
    shutil.copytree(ir_fp32, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(FileNotFoundError, match="incomplete: missing unet"):
        OVBlipDiffusionPipeline.from_pretrained(broken)
    (broken / "pipeline_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="pipeline_config.json is missing"):
        OVBlipDiffusionPipeline.from_pretrained(broken)


def test_interrupted_conversion_never_looks_complete_and_resumes(pipe, tmp_path, monkeypatch):
    out = tmp_path / "ir"
    real_convert_unet = blip_helper.convert_unet

    def failing_save(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. the user stops the cell while the UNet is being written

    monkeypatch.setattr(blip_helper.ov, "save_model", failing_save)
    with pytest.raises(KeyboardInterrupt):
        blip_helper.convert_pipeline(pipe, out, weight_format="fp32")
    monkeypatch.undo()
    assert not (out / "qformer").exists() and not list(out.glob(".*partial"))
    assert not (out / "pipeline_config.json").exists()

    # Convert the Q-Former alone, then interrupt during the UNet: the Q-Former stays, nothing else.
    blip_helper.convert_qformer(pipe, out, "fp32")
    mtime = (out / "qformer" / "openvino_model.bin").stat().st_mtime_ns
    calls = []

    def interrupted_unet(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(blip_helper, "convert_unet", interrupted_unet)
    with pytest.raises(KeyboardInterrupt):
        blip_helper.convert_pipeline(pipe, out, weight_format="fp32")
    assert calls and not (out / "unet").exists() and not (out / "pipeline_config.json").exists()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        OVBlipDiffusionPipeline.from_pretrained(out)

    monkeypatch.setattr(blip_helper, "convert_unet", real_convert_unet)
    blip_helper.convert_pipeline(pipe, out, weight_format="fp32")
    assert (out / "qformer" / "openvino_model.bin").stat().st_mtime_ns == mtime  # skipped, not redone
    OVBlipDiffusionPipeline.from_pretrained(out, ov_config=F32)


def test_parts_of_another_architecture_are_converted_again(pipe, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "ir"
    blip_helper.convert_pipeline(pipe, out, weight_format="fp32")
    stamps = {name: (out / name / "openvino_model.bin").stat().st_mtime_ns for name in ("qformer", "unet")}
    deeper_unet = UNet2DConditionModel(**{**pipe.unet.config, "layers_per_block": 2}).eval()
    monkeypatch.setattr(pipe, "unet", deeper_unet)
    blip_helper.convert_pipeline(pipe, out, weight_format="fp32")
    assert (out / "qformer" / "openvino_model.bin").stat().st_mtime_ns == stamps["qformer"]
    assert (out / "unet" / "openvino_model.bin").stat().st_mtime_ns != stamps["unet"]
    assert len(json.loads((out / "unet" / "config.json").read_text())["controlnet_residuals"]) == 1 + 4 * 2 + 3 + 1


def test_convert_pipeline_rejects_bad_arguments(pipe, controlnet_pipe, tmp_path):
    with pytest.raises(ValueError, match="weight_format"):
        blip_helper.convert_pipeline(pipe, tmp_path, weight_format="int4")
    with pytest.raises(ValueError, match="pipe must be a BlipDiffusionPipeline"):
        blip_helper.convert_pipeline(controlnet_pipe, tmp_path)
    with pytest.raises(ValueError, match="controlnet_pipe"):
        blip_helper.convert_pipeline(pipe, tmp_path, controlnet_pipe=pipe)


def test_round_trip_in_a_fresh_offline_process(ir_fp32, pipe, tmp_path):
    """The IR directory alone generates the diffusers image: no hub, no PyTorch model constructed."""
    script = textwrap.dedent(
        f"""
        import sys, numpy as np, torch
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / "tests")!r})
        from blip_helper import OVBlipDiffusionPipeline
        from conftest import random_image
        def forbidden(*args, **kwargs):
            raise AssertionError("a PyTorch module was constructed")
        torch.nn.Module.__init__ = forbidden
        pipe = OVBlipDiffusionPipeline.from_pretrained({str(ir_fp32)!r}, ov_config={{"INFERENCE_PRECISION_HINT": "f32"}})
        images = pipe("swimming underwater", random_image(0), "dog", "dog", height=64, width=64,
                      num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
        np.save({str(tmp_path / "out.npy")!r}, images)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    actual = np.load(tmp_path / "out.npy")
    assert np.abs(actual - _generate(pipe)).max() <= PARITY_ATOL


def test_static_shapes_compile_once_per_size(ov_pipe):
    ov_pipe.compile(height=32, width=40)
    requests = {name: getattr(ov_pipe, name)._request for name in ("qformer", "text_encoder", "unet", "vae_decoder")}
    assert ov_pipe.unet._compiled_shapes["sample"] == (2, 4, 4, 5)
    _generate(ov_pipe, height=32, width=40, seed=1)
    for name, request in requests.items():
        assert getattr(ov_pipe, name)._request is request, f"{name} was compiled again for the same size"
    _generate(ov_pipe, height=40, width=32)
    assert ov_pipe.unet._request is not requests["unet"]  # a new size: compiled for it
    assert ov_pipe.unet._compiled_shapes["sample"] == (2, 4, 5, 4)
    assert ov_pipe.text_encoder._request is requests["text_encoder"]  # dynamic shapes: compiled once


# -- memory: the mapped IR is handed back once the compiled models hold their own weights --------


def _resident_bytes_under(directory) -> int:
    """Resident bytes of this process's mappings of files under ``directory`` (from /proc/self/smaps)."""
    root, resident, inside = str(Path(directory).resolve()) + os.sep, 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if fields and "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
                inside = len(fields) >= 6 and fields[5].startswith(root)
            elif inside and fields[0] == "Rss:":
                resident += int(fields[1]) * 1024
    return resident


def _mapped_file(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())  # clean pages: the kernel may reclaim them without writing back
    with open(path, "rb") as file:
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    assert sum(mapping[i] for i in range(0, len(data), 4096)) >= 0  # touch every page
    return mapping


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT and /proc/self/smaps are Linux's")
def test_release_mapped_files_drops_resident_pages_and_keeps_the_data(tmp_path):
    size = 8 * 2**20
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    inside = _mapped_file(tmp_path / "ir" / "part" / "openvino_model.bin", data)
    outside = _mapped_file(tmp_path / "elsewhere" / "weights.bin", data)
    assert _resident_bytes_under(tmp_path / "ir") >= size
    assert blip_helper.release_mapped_files([tmp_path / "ir"]) >= size
    assert _resident_bytes_under(tmp_path / "ir") < size // 8
    assert _resident_bytes_under(tmp_path / "elsewhere") >= size  # only the directories named
    assert inside[:] == data and outside[:] == data  # read back from the file when touched again
    inside.close()
    outside.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT and /proc/self/smaps are Linux's")
def test_compiled_parts_hand_back_their_mapped_ir_and_images_do_not_change(ir_fp16, tmp_path, monkeypatch):
    def run(release: bool):
        ir_dir = shutil.copytree(ir_fp16, tmp_path / f"ir-{release}")  # files no other test's pipeline has mapped
        os.sync()  # written back: the kernel reclaims clean pages only
        if not release:  # the control: without the release, the IR's pages stay resident
            monkeypatch.setattr(blip_helper, "release_mapped_files", lambda directories: 0)
        pipe = OVBlipDiffusionPipeline.from_pretrained(ir_dir)
        pipe.set_progress_bar_config(disable=True)
        pipe.compile(height=32, width=32)
        static = {name: _resident_bytes_under(ir_dir / name) / (ir_dir / name / "openvino_model.bin").stat().st_size
                  for name in ("unet", "controlnet", "vae_decoder")}
        image = _generate(pipe, conditioning_image=random_image(5), height=32, width=32)
        monkeypatch.undo()
        return static, image

    released, image = run(release=True)
    kept, control_image = run(release=False)
    assert all(fraction < 0.05 for fraction in released.values()), released
    assert all(fraction > 0.5 for fraction in kept.values()), kept
    np.testing.assert_array_equal(image, control_image)


def test_model_cache_off_on_the_cpu_on_elsewhere_and_when_asked(ir_fp16, tmp_path):
    assert OVBlipDiffusionPipeline.default_ov_config(ir_fp16, "CPU") == {}
    assert OVBlipDiffusionPipeline.default_ov_config(ir_fp16, "CPU", quantized=True) == {"CACHE_DIR": str(ir_fp16 / "model_cache")}
    for device in ("GPU", "GPU.1", "AUTO", "NPU"):
        assert OVBlipDiffusionPipeline.default_ov_config(ir_fp16, device) == {"CACHE_DIR": str(ir_fp16 / "model_cache")}
    assert "CACHE_DIR" not in OVBlipDiffusionPipeline.from_pretrained(ir_fp16).ov_config
    cached = OVBlipDiffusionPipeline.from_pretrained(ir_fp16, ov_config={"CACHE_DIR": str(tmp_path / "cache")})
    cached.compile(height=32, width=32)
    assert len(list((tmp_path / "cache").glob("*.blob"))) == 5  # one compiled model per part
    assert not (ir_fp16 / "model_cache").exists()
