"""BLIP-Diffusion on OpenVINO: load the diffusers pipelines, convert them to OpenVINO IR, run them.

The notebook ``blip-diffusion-subject-generation.ipynb`` explains and calls this module:

    pipe = load_pipeline("Salesforce/blipdiffusion")                       # PyTorch, diffusers
    cn_pipe = load_pipeline("Salesforce/blipdiffusion-controlnet", controlnet=True)
    convert_pipeline(pipe, "ir/blipdiffusion", controlnet_pipe=cn_pipe)     # OpenVINO IR
    ov_pipe = OVBlipDiffusionPipeline.from_pretrained("ir/blipdiffusion", device="CPU")
    image = ov_pipe("on the beach", reference_image, "dog", "dog").images[0]

An IR directory holds one folder per model part (``qformer``, ``text_encoder``, ``unet``,
``vae_decoder``, ``controlnet``), each with ``openvino_model.xml/.bin`` and the ``config.json`` the
runtime needs, beside the ``tokenizer``, ``scheduler`` and ``image_processor`` configs. Every folder
is written under a temporary name and renamed when complete; ``pipeline_config.json`` is written
last, so an interrupted conversion never looks finished.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import PIL.Image
import torch
from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm
from transformers import BatchEncoding, BertTokenizer, CLIPTokenizer

try:  # newer diffusers releases keep BLIP-Diffusion under `pipelines.deprecated`
    from diffusers.pipelines.deprecated.blip_diffusion import BlipDiffusionPipeline
    from diffusers.pipelines.deprecated.blip_diffusion.blip_image_processing import BlipImageProcessor
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
    from diffusers.pipelines.deprecated.controlnet_blip_diffusion import BlipDiffusionControlNetPipeline
except ImportError:
    from diffusers.pipelines.blip_diffusion import BlipDiffusionPipeline
    from diffusers.pipelines.blip_diffusion.blip_image_processing import BlipImageProcessor
    from diffusers.pipelines.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from diffusers.pipelines.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
    from diffusers.pipelines.controlnet.pipeline_controlnet_blip_diffusion import BlipDiffusionControlNetPipeline

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_CONTROLNET_MODEL",
    "DEFAULT_NEGATIVE_PROMPT",
    "ModelNotAvailableError",
    "load_pipeline",
    "shared_components",
    "convert_pipeline",
    "convert_qformer",
    "convert_text_encoder",
    "convert_unet",
    "convert_vae_decoder",
    "convert_controlnet",
    "ir_sizes",
    "release_mapped_files",
    "OVBlipDiffusionPipeline",
    "to_rgb",
    "generate_with_diffusers",
    "canny_map",
    "scribble_map",
    "example_images",
    "image_difference",
    "show_images",
    "markdown_table",
    "time_unet_step",
    "compress_pipeline",
    "collect_calibration_data",
    "default_calibration",
]

# The negative prompt of diffusers' BLIP-Diffusion examples.
DEFAULT_NEGATIVE_PROMPT = (
    "over-exposure, under-exposure, saturated, duplicate, out of frame, lowres, cropped, worst quality, "
    "low quality, jpeg artifacts, morbid, mutilated, ugly, bad anatomy, bad proportions, deformed, blurry"
)
DEFAULT_MODEL = "Salesforce/blipdiffusion"
DEFAULT_CONTROLNET_MODEL = "Salesforce/blipdiffusion-controlnet"

MODEL_FILE = "openvino_model.xml"
PIPELINE_CONFIG = "pipeline_config.json"
PART_NAMES = ("qformer", "text_encoder", "unet", "vae_decoder", "controlnet")
REQUIRED_PARTS = PART_NAMES[:-1]
ASSET_NAMES = ("tokenizer", "scheduler", "image_processor")


class ModelNotAvailableError(OSError):
    """The model is neither a local directory nor reachable on the Hugging Face hub."""


# --------------------------------------------------------------------------------------------------
# Loading the PyTorch pipelines
# --------------------------------------------------------------------------------------------------

_COMPONENT_CLASSES = {
    "tokenizer": CLIPTokenizer,
    "text_encoder": ContextCLIPTextModel,
    "vae": AutoencoderKL,
    "unet": UNet2DConditionModel,
    "scheduler": PNDMScheduler,
    "qformer": Blip2QFormerModel,
    "image_processor": BlipImageProcessor,
    "controlnet": ControlNetModel,
}


def _not_available(model: str, reason: object) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"Could not load the model {model!r}: {reason}. Either allow access to the Hugging Face hub, or "
        f"download it where you can (`huggingface-cli download {model} --local-dir DIR`) and pass that local "
        "directory instead of the hub id (in the notebook: set BLIP_DIFFUSION_MODEL / "
        "BLIP_DIFFUSION_CONTROLNET_MODEL to it)."
    )


def _resolve_model_dir(model: str | os.PathLike) -> Path:
    """A local directory as it is; a hub id downloaded (or taken from the cache) with huggingface_hub."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotAvailableError(
            f"Could not load the model {name!r}: there is no directory at {path}, and it is not a hub id of the "
            f"form 'owner/name' (such as {DEFAULT_MODEL!r}). Pass the directory that holds the pipeline's "
            "model_index.json."
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name))
    except Exception as err:  # offline, unknown repo, gated repo, ...: all end the same for the user
        raise _not_available(name, f"{type(err).__name__}: {err}") from err


def load_pipeline(model: str | os.PathLike = DEFAULT_MODEL, controlnet: bool = False, **components):
    """Load the diffusers BLIP-Diffusion pipeline in eval mode, from a hub id or a local directory.

    Args:
        model: a hub id (``Salesforce/blipdiffusion``, ``Salesforce/blipdiffusion-controlnet``) or a
            directory holding such a pipeline (the hub's layout or what ``save_pretrained`` writes).
        controlnet: load ``BlipDiffusionControlNetPipeline`` (the directory must have a ``controlnet``).
        components: components to use as they are instead of loading them, as in diffusers'
            ``from_pretrained(..., unet=unet)``; e.g. the base pipeline's Q-Former, text encoder, UNet
            and VAE, when only the ControlNet is needed (see :func:`shared_components`).

    The components are loaded one by one from the folders ``model_index.json`` names, which works
    whatever library name the index records for them (``blip_diffusion`` on the hub).

    Raises:
        ModelNotAvailableError: the model is neither a local directory nor downloadable.
        ValueError: ``controlnet=True`` for a pipeline without a ControlNet.
    """
    model_dir = _resolve_model_dir(model)
    index_file = model_dir / "model_index.json"
    if not index_file.is_file():
        raise _not_available(str(model), f"{index_file} is missing, so this is not a diffusers pipeline")
    index = json.loads(index_file.read_text())
    pipeline_class = BlipDiffusionControlNetPipeline if controlnet else BlipDiffusionPipeline
    names = ["tokenizer", "text_encoder", "vae", "unet", "scheduler", "qformer", "image_processor"]
    if controlnet:
        if "controlnet" not in index:
            raise ValueError(
                f"controlnet=True, but {model} has no ControlNet (its model_index.json lists {sorted(index)}); "
                f"use a BLIP-Diffusion ControlNet pipeline such as {DEFAULT_CONTROLNET_MODEL!r}."
            )
        names.append("controlnet")
    unknown = sorted(set(components) - set(names))
    if unknown:
        raise ValueError(f"load_pipeline got unknown components {unknown}; this pipeline has {names}")
    for name in names:
        if name in components:
            continue
        try:
            components[name] = _COMPONENT_CLASSES[name].from_pretrained(model_dir / name)
        except OSError as err:
            # The Q-Former also loads a BERT tokenizer named in its config (bert-base-uncased by default).
            raise _not_available(str(model), f"loading its {name!r} failed ({err})") from err
    pipe = pipeline_class(
        **components,
        ctx_begin_pos=index.get("ctx_begin_pos", 2),
        mean=index.get("mean"),
        std=index.get("std"),
    )
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


# --------------------------------------------------------------------------------------------------
# Conversion to OpenVINO IR
# --------------------------------------------------------------------------------------------------


@contextmanager
def _atomic_dir(target: Path, overwrite: bool = True):
    """Yield a temporary folder that becomes ``target`` only if the block completes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _part_complete(part_dir: Path, **expected_config) -> bool:
    """All files of a converted part are there, and its config.json has the ``expected_config`` values."""
    if not all((part_dir / name).is_file() for name in (MODEL_FILE, "openvino_model.bin", "config.json")):
        return False
    config = json.loads((part_dir / "config.json").read_text())
    return all(config.get(key) == value for key, value in expected_config.items())


def _needs_conversion(part_dir: Path, module: torch.nn.Module, weight_format: str, overwrite: bool) -> bool:
    if weight_format not in ("fp16", "fp32"):
        raise ValueError(f"weight_format must be 'fp16' or 'fp32', got {weight_format!r}")
    return overwrite or not _part_complete(part_dir, source=_source_fingerprint(module), weight_format=weight_format)


def _source_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a module's architecture config: a part converted from another model is not reused."""
    import hashlib

    config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
    config = {key: value for key, value in config.items() if not key.startswith("_")}  # paths, versions
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_ir(
    module: torch.nn.Module,
    example_input: dict[str, Any],
    input_names: Sequence[str],
    output_names: Sequence[str],
    config: dict,
    part_dir: Path,
    weight_format: str,
    source: torch.nn.Module,
    save_assets=None,
) -> None:
    """Trace ``module``, name its inputs and outputs, and save IR + config.json atomically."""
    config = {**config, "source": _source_fingerprint(source), "weight_format": weight_format}
    with torch.no_grad(), warnings.catch_warnings():
        # diffusers' shape checks trip TorchScript's tracer warnings; the parity tests cover what they warn of.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        ov_model = ov.convert_model(module, example_input=example_input)
    for port, name in zip(ov_model.inputs, input_names, strict=True):
        port.get_tensor().set_names({name})
    for port, name in zip(ov_model.outputs, output_names, strict=True):
        port.get_tensor().set_names({name})
    with _atomic_dir(part_dir) as tmp:
        ov.save_model(ov_model, tmp / MODEL_FILE, compress_to_fp16=weight_format == "fp16")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if save_assets is not None:
            save_assets(tmp)
    del ov_model
    gc.collect()


class _QFormerForExport(torch.nn.Module):
    """The Q-Former with tokenisation moved out of the graph (token ids become model inputs)."""

    class _Pretokenized:
        # Stands in for the Q-Former's BERT tokenizer while tracing, so diffusers' own forward runs unchanged.
        def __init__(self, input_ids, attention_mask):
            self.encoding = BatchEncoding({"input_ids": input_ids, "attention_mask": attention_mask})

        def __call__(self, *args, **kwargs):
            return self.encoding

    def __init__(self, qformer: Blip2QFormerModel):
        super().__init__()
        self.qformer = qformer

    def forward(self, pixel_values, input_ids, attention_mask):
        tokenizer = self.qformer.tokenizer
        self.qformer.tokenizer = self._Pretokenized(input_ids, attention_mask)
        try:
            return self.qformer(text_input=None, image_input=pixel_values, return_dict=False)
        finally:
            self.qformer.tokenizer = tokenizer


class _TextEncoderForExport(torch.nn.Module):
    """ContextCLIPTextModel that accepts any batch and a context of any length, including none.

    diffusers inserts the subject embeddings with a Python loop over the batch, which tracing would
    freeze to one batch size. Here they go in with one concat at ``ctx_begin_pos``; a context of length
    0 gives the plain CLIP encoding used for the negative prompt, so one IR serves both.
    """

    def __init__(self, text_encoder: ContextCLIPTextModel, ctx_begin_pos: int):
        super().__init__()
        self.text_model = text_encoder.text_model
        self.ctx_begin_pos = ctx_begin_pos
        max_len = self.text_model.config.max_position_embeddings
        mask = torch.full((max_len, max_len), torch.finfo(torch.float32).min).triu(1)
        self.register_buffer("causal_mask", mask[None, None], persistent=False)

    def forward(self, input_ids, ctx_embeddings):
        embeddings = self.text_model.embeddings
        tokens = embeddings.token_embedding(input_ids)
        pos = self.ctx_begin_pos
        hidden = torch.cat([tokens[:, :pos], ctx_embeddings, tokens[:, pos:]], dim=1)
        seq_len = hidden.shape[1]
        hidden = hidden + embeddings.position_embedding.weight[:seq_len]
        causal_mask = self.causal_mask[:, :, :seq_len, :seq_len]
        hidden = self.text_model.encoder(
            inputs_embeds=hidden, causal_attention_mask=causal_mask, return_dict=False
        )[0]
        return self.text_model.final_layer_norm(hidden)


def _controlnet_residual_specs(unet_config) -> list[tuple[int, int]]:
    """(channels, downscale) of each ControlNet residual the UNet accepts: conv_in, then each down block."""
    specs = [(unet_config.block_out_channels[0], 1)]
    scale = 1
    for i, channels in enumerate(unet_config.block_out_channels):
        specs += [(channels, scale)] * unet_config.layers_per_block
        if i < len(unet_config.block_out_channels) - 1:
            scale *= 2
            specs.append((channels, scale))
    specs.append((unet_config.block_out_channels[-1], scale))  # the mid block
    return specs


def _residual_names(count: int) -> list[str]:
    return [f"down_block_res_{i}" for i in range(count - 1)] + ["mid_block_res"]


class _UNetForExport(torch.nn.Module):
    """The UNet with the ControlNet residuals as inputs: zeros for plain generation, so one IR serves both."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, *residuals):
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            down_block_additional_residuals=residuals[:-1],
            mid_block_additional_residual=residuals[-1],
            return_dict=False,
        )[0]


class _ControlNetForExport(torch.nn.Module):
    def __init__(self, controlnet: ControlNetModel):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond):
        down, mid = self.controlnet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, controlnet_cond=controlnet_cond, return_dict=False
        )
        return (*down, mid)


class _VaeDecoderForExport(torch.nn.Module):
    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


def _latent_scale_factor(unet_config) -> int:
    # diffusers' BLIP-Diffusion derives the latent size from the UNet's depth (8 for SD 1.5).
    return 2 ** (len(unet_config.block_out_channels) - 1)


def _example_latent_size(unet_config) -> int:
    # Not a multiple of the UNet's overall up-sampling factor: the traced graph then passes explicit
    # up-sampling sizes, so the IR accepts every latent size (every image size that is a multiple of 8).
    return 2 ** len(unet_config.block_out_channels) + 1


def _text_hidden(pipe) -> tuple[int, int]:
    config = pipe.text_encoder.text_model.config
    return config.max_position_embeddings, config.hidden_size


def convert_qformer(pipe, output_dir, weight_format: str = "fp16", overwrite: bool = False) -> Path:
    """Q-Former + vision encoder + projection: (pixel_values, input_ids, attention_mask) -> query_embeds."""
    part_dir = Path(output_dir) / "qformer"
    if not _needs_conversion(part_dir, pipe.qformer, weight_format, overwrite):
        return part_dir
    qformer = pipe.qformer
    size = pipe.image_processor.size
    tokens = qformer.tokenizer(["dog", "teddy bear"], return_tensors="pt", padding=True)
    example = {
        "pixel_values": torch.randn(1, 3, size["height"], size["width"]),
        "input_ids": tokens.input_ids,
        "attention_mask": tokens.attention_mask,
    }
    config = {
        "num_query_tokens": qformer.config.num_query_tokens,
        "hidden_size": qformer.config.qformer_config.hidden_size,
        "image_size": size,
    }
    _save_ir(
        _QFormerForExport(qformer),
        example,
        ["pixel_values", "input_ids", "attention_mask"],
        ["query_embeds"],
        config,
        part_dir,
        weight_format,
        qformer,
        save_assets=lambda tmp: qformer.tokenizer.save_pretrained(tmp / "tokenizer"),
    )
    return part_dir


def convert_text_encoder(pipe, output_dir, weight_format: str = "fp16", overwrite: bool = False) -> Path:
    """Context-aware CLIP text encoder: (input_ids, ctx_embeddings) -> last_hidden_state."""
    part_dir = Path(output_dir) / "text_encoder"
    if not _needs_conversion(part_dir, pipe.text_encoder, weight_format, overwrite):
        return part_dir
    max_len, hidden = _text_hidden(pipe)
    num_query = pipe.qformer.config.num_query_tokens
    example = {
        "input_ids": torch.randint(0, pipe.tokenizer.vocab_size, (2, max_len - num_query)),
        "ctx_embeddings": torch.randn(2, num_query, hidden),
    }
    config = {
        "max_position_embeddings": max_len,
        "hidden_size": hidden,
        "ctx_begin_pos": pipe.config.ctx_begin_pos,
    }
    _save_ir(
        _TextEncoderForExport(pipe.text_encoder, pipe.config.ctx_begin_pos),
        example,
        ["input_ids", "ctx_embeddings"],
        ["last_hidden_state"],
        config,
        part_dir,
        weight_format,
        pipe.text_encoder,
    )
    return part_dir


def _denoiser_example(pipe, unet_config) -> dict[str, torch.Tensor]:
    max_len, hidden = _text_hidden(pipe)
    size = _example_latent_size(unet_config)
    return {
        "sample": torch.randn(2, unet_config.in_channels, size, size),
        "timestep": torch.tensor([981]),
        "encoder_hidden_states": torch.randn(2, max_len, hidden),
    }


def convert_unet(pipe, output_dir, weight_format: str = "fp16", overwrite: bool = False) -> Path:
    """UNet with ControlNet residual inputs: one IR for plain and ControlNet generation."""
    part_dir = Path(output_dir) / "unet"
    if not _needs_conversion(part_dir, pipe.unet, weight_format, overwrite):
        return part_dir
    unet_config = pipe.unet.config
    example = _denoiser_example(pipe, unet_config)
    specs = _controlnet_residual_specs(unet_config)
    size = example["sample"].shape[-1]
    residuals = [torch.zeros(2, channels, math.ceil(size / scale), math.ceil(size / scale)) for channels, scale in specs]
    config = {
        "in_channels": unet_config.in_channels,
        "latent_scale_factor": _latent_scale_factor(unet_config),
        "controlnet_residuals": specs,
    }
    _save_ir(
        _UNetForExport(pipe.unet),
        (*example.values(), *residuals),
        [*example, *_residual_names(len(specs))],
        ["noise_pred"],
        config,
        part_dir,
        weight_format,
        pipe.unet,
    )
    return part_dir


def convert_controlnet(controlnet_pipe, output_dir, weight_format: str = "fp16", overwrite: bool = False) -> Path:
    """ControlNet: (sample, timestep, encoder_hidden_states, controlnet_cond) -> the UNet's residual inputs."""
    part_dir = Path(output_dir) / "controlnet"
    if not _needs_conversion(part_dir, controlnet_pipe.controlnet, weight_format, overwrite):
        return part_dir
    unet_config = controlnet_pipe.unet.config
    example = _denoiser_example(controlnet_pipe, unet_config)
    image_size = example["sample"].shape[-1] * _latent_scale_factor(unet_config)
    example["controlnet_cond"] = torch.rand(2, 3, image_size, image_size)
    count = len(_controlnet_residual_specs(unet_config))
    _save_ir(
        _ControlNetForExport(controlnet_pipe.controlnet),
        example,
        list(example),
        _residual_names(count),
        {"conditioning_channels": controlnet_pipe.controlnet.config.conditioning_channels},
        part_dir,
        weight_format,
        controlnet_pipe.controlnet,
    )
    return part_dir


def convert_vae_decoder(pipe, output_dir, weight_format: str = "fp16", overwrite: bool = False) -> Path:
    """VAE decoder: latent_sample (already divided by the scaling factor) -> sample in [-1, 1]."""
    part_dir = Path(output_dir) / "vae_decoder"
    if not _needs_conversion(part_dir, pipe.vae, weight_format, overwrite):
        return part_dir
    vae_config = pipe.vae.config
    example = {"latent_sample": torch.randn(1, vae_config.latent_channels, 9, 9)}
    config = {"latent_channels": vae_config.latent_channels, "scaling_factor": vae_config.scaling_factor}
    _save_ir(
        _VaeDecoderForExport(pipe.vae), example, ["latent_sample"], ["sample"], config, part_dir, weight_format, pipe.vae
    )
    return part_dir


def _save_assets(pipe, output_dir: Path) -> None:
    # Small, so always written again: they must match the model parts just converted.
    savers = {
        "tokenizer": pipe.tokenizer.save_pretrained,
        "scheduler": pipe.scheduler.save_pretrained,
        "image_processor": pipe.image_processor.save_pretrained,
    }
    for name, save in savers.items():
        with _atomic_dir(output_dir / name) as tmp:
            save(tmp)


def shared_components(pipe) -> dict:
    """The base pipeline's large modules, for ``load_pipeline(controlnet_model, controlnet=True, **shared_components(pipe))``.

    :func:`convert_pipeline` takes only the ControlNet from the ControlNet pipeline (one UNet IR serves
    both kinds of generation), so a ControlNet pipeline loaded this way converts to the same IR while
    holding one copy of the rest: 6 GB (5.8 GiB) of FP32 weights less for the published models.
    """
    return {name: getattr(pipe, name) for name in ("qformer", "text_encoder", "unet", "vae")}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    if a is b:
        return True
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def convert_pipeline(
    pipe,
    output_dir: str | os.PathLike,
    controlnet_pipe=None,
    weight_format: str = "fp16",
    overwrite: bool = False,
) -> dict[str, int]:
    """Convert a BLIP-Diffusion pipeline (and optionally its ControlNet) to an OpenVINO IR directory.

    Args:
        pipe: a ``BlipDiffusionPipeline`` from :func:`load_pipeline`.
        output_dir: where the IR directory goes.
        controlnet_pipe: a ``BlipDiffusionControlNetPipeline``; only its ControlNet is converted, since
            one UNet IR serves both kinds of generation.
        weight_format: ``"fp16"`` (half the size, the default) or ``"fp32"`` (bit-exact weights).
        overwrite: convert again parts that are already there. By default a part is skipped when it
            was converted from a model of the same architecture config (a different checkpoint of the
            same architecture needs ``overwrite=True``).

    Returns:
        The size on disk of each part, in bytes (see :func:`ir_sizes`).
    """
    if weight_format not in ("fp16", "fp32"):
        raise ValueError(f"weight_format must be 'fp16' or 'fp32', got {weight_format!r}")
    if not isinstance(pipe, BlipDiffusionPipeline):
        raise ValueError(f"pipe must be a BlipDiffusionPipeline (see load_pipeline), got {type(pipe).__name__}")
    if controlnet_pipe is not None and not isinstance(controlnet_pipe, BlipDiffusionControlNetPipeline):
        raise ValueError(
            "controlnet_pipe must be a BlipDiffusionControlNetPipeline (load_pipeline(..., controlnet=True)), "
            f"got {type(controlnet_pipe).__name__}"
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if overwrite and (output_dir / PIPELINE_CONFIG).exists():
        (output_dir / PIPELINE_CONFIG).unlink()
    converters = {
        "qformer": lambda: convert_qformer(pipe, output_dir, weight_format, overwrite),
        "text_encoder": lambda: convert_text_encoder(pipe, output_dir, weight_format, overwrite),
        "unet": lambda: convert_unet(pipe, output_dir, weight_format, overwrite),
        "vae_decoder": lambda: convert_vae_decoder(pipe, output_dir, weight_format, overwrite),
    }
    if controlnet_pipe is not None:
        if not _same_weights(pipe.unet, controlnet_pipe.unet):
            warnings.warn(
                "The ControlNet pipeline's UNet differs from the base pipeline's; the OpenVINO pipeline uses the "
                "base UNet for both kinds of generation.",
                stacklevel=2,
            )
        converters["controlnet"] = lambda: convert_controlnet(controlnet_pipe, output_dir, weight_format, overwrite)
    for convert in tqdm(converters.values(), desc="Converting to OpenVINO IR"):
        convert()  # each skips a part already converted from the same architecture
    _save_assets(pipe, output_dir)
    parts = [name for name in PART_NAMES if _part_complete(output_dir / name)]
    _write_json_atomic(
        output_dir / PIPELINE_CONFIG,
        {
            "parts": parts,
            "ctx_begin_pos": pipe.config.ctx_begin_pos,
            "mean": list(pipe.config.mean) if pipe.config.mean is not None else None,
            "std": list(pipe.config.std) if pipe.config.std is not None else None,
        },
    )
    return ir_sizes(output_dir)


def generate_with_diffusers(pipe, controlnet_pipe=None, conditioning_image=None, **kwargs):
    """Run the PyTorch pipelines with the OpenVINO pipeline's arguments.

    With a ``conditioning_image`` the ControlNet pipeline runs (diffusers spells that argument
    ``condtioning_image``); the images are converted to RGB the same way.
    """
    kwargs["reference_image"] = to_rgb(kwargs["reference_image"])
    if conditioning_image is None:
        return pipe(**kwargs)
    if controlnet_pipe is None:
        raise ValueError("conditioning_image needs controlnet_pipe (load_pipeline(..., controlnet=True))")
    return controlnet_pipe(**kwargs, condtioning_image=to_rgb(conditioning_image))


def ir_sizes(ir_dir: str | os.PathLike) -> dict[str, int]:
    """Bytes on disk of each model part (and ``total``) of an IR directory."""
    ir_dir = Path(ir_dir)
    sizes = {}
    for name in PART_NAMES:
        if (ir_dir / name).is_dir():
            sizes[name] = sum(f.stat().st_size for f in (ir_dir / name).rglob("*") if f.is_file())
    sizes["total"] = sum(sizes.values())
    return sizes


# --------------------------------------------------------------------------------------------------
# OpenVINO runtime
# --------------------------------------------------------------------------------------------------

_VIRTUAL_DEVICES = ("AUTO", "MULTI", "HETERO", "BATCH")


def _check_device(core: ov.Core, device: str) -> None:
    available = core.available_devices
    if not isinstance(device, str) or not device:
        raise ValueError(f"device must be a non-empty string, one of {available + ['AUTO']}; got {device!r}")
    name = device.split(":")[0].upper()
    if name in _VIRTUAL_DEVICES:
        return
    if device not in available and not any(d.split(".")[0] == device for d in available):
        raise ValueError(f"device {device!r} is not available here; available devices: {available + ['AUTO']}")


_MADV_PAGEOUT = 21  # linux/mman.h, Linux 5.4 and later


def release_mapped_files(directories: Sequence[str | os.PathLike]) -> int:
    """Hand back to the kernel the pages of files under ``directories`` that this process has mapped.

    OpenVINO maps the IR (or the model cache's blob) into memory, and the CPU plugin copies the weights
    into its own layout when it compiles a static-shape model or runs a dynamic-shape one for the first
    time. The mapped pages are not read again, yet they count in the process's resident memory until
    the kernel needs the memory: as much again as the weights. ``MADV_PAGEOUT`` reclaims them now.
    It is only advice: a page touched again is read back from the file, so results cannot change.

    Returns:
        The bytes of mappings advised (0 where this is not Linux or the kernel is older than 5.4).
    """
    if not sys.platform.startswith("linux"):
        return 0
    import ctypes

    roots = tuple(str(Path(d).resolve()) + os.sep for d in directories)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or not fields[5].rstrip("\n").startswith(roots):
                continue
            start, end = (int(address, 16) for address in fields[0].split("-"))
            if libc.madvise(start, end - start, _MADV_PAGEOUT) == 0:
                advised += end - start
    return advised


class OVModelPart:
    """One converted model part: named numpy inputs in, named numpy outputs out.

    With ``static_shapes`` the model is reshaped to the shapes of the inputs it gets and compiled for
    them; the compiled model is reused while the shapes stay the same, so each image size costs one
    compilation (seconds on the CPU; elsewhere the model cache makes it fast).

    Once the compiled model holds its own copy of the weights (after compiling, or after the first
    inference for dynamic shapes), the mapped IR and cache files are released from resident memory
    (see :func:`release_mapped_files`): the pipeline's peak memory is then about one copy of the weights.
    """

    def __init__(self, core: ov.Core, part_dir: Path, device: str, ov_config: dict, static_shapes: bool):
        self.config = json.loads((part_dir / "config.json").read_text())
        self.model_path = part_dir / MODEL_FILE
        model = core.read_model(self.model_path)
        self.input_names = [port.get_any_name() for port in model.inputs]
        self.output_names = [port.get_any_name() for port in model.outputs]
        self._core, self._device, self._ov_config = core, device, ov_config
        self._mapped_dirs = [part_dir] + ([ov_config["CACHE_DIR"]] if ov_config.get("CACHE_DIR") else [])
        self._static_shapes = static_shapes
        self._compiled_shapes = None
        self._request = None
        self._weights_copied = False  # whether the compiled model holds its own copy of the weights
        self.recorded_inputs: list[dict[str, np.ndarray]] | None = None  # a list to collect calibration data

    def compile(self, shapes: dict[str, tuple[int, ...]] | None = None) -> None:
        """Compile for these input shapes (static-shape parts) or for any (``None``); no-op if already done."""
        shapes = shapes if self._static_shapes else None
        if self._request is not None and shapes == self._compiled_shapes:
            return
        self._request = None  # free the previous compilation before making the next
        # Read for each compilation and dropped after: kept, the IR's weights would stay in memory
        # beside the compiled model's own copy.
        model = self._core.read_model(self.model_path)
        if shapes is not None:
            model.reshape({name: ov.PartialShape(list(shape)) for name, shape in shapes.items()})
        compiled = self._core.compile_model(model, self._device, self._ov_config)
        del model
        self._request = compiled.create_infer_request()
        self._compiled_shapes = shapes
        self._weights_copied = shapes is not None  # static shapes: compiling copied the weights
        if self._weights_copied:
            release_mapped_files(self._mapped_dirs)

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        if self.recorded_inputs is not None:
            self.recorded_inputs.append({name: np.array(value) for name, value in inputs.items()})
        self.compile({name: tuple(value.shape) for name, value in inputs.items()})
        self._request.infer(inputs, share_inputs=True)
        if not self._weights_copied:
            self._weights_copied = True
            release_mapped_files(self._mapped_dirs)
        # Copies: the request's output tensors are overwritten by the next call.
        return {name: self._request.get_tensor(name).data.copy() for name in self.output_names}


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """An RGB copy of an image in any PIL mode; 16-bit and float images are scaled to 8 bits first.

    Transparent images are composited on white, as diffusers' image processor does.
    """
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = values.max()
        image = PIL.Image.fromarray((values * (255.0 / peak) if peak > 0 else values).clip(0, 255).astype(np.uint8))
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(background, rgba).convert("RGB")


def _image_list(value, name: str, allow_none: bool = False) -> list[PIL.Image.Image] | None:
    if value is None and allow_none:
        return None
    images = list(value) if isinstance(value, (list, tuple)) else [value]
    if not images or not all(isinstance(image, PIL.Image.Image) for image in images):
        raise ValueError(
            f"{name} must be a PIL.Image.Image or a non-empty list of them; got {type(value).__name__}"
            + ("" if value is not None else " (no image given)")
        )
    return [to_rgb(image) for image in images]


def _text_list(value, name: str, batch_size: int | None) -> list[str]:
    texts = [value] * (batch_size or 1) if isinstance(value, str) else value
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{name} must be a string or a non-empty list of strings; got {value!r}")
    if batch_size is not None and len(texts) != batch_size:
        raise ValueError(f"{name} has {len(texts)} entries but there are {batch_size} prompts; give one per prompt")
    return list(texts)


def _check_image_side(name: str, value) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0 or value % 8:
        raise ValueError(f"{name} must be a positive multiple of 8, got {value!r}")


def _check_guidance_scale(guidance_scale) -> None:
    if not isinstance(guidance_scale, (int, float)) or math.isnan(guidance_scale) or guidance_scale < 0:
        raise ValueError(
            f"guidance_scale must be a number >= 0 (<= 1 disables classifier-free guidance), got {guidance_scale!r}"
        )


class OVBlipDiffusionPipeline:
    """BLIP-Diffusion (zero-shot subject-driven generation, optionally ControlNet-guided) on OpenVINO.

    Construct with :meth:`from_pretrained` from an IR directory written by :func:`convert_pipeline`;
    it needs no PyTorch model and no network. Call it like diffusers' ``BlipDiffusionPipeline``.
    """

    def __init__(self, ir_dir: str | os.PathLike, device: str = "CPU", ov_config: dict | None = None):
        ir_dir = Path(ir_dir)
        self.ir_dir = ir_dir
        self.config = self._read_pipeline_config(ir_dir)
        self.core = ov.Core()
        _check_device(self.core, device)
        self.device = device
        quantized = "quantized_from" in self.config  # written by compress_pipeline
        self.ov_config = {**self.default_ov_config(ir_dir, device, quantized), **(ov_config or {})}
        self.tokenizer = CLIPTokenizer.from_pretrained(ir_dir / "tokenizer")
        self.qformer_tokenizer = BertTokenizer.from_pretrained(ir_dir / "qformer" / "tokenizer")
        self.image_processor = BlipImageProcessor.from_pretrained(ir_dir / "image_processor")
        self.scheduler = PNDMScheduler.from_pretrained(ir_dir / "scheduler")
        parts = self.config["parts"]

        def part(name: str, static: bool) -> OVModelPart | None:
            if name not in parts:
                return None
            return OVModelPart(self.core, ir_dir / name, device, self.ov_config, static_shapes=static)

        # The encoders run once per image with varying text lengths: dynamic shapes. The denoisers and
        # the decoder run with one shape per image size: static shapes, compiled per size.
        self.qformer = part("qformer", static=False)
        self.text_encoder = part("text_encoder", static=False)
        self.unet = part("unet", static=True)
        self.vae_decoder = part("vae_decoder", static=True)
        self.controlnet = part("controlnet", static=True)
        self._negative_embeddings: dict[str, np.ndarray] = {}
        self._progress_bar_config: dict = {}

    @classmethod
    def from_pretrained(
        cls, ir_dir: str | os.PathLike, device: str = "CPU", ov_config: dict | None = None
    ) -> OVBlipDiffusionPipeline:
        """Load an IR directory. ``ov_config`` goes to ``compile_model`` (e.g. ``{"INFERENCE_PRECISION_HINT": "f32"}``)
        and overrides :meth:`default_ov_config` (``{"CACHE_DIR": ...}`` turns the model cache on or off)."""
        return cls(ir_dir, device=device, ov_config=ov_config)

    @staticmethod
    def default_ov_config(ir_dir: str | os.PathLike, device: str, quantized: bool = False) -> dict:
        """The model cache (``IR_DIR/model_cache``) wherever loading from it beats compiling.

        That is every device but the CPU (a GPU compiles these models for minutes) and, on the CPU,
        INT8 pipelines only. Measured on the full-size pipeline (512x512, 2-core AMD EPYC): the CPU
        compiles the FP16 pipeline from the IR in 4 to 4.5 s, faster than from the cache (4.9 to
        6.8 s, up to 10 s in other runs), which also raised the peak memory from 5.0 to 5.5 GiB and
        takes 3.5 GiB of disk. INT8 takes 10.8 s to compile (low-precision transformations) and 6.5
        to 8.3 s from the cache, at a lower peak (3.4 against 3.6 GiB).
        """
        if device.split(":")[0].split(".")[0].upper() == "CPU" and not quantized:
            return {}
        return {"CACHE_DIR": str(Path(ir_dir) / "model_cache")}

    @staticmethod
    def _read_pipeline_config(ir_dir: Path) -> dict:
        if not ir_dir.is_dir():
            raise FileNotFoundError(f"No IR directory at {ir_dir}: run convert_pipeline(pipe, {str(ir_dir)!r}) first")
        config_file = ir_dir / PIPELINE_CONFIG
        if not config_file.is_file():
            raise FileNotFoundError(
                f"The IR directory {ir_dir} is incomplete: {PIPELINE_CONFIG} is missing (conversion interrupted?). "
                "Run convert_pipeline again; it keeps the parts already converted."
            )
        config = json.loads(config_file.read_text())
        missing = [name for name in config.get("parts", []) if not _part_complete(ir_dir / name)]
        missing += [name for name in REQUIRED_PARTS if name not in config.get("parts", [])]
        missing += [name for name in ASSET_NAMES if not (ir_dir / name).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"The IR directory {ir_dir} is incomplete: missing {', '.join(sorted(set(missing)))}. "
                "Run convert_pipeline again."
            )
        return config

    # -- diffusers-style conveniences ------------------------------------------------------------

    @property
    def has_controlnet(self) -> bool:
        return self.controlnet is not None

    @property
    def latent_scale_factor(self) -> int:
        return self.unet.config["latent_scale_factor"]

    def _denoiser_shapes(self, model_batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        scale = self.latent_scale_factor
        latent_h, latent_w = height // scale, width // scale
        text = self.text_encoder.config
        shapes = {
            "sample": (model_batch, self.unet.config["in_channels"], latent_h, latent_w),
            "timestep": (1,),
            "encoder_hidden_states": (model_batch, text["max_position_embeddings"], text["hidden_size"]),
        }
        residual_names = self.unet.input_names[len(shapes) :]
        for name, (channels, down) in zip(residual_names, self.unet.config["controlnet_residuals"], strict=True):
            shapes[name] = (model_batch, channels, math.ceil(latent_h / down), math.ceil(latent_w / down))
        return shapes

    def compile(self, height: int = 512, width: int = 512, batch_size: int = 1, guidance_scale: float = 7.5) -> None:
        """Compile every part for one image size ahead of time (otherwise the first call at a size does it).

        Handy to keep compilation out of timings; on the CPU it takes seconds.
        """
        _check_image_side("height", height)
        _check_image_side("width", width)
        _check_guidance_scale(guidance_scale)
        model_batch = batch_size * (2 if guidance_scale > 1 else 1)
        shapes = self._denoiser_shapes(model_batch, height, width)
        self.qformer.compile()
        self.text_encoder.compile()
        self.unet.compile(shapes)
        if self.controlnet is not None:
            denoiser_inputs = dict(list(shapes.items())[:3])
            self.controlnet.compile({**denoiser_inputs, "controlnet_cond": (model_batch, 3, height, width)})
        sample = shapes["sample"]
        self.vae_decoder.compile({"latent_sample": (batch_size, *sample[1:])})

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options for the tqdm progress bar over the denoising steps (e.g. ``disable=True``)."""
        self._progress_bar_config = kwargs

    def progress_bar(self, iterable):
        return tqdm(iterable, **self._progress_bar_config)

    # -- the steps of a generation ---------------------------------------------------------------

    def check_inputs(
        self,
        prompt,
        reference_image,
        source_subject_category,
        target_subject_category,
        conditioning_image,
        latents,
        guidance_scale,
        height,
        width,
        num_inference_steps,
        generator,
        neg_prompt,
        prompt_strength,
        prompt_reps,
        output_type,
    ):
        """Validate the arguments of :meth:`__call__`; return the prompts, categories and images as lists."""
        prompts = _text_list(prompt, "prompt", None)
        batch_size = len(prompts)
        sources = _text_list(source_subject_category, "source_subject_category", batch_size)
        targets = _text_list(target_subject_category, "target_subject_category", batch_size)
        for name, texts in (("source_subject_category", sources), ("target_subject_category", targets)):
            if any(not text.strip() for text in texts):
                raise ValueError(f"{name} must name the subject (e.g. 'dog'); got an empty category")
        references = _image_list(reference_image, "reference_image")
        if len(references) not in (1, batch_size):
            raise ValueError(f"reference_image: give one image or one per prompt ({batch_size}), got {len(references)}")
        conditions = _image_list(conditioning_image, "conditioning_image", allow_none=True)
        if conditions is not None:
            if not self.has_controlnet:
                raise ValueError(
                    f"conditioning_image was given, but the IR directory {self.ir_dir} has no ControlNet; convert one "
                    "with convert_pipeline(pipe, ir_dir, controlnet_pipe=...)"
                )
            if len(conditions) not in (1, batch_size):
                raise ValueError(
                    f"conditioning_image: give one image or one per prompt ({batch_size}), got {len(conditions)}"
                )
        _check_image_side("height", height)
        _check_image_side("width", width)
        if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        _check_guidance_scale(guidance_scale)
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        if not isinstance(neg_prompt, str):
            raise ValueError(f"neg_prompt must be a string, got {type(neg_prompt).__name__}")
        if not isinstance(prompt_reps, int) or prompt_reps < 1:
            raise ValueError(f"prompt_reps must be an integer >= 1, got {prompt_reps!r}")
        if not isinstance(prompt_strength, (int, float)) or not prompt_strength * prompt_reps >= 1:
            raise ValueError(
                f"prompt_strength * prompt_reps must be >= 1 (the prompt is repeated that many times); "
                f"got {prompt_strength!r} * {prompt_reps}"
            )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"generator: a list must hold one generator per prompt ({batch_size}), got {len(generator)}")
        if latents is not None:
            scale = self.latent_scale_factor
            expected = (batch_size, self.unet.config["in_channels"], height // scale, width // scale)
            if tuple(latents.shape) != expected:
                raise ValueError(f"latents must have shape {expected} for this batch and size, got {tuple(latents.shape)}")
        return prompts, sources, targets, references, conditions

    def encode_subject(self, reference_images: list[PIL.Image.Image], source_categories: list[str]) -> np.ndarray:
        """Q-Former: the subject's multimodal embedding, [batch, num_query_tokens, hidden]."""
        pixel_values = self.image_processor.preprocess(
            reference_images, image_mean=self.config["mean"], image_std=self.config["std"], return_tensors="np"
        )["pixel_values"]
        tokens = self.qformer_tokenizer(source_categories, return_tensors="np", padding=True)
        return self.qformer(
            pixel_values=pixel_values.astype(np.float32),
            input_ids=tokens.input_ids.astype(np.int64),
            attention_mask=tokens.attention_mask.astype(np.int64),
        )["query_embeds"]

    @staticmethod
    def build_prompt(prompts: list[str], targets: list[str], prompt_strength: float, prompt_reps: int) -> list[str]:
        """diffusers' prompt amplification: 'a {target} {prompt}' repeated strength * reps times."""
        return [", ".join([f"a {target} {prompt.strip()}"] * int(prompt_strength * prompt_reps)) for prompt, target in zip(prompts, targets)]

    def encode_prompt(self, query_embeds: np.ndarray, prompts: list[str]) -> np.ndarray:
        """Text encoder with the subject embedding inserted at ``ctx_begin_pos``."""
        max_len = self.text_encoder.config["max_position_embeddings"] - query_embeds.shape[1]
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=max_len, return_tensors="np")
        return self.text_encoder(input_ids=tokens.input_ids.astype(np.int64), ctx_embeddings=query_embeds)["last_hidden_state"]

    def encode_negative_prompt(self, neg_prompt: str) -> np.ndarray:
        """The unconditional embedding [1, max_len, hidden]: the same IR with an empty context, cached per text."""
        if neg_prompt not in self._negative_embeddings:
            config = self.text_encoder.config
            # Truncated like the prompt (diffusers fails on a negative prompt longer than the text encoder's window).
            tokens = self.tokenizer(
                [neg_prompt],
                padding="max_length",
                truncation=True,
                max_length=config["max_position_embeddings"],
                return_tensors="np",
            )
            empty_context = np.zeros((1, 0, config["hidden_size"]), dtype=np.float32)
            self._negative_embeddings[neg_prompt] = self.text_encoder(
                input_ids=tokens.input_ids.astype(np.int64), ctx_embeddings=empty_context
            )["last_hidden_state"]
        return self._negative_embeddings[neg_prompt]

    def prepare_control_image(self, images: list[PIL.Image.Image], height: int, width: int, batch_size: int, cfg: bool) -> np.ndarray:
        control = self.image_processor.preprocess(
            images,
            size={"width": width, "height": height},
            do_rescale=True,
            do_center_crop=False,
            do_normalize=False,
            return_tensors="np",
        )["pixel_values"].astype(np.float32)
        if control.shape[0] == 1:
            control = np.repeat(control, batch_size, axis=0)
        return np.concatenate([control] * 2) if cfg else control

    def decode_latents(self, latents: torch.Tensor, output_type: str):
        scaling_factor = self.vae_decoder.config["scaling_factor"]
        sample = self.vae_decoder(latent_sample=(latents / scaling_factor).numpy())["sample"]
        return self.image_processor.postprocess(torch.from_numpy(sample), output_type=output_type)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        reference_image: PIL.Image.Image | list[PIL.Image.Image],
        source_subject_category: str | list[str],
        target_subject_category: str | list[str],
        conditioning_image: PIL.Image.Image | list[PIL.Image.Image] | None = None,
        latents: torch.Tensor | None = None,
        guidance_scale: float = 7.5,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        neg_prompt: str = "",
        prompt_strength: float = 1.0,
        prompt_reps: int = 20,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Generate images of the reference subject, re-contextualised by the prompt.

        Args:
            prompt: what to generate, e.g. ``"swimming underwater"`` (a list for a batch).
            reference_image: the subject (one image, or one per prompt); any PIL mode.
            source_subject_category: what the reference shows, e.g. ``"dog"`` (a string for all prompts, or one per prompt).
            target_subject_category: what to render the subject as (usually the same).
            conditioning_image: a control map (Canny edges or a scribble, white on black) when the IR
                directory has a ControlNet; generation then follows its structure.
            latents: initial noise, shape ``(batch, 4, height // 8, width // 8)``; drawn from ``generator`` if not given.
            guidance_scale: classifier-free guidance weight; ``<= 1`` disables guidance (half the UNet work).
            height, width: output size in pixels, positive multiples of 8.
            num_inference_steps: denoising steps.
            generator: a ``torch.Generator`` (or one per prompt) for reproducible noise: the same
                generator gives the same image as diffusers.
            neg_prompt: what to steer away from (used with guidance).
            prompt_strength, prompt_reps: the prompt is repeated ``int(prompt_strength * prompt_reps)`` times.
            output_type: ``"pil"`` or ``"np"`` (float32 in [0, 1], shape ``(batch, height, width, 3)``).
            return_dict: return an ``ImagePipelineOutput``; otherwise a tuple ``(images,)``.
        """
        prompts, sources, targets, references, conditions = self.check_inputs(
            prompt,
            reference_image,
            source_subject_category,
            target_subject_category,
            conditioning_image,
            latents,
            guidance_scale,
            height,
            width,
            num_inference_steps,
            generator,
            neg_prompt,
            prompt_strength,
            prompt_reps,
            output_type,
        )
        batch_size = len(prompts)
        query_embeds = self.encode_subject(references, sources)
        text_embeddings = self.encode_prompt(query_embeds, self.build_prompt(prompts, targets, prompt_strength, prompt_reps))
        cfg = guidance_scale > 1.0
        if cfg:
            negative = np.repeat(self.encode_negative_prompt(neg_prompt), batch_size, axis=0)
            text_embeddings = np.concatenate([negative, text_embeddings])

        model_batch = batch_size * (2 if cfg else 1)
        denoiser_shapes = self._denoiser_shapes(model_batch, height, width)
        shape = (batch_size, *denoiser_shapes["sample"][1:])
        if latents is None:
            latents = randn_tensor(shape, generator=generator, dtype=torch.float32)
        scheduler = PNDMScheduler.from_config(self.scheduler.config)  # fresh state: calls may overlap
        latents = latents.to(torch.float32) * scheduler.init_noise_sigma
        scheduler.set_timesteps(num_inference_steps)

        if conditions is not None:
            control = self.prepare_control_image(conditions, height, width, batch_size, cfg)
        else:
            # Plain generation: the shared UNet IR gets zero ControlNet residuals.
            residuals = {
                name: np.zeros(shape, np.float32) for name, shape in list(denoiser_shapes.items())[3:]
            }
        for t in self.progress_bar(scheduler.timesteps):
            latent_input = torch.cat([latents] * 2) if cfg else latents
            inputs = {
                "sample": latent_input.numpy(),
                "timestep": np.array([int(t)], dtype=np.int64),
                "encoder_hidden_states": text_embeddings,
            }
            if conditions is not None:
                residuals = self.controlnet(**inputs, controlnet_cond=control)
            noise_pred = torch.from_numpy(self.unet(**inputs, **residuals)["noise_pred"])
            if cfg:
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
            latents = scheduler.step(noise_pred, t, latents)["prev_sample"]

        images = self.decode_latents(latents, output_type)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


# --------------------------------------------------------------------------------------------------
# Control maps, example images and comparisons for the notebook
# --------------------------------------------------------------------------------------------------


def canny_map(image: PIL.Image.Image, low_threshold: int = 30, high_threshold: int = 70) -> PIL.Image.Image:
    """Canny edges, white on black, as the Canny ControlNet was trained on (thresholds as in diffusers' example)."""
    import cv2

    edges = cv2.Canny(np.asarray(to_rgb(image)), low_threshold, high_threshold)
    return PIL.Image.fromarray(edges).convert("RGB")


def scribble_map(image: PIL.Image.Image, thickness: int = 0, detail: float = 0.004) -> PIL.Image.Image:
    """A scribble-like control map from a photo or silhouette, computed offline with OpenCV.

    The outlines of the main shapes are simplified into polylines (``detail`` is the tolerance, as a
    fraction of the image diagonal) and drawn thick, like a hand-drawn scribble: white on black.
    ``thickness`` 0 picks about 1% of the image's shorter side.
    """
    import cv2

    gray = cv2.cvtColor(np.asarray(to_rgb(image)), cv2.COLOR_RGB2GRAY)
    height, width = gray.shape
    blurred = cv2.GaussianBlur(gray, (0, 0), sigmaX=max(1.0, min(height, width) / 200))
    edges = cv2.Canny(blurred, 50, 150)
    edges = cv2.dilate(edges, np.ones((3, 3), np.uint8))  # close small gaps before tracing outlines
    contours, _ = cv2.findContours(edges, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    min_length = 0.05 * (height + width)
    tolerance = detail * math.hypot(height, width)
    strokes = [cv2.approxPolyDP(c, tolerance, True) for c in contours if cv2.arcLength(c, True) >= min_length]
    canvas = np.zeros_like(gray)
    cv2.polylines(canvas, strokes, isClosed=True, color=255, thickness=thickness or max(2, min(height, width) // 100))
    return PIL.Image.fromarray(canvas).convert("RGB")


def example_images() -> dict[str, PIL.Image.Image]:
    """Pictures that ship inside scikit-image, so the tutorial runs offline.

    ``cat`` (Chelsea), ``coffee`` (a cup of coffee), ``horse`` (a white silhouette), ``astronaut`` and
    ``rocket``: public-domain or CC0 images, see scikit-image's ``skimage/data/README.txt``.
    """
    from skimage import data

    return {
        "cat": PIL.Image.fromarray(data.chelsea()),
        "coffee": PIL.Image.fromarray(data.coffee()),
        "horse": PIL.Image.fromarray(~data.horse()).convert("RGB"),  # a white horse on black
        "astronaut": PIL.Image.fromarray(data.astronaut()),
        "rocket": PIL.Image.fromarray(data.rocket()),
    }


def _as_array(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64) / (255.0 if isinstance(image, PIL.Image.Image) else 1.0)


def image_difference(reference, other) -> dict[str, float]:
    """Max and mean absolute difference (on a 0-1 scale) and PSNR in dB of two images (PIL, or arrays in [0, 1])."""
    a, b = _as_array(reference), _as_array(other)
    if a.shape != b.shape:
        raise ValueError(f"the images differ in shape: {a.shape} and {b.shape}")
    diff = np.abs(a - b)
    mse = float(np.mean(diff**2))
    psnr = math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "psnr_db": psnr}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table; floats are shown with 3 significant digits."""

    def cell(value) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def time_unet_step(pipe: OVBlipDiffusionPipeline, height: int = 512, width: int = 512, guidance_scale: float = 7.5, repeats: int = 3) -> float:
    """Seconds per UNet call at this size (the fastest of ``repeats``), on random inputs of the right shapes."""
    model_batch = 2 if guidance_scale > 1 else 1
    shapes = pipe._denoiser_shapes(model_batch, height, width)
    rng = np.random.default_rng(0)
    inputs = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}
    inputs["timestep"] = np.array([500], dtype=np.int64)
    pipe.unet(**inputs)  # compiles for these shapes if needed
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        pipe.unet(**inputs)
        timings.append(time.perf_counter() - start)
    return min(timings)


def show_images(images: Sequence, titles: Sequence[str] = (), columns: int | None = None, size: float = 4.0):
    """Show images side by side with matplotlib; returns the figure."""
    import matplotlib.pyplot as plt

    columns = columns or len(images)
    rows = math.ceil(len(images) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, title in zip(axes.flat, images, [*titles] + [""] * len(images)):
        axis.imshow(image)
        axis.set_title(title)
    figure.tight_layout()
    return figure


# --------------------------------------------------------------------------------------------------
# NNCF compression
# --------------------------------------------------------------------------------------------------

# The INT8 scheme of each part. The UNet and the ControlNet do most of the work: their activations are
# quantized too (see ``_quantize_denoiser`` for the measurements behind the choice). The encoders and
# the VAE decoder run once per image: 8-bit weights halve their size at no measurable speed cost.
WEIGHT_ONLY_PARTS = ("qformer", "text_encoder", "vae_decoder")
ACTIVATION_PARTS = ("unet", "controlnet")
WEIGHT_ONLY_SCHEME = "int8-weights"
ACTIVATION_SCHEME = "int8-w8a8-smoothquant"


def default_calibration() -> list[dict]:
    """Generations whose UNet and ControlNet inputs calibrate the INT8 model: offline example images,
    plain and controlled (Canny and scribble), so both kinds of UNet input are represented."""
    images = example_images()
    return [
        {"prompt": "swimming underwater", "reference_image": images["cat"], "source_subject_category": "cat", "target_subject_category": "cat"},
        {"prompt": "on a wooden table, studio light", "reference_image": images["coffee"], "source_subject_category": "coffee", "target_subject_category": "coffee"},
        {"prompt": "on a marble table", "reference_image": images["cat"], "source_subject_category": "cat", "target_subject_category": "cup", "conditioning_image": canny_map(images["coffee"])},
        {"prompt": "in a meadow", "reference_image": images["astronaut"], "source_subject_category": "astronaut", "target_subject_category": "horse", "conditioning_image": scribble_map(images["horse"])},
    ]


def collect_calibration_data(
    ir_dir: str | os.PathLike,
    calibration: Sequence[dict] | None = None,
    subset_size: int = 64,
    height: int = 512,
    width: int = 512,
    device: str = "CPU",
    seed: int = 0,
) -> dict[str, list[dict[str, np.ndarray]]]:
    """Record the UNet's and ControlNet's inputs while the FP pipeline generates the ``calibration`` images.

    Each generation runs enough steps for ``subset_size`` UNet inputs in all; the recorded inputs span
    the whole denoising trajectory, from pure noise to an almost clean image.
    """
    pipe = OVBlipDiffusionPipeline.from_pretrained(ir_dir, device=device)
    pipe.set_progress_bar_config(desc="Collecting calibration data", leave=False)
    generations = list(calibration if calibration is not None else default_calibration())
    if not pipe.has_controlnet:
        generations = [kwargs for kwargs in generations if kwargs.get("conditioning_image") is None]
    if not generations:
        raise ValueError("calibration must hold at least one generation (a dict of pipeline arguments)")
    # PNDM (without PRK steps) runs one UNet call more than num_inference_steps.
    steps = max(1, math.ceil(subset_size / len(generations)) - 1)
    recorded = {"unet": [], "controlnet": []}
    pipe.unet.recorded_inputs = recorded["unet"]
    if pipe.has_controlnet:
        pipe.controlnet.recorded_inputs = recorded["controlnet"]
    for i, kwargs in enumerate(tqdm(generations, desc="Calibration images")):
        if not isinstance(kwargs, dict):
            raise ValueError(f"calibration entries must be dicts of pipeline arguments, got {type(kwargs).__name__}")
        pipe(**{"height": height, "width": width, "num_inference_steps": steps, **kwargs}, generator=torch.Generator().manual_seed(seed + i))
    return recorded


def _quantize_denoiser(model: ov.Model, samples: list[dict[str, np.ndarray]]) -> ov.Model:
    """W8A8 post-training quantization of the UNet or ControlNet, with SmoothQuant for the MatMuls.

    Chosen by measurement on the full-size UNet (512x512, guidance, bf16 default precision, 2-core AMD
    EPYC, calibrated on inputs captured from the pipeline), side by side on a quiet machine: this scheme
    1.62x faster than the FP16 IR, optimum-intel's hybrid scheme (W8A8 convolutions, weight-only
    MatMuls) 1.45x, with the same noise-prediction error (relative L2 0.048 and 0.049 on held-out
    captured inputs). Weight-only INT8 alone was slower than FP when measured for the project's issue.
    """
    import nncf

    return nncf.quantize(
        model,
        nncf.Dataset(samples),
        model_type=nncf.ModelType.TRANSFORMER,  # keeps attention's softmax path in FP, adds SmoothQuant
        subset_size=len(samples),
    )


def _compress_part(source_dir: Path, target_dir: Path, scheme: str, compress) -> None:
    """Compress one IR part into ``target_dir`` atomically, keeping its config and assets."""
    config = json.loads((source_dir / "config.json").read_text())
    compressed = compress(ov.Core().read_model(source_dir / MODEL_FILE))
    with _atomic_dir(target_dir) as tmp:
        for item in source_dir.iterdir():  # assets such as the Q-Former's tokenizer
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
        ov.save_model(compressed, tmp / MODEL_FILE, compress_to_fp16=True)
        (tmp / "config.json").write_text(json.dumps({**config, "quantization": scheme}, indent=2))
    del compressed
    gc.collect()


def compress_pipeline(
    ir_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    calibration: Sequence[dict] | None = None,
    subset_size: int = 64,
    calibration_size: int = 512,
    device: str = "CPU",
    overwrite: bool = False,
) -> dict[str, int]:
    """Write an INT8 copy of an IR directory that ``OVBlipDiffusionPipeline.from_pretrained`` loads like the FP one.

    Args:
        ir_dir: an IR directory from :func:`convert_pipeline`.
        output_dir: where the INT8 IR directory goes (not ``ir_dir`` itself).
        calibration: generations (dicts of pipeline arguments) whose UNet and ControlNet inputs
            calibrate the activation quantization; :func:`default_calibration` if not given.
        subset_size: number of recorded UNet inputs (and ControlNet inputs) used for calibration.
        calibration_size: height and width of the calibration generations.
        device: where the FP pipeline runs while collecting calibration data.
        overwrite: compress again parts that are already there.

    The UNet and ControlNet get INT8 weights and activations; the Q-Former, text encoder and VAE
    decoder INT8 weights. Parts are written atomically and skipped when already compressed from the
    same source, as in :func:`convert_pipeline`.

    Returns:
        The size on disk of each part, in bytes.
    """
    import nncf

    ir_dir, output_dir = Path(ir_dir), Path(output_dir)
    config = OVBlipDiffusionPipeline._read_pipeline_config(ir_dir)  # a clear error if missing or incomplete
    if output_dir.resolve() == ir_dir.resolve():
        raise ValueError("output_dir must differ from ir_dir: the INT8 pipeline is written beside the FP one")
    if not isinstance(subset_size, int) or subset_size < 1:
        raise ValueError(f"subset_size must be an integer >= 1, got {subset_size!r}")
    _check_image_side("calibration_size", calibration_size)
    if calibration is not None and (isinstance(calibration, dict) or not all(isinstance(c, dict) for c in calibration)):
        raise ValueError("calibration must be a list of dicts of pipeline arguments (prompt, reference_image, ...)")
    output_dir.mkdir(parents=True, exist_ok=True)
    if overwrite and (output_dir / PIPELINE_CONFIG).exists():
        (output_dir / PIPELINE_CONFIG).unlink()

    def pending(name: str, scheme: str) -> bool:
        source = json.loads((ir_dir / name / "config.json").read_text())["source"]
        return overwrite or not _part_complete(output_dir / name, source=source, quantization=scheme)

    parts = config["parts"]
    for name in tqdm([p for p in WEIGHT_ONLY_PARTS if pending(p, WEIGHT_ONLY_SCHEME)], desc="INT8 weights"):
        _compress_part(ir_dir / name, output_dir / name, WEIGHT_ONLY_SCHEME, lambda m: nncf.compress_weights(m, mode=nncf.CompressWeightsMode.INT8_ASYM))
    denoisers = [name for name in ACTIVATION_PARTS if name in parts and pending(name, ACTIVATION_SCHEME)]
    if denoisers:
        samples = collect_calibration_data(ir_dir, calibration, subset_size, calibration_size, calibration_size, device)
        for name in tqdm(denoisers, desc="INT8 weights and activations"):
            if not samples[name]:
                raise ValueError(f"no calibration data reached the {name}: give at least one generation that uses it")
            _compress_part(ir_dir / name, output_dir / name, ACTIVATION_SCHEME, lambda m, s=samples[name][:subset_size]: _quantize_denoiser(m, s))
        del samples
    for name in ASSET_NAMES:
        with _atomic_dir(output_dir / name) as tmp:
            shutil.copytree(ir_dir / name, tmp, dirs_exist_ok=True)
    _write_json_atomic(output_dir / PIPELINE_CONFIG, {**config, "parts": parts, "quantized_from": str(ir_dir)})
    return ir_sizes(output_dir)


# --------------------------------------------------------------------------------------------------
# Gradio demo
# --------------------------------------------------------------------------------------------------

__all__ += ["make_demo", "launch_demo", "sketch_to_scribble"]  # this section's public names

DEMO_SIZE_RANGE = (64, 1024)  # output height and width the demo accepts, in pixels (multiples of 8)
DEMO_MAX_STEPS = 100
DEMO_MAX_SEED = 2**32 - 1
DEMO_DEFAULT_STEPS = 25  # as in diffusers' BLIP-Diffusion examples: half the time of the pipeline's default 50
DEMO_CONCURRENCY_ID = "blip_diffusion_pipeline"  # one queue slot for all tabs: the pipeline runs one call at a time

# The demo's labels for the pipeline's arguments, so that its ValueErrors name what the user sees.
_DEMO_LABELS = {
    "reference_image": "Reference image",
    "conditioning_image": "Control image",
    "source_subject_category": "Source category",
    "target_subject_category": "Target category",
    "guidance_scale": "Guidance scale",
    "num_inference_steps": "Steps",
    "neg_prompt": "Negative prompt",
    "prompt": "Prompt",
    "height": "Height",
    "width": "Width",
}

# tab id: (tab title, explanation, label of the control input, label of the control map shown)
_DEMO_TABS = {
    "zero_shot": (
        "Zero-shot",
        "Draws the subject of the reference image in the scene the prompt describes. The source category "
        "says what the reference image shows, the target category what to draw (usually the same).",
        None,
        None,
    ),
    "canny": (
        "Canny edges",
        "The result takes its shape from the edges of a second photo and its look from the subject of the "
        "reference image.",
        "Edge source: a photo whose edges shape the result",
        "Edge map used",
    ),
    "scribble": (
        "Scribble",
        "The result follows a scribble: draw one on the canvas (pick the brush), or upload a photo or "
        "silhouette and its outlines become the scribble. Strokes drawn over an upload replace its outlines.",
        "Scribble: draw, or upload a photo or silhouette",
        "Scribble used",
    ),
}


def sketch_to_scribble(sketch: dict | None) -> PIL.Image.Image | None:
    """The scribble control map (white strokes on black) from a ``gr.ImageEditor``/``gr.Sketchpad`` value.

    Gradio 6 gives ``{"background", "layers", "composite"}`` (PIL images with ``type="pil"``): the strokes
    are on the transparent ``layers`` whatever the brush colour, ``background`` is the white canvas or an
    uploaded picture, ``composite`` flattens both (black strokes on white). Strokes are the scribble; with
    none, an uploaded photo or silhouette becomes one through :func:`scribble_map`. ``None`` when there is
    neither (nothing drawn, nothing uploaded).
    """
    if not sketch:
        return None
    layers = [layer.convert("RGBA") for layer in sketch.get("layers") or []]
    if layers:
        size = layers[0].size
        # Anything painted, in any colour, has some opacity; the canvas shows through everywhere else.
        strokes = np.any([np.asarray(layer.resize(size))[..., 3] > 0 for layer in layers], axis=0)
        if strokes.any():
            return PIL.Image.fromarray(np.where(strokes, 255, 0).astype(np.uint8)).convert("RGB")
    picture = sketch.get("background")
    if picture is None:
        picture = sketch.get("composite")
    if picture is None or np.ptp(np.asarray(to_rgb(picture))) == 0:
        return None  # no upload, only the blank canvas
    return scribble_map(picture)


def _demo_error(message: str):
    """A gr.Error for a user mistake: the pipeline's argument names replaced by the demo's labels."""
    import re

    import gradio as gr

    names = re.compile(r"\b(" + "|".join(_DEMO_LABELS) + r")\b")
    message = names.sub(lambda match: _DEMO_LABELS[match.group()], message)
    # A user mistake, not a bug: no traceback in the server's log.
    return gr.Error(message[:1].upper() + message[1:], print_exception=False)


def _whole_number(value, label: str, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise _demo_error(f"{label} must be a whole number from {minimum} to {maximum}, got {value!r}")
    if not minimum <= value <= maximum:
        raise _demo_error(f"{label} must be from {minimum} to {maximum}, got {int(value)}")
    return int(value)


def _read_upload(component, payload, label: str):
    """Gradio's preprocessing of an image input, with an unreadable file reported as a gr.Error.

    The demo's events run with ``preprocess=False`` and call this: when Gradio preprocesses, a broken
    upload fails before the event's function and the user sees only "Error".
    """
    import gradio as gr

    if payload is None:
        return None
    try:
        value = component.preprocess(component.data_model.model_validate(payload))
        if isinstance(value, PIL.Image.Image):
            images = [value]
        else:  # an ImageEditor's value
            images = [value["background"], value["composite"], *value["layers"]]
        for image in images:
            if image is not None:
                image.load()  # PIL reads lazily: a truncated file fails here, not in the pipeline
    except gr.Error:
        raise
    except Exception as err:
        raise _demo_error(
            f"{label}: the uploaded file could not be read as an image ({type(err).__name__}); "
            "upload a PNG, JPEG or WebP picture"
        ) from err
    return value


def _example_files(names=("cat", "coffee", "horse")) -> dict[str, str]:
    """The example images the demo uses, as files: Gradio examples take paths (written once per demo, offline)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="blip-diffusion-examples-"))
    paths = {}
    for name, image in example_images().items():
        if name in names:
            paths[name] = str(folder / f"{name}.png")
            image.save(paths[name])
    return paths


def _demo_examples(tab: str, files: dict[str, str]) -> tuple[list[list], list[str]]:
    """Rows of (reference image[, control image], prompt, source category, target category), and their labels."""
    if tab == "zero_shot":
        return [
            [files["cat"], "swimming underwater", "cat", "cat"],
            [files["coffee"], "on a beach at sunset", "cup", "cup"],
        ], ["Chelsea the cat, swimming underwater", "The coffee cup on a beach"]
    if tab == "canny":
        return [[files["cat"], files["coffee"], "on a marble table", "cat", "cup"]], [
            "A cup in the cat's look, shaped like the coffee cup"
        ]
    return [[files["coffee"], files["horse"], "in a meadow", "coffee", "horse"]], [
        "A horse in the coffee's colours, following the silhouette's outline"
    ]


def _demo_tab(gr, pipe: OVBlipDiffusionPipeline, tab: str, example_files: dict[str, str]) -> None:
    """One tab of the demo: its inputs, outputs, examples and the event that generates (API name: the tab id)."""
    import random

    tab_title, explanation, control_label, control_map_label = _DEMO_TABS[tab]
    image_input = {"type": "pil", "sources": ("upload", "clipboard")}
    with gr.Tab(tab_title, id=tab):
        gr.Markdown(explanation)
        if control_label and not pipe.has_controlnet:
            gr.Markdown(
                "**This tab needs a ControlNet, and this IR directory has none**: convert one with "
                "`convert_pipeline(pipe, ir_dir, controlnet_pipe=load_pipeline(..., controlnet=True))`."
            )
        with gr.Row():
            with gr.Column():
                # image_mode=None keeps transparency: the pipeline composites it on white.
                reference = gr.Image(
                    label="Reference image: the subject", image_mode=None, elem_id=f"{tab}_reference", **image_input
                )
                if tab == "canny":
                    control = gr.Image(label=control_label, image_mode=None, elem_id=f"{tab}_control", **image_input)
                elif tab == "scribble":
                    control = gr.ImageEditor(
                        label=control_label,
                        brush=gr.Brush(colors=["#000000"], color_mode="fixed"),
                        layers=False,
                        canvas_size=(512, 512),
                        elem_id=f"{tab}_control",
                        **image_input,
                    )
                else:
                    control = gr.State(None)  # no control image (a State is not part of the API)
                prompt = gr.Textbox(label="Prompt", placeholder="swimming underwater", elem_id=f"{tab}_prompt")
                with gr.Row():
                    source = gr.Textbox(
                        label="Source category", placeholder="cat", info="what the reference shows", elem_id=f"{tab}_source"
                    )
                    target = gr.Textbox(
                        label="Target category", placeholder="cat", info="what to draw", elem_id=f"{tab}_target"
                    )
                button = gr.Button("Generate", variant="primary", elem_id=f"{tab}_generate")
                with gr.Accordion("Settings", open=False, elem_id=f"{tab}_settings"):
                    guidance = gr.Slider(
                        0,
                        20,
                        value=7.5,
                        step=0.5,
                        label="Guidance scale",
                        info="how closely to follow the prompt; 1 or less turns guidance off (twice as fast)",
                        elem_id=f"{tab}_guidance",
                    )
                    steps = gr.Slider(
                        1,
                        DEMO_MAX_STEPS,
                        value=DEMO_DEFAULT_STEPS,
                        step=1,
                        label="Steps",
                        info="denoising steps: more is slower and finer",
                        elem_id=f"{tab}_steps",
                    )
                    with gr.Row():
                        seed = gr.Number(
                            88888,
                            label="Seed",
                            info="shows the seed of the last image when 'Random seed' is ticked",
                            precision=0,
                            minimum=0,
                            maximum=DEMO_MAX_SEED,
                            elem_id=f"{tab}_seed",
                        )
                        random_seed = gr.Checkbox(True, label="Random seed", elem_id=f"{tab}_random_seed")
                    negative = gr.Textbox(
                        DEFAULT_NEGATIVE_PROMPT, label="Negative prompt", lines=2, elem_id=f"{tab}_negative"
                    )
                    with gr.Row():
                        height = gr.Slider(*DEMO_SIZE_RANGE, value=512, step=8, label="Height", elem_id=f"{tab}_height")
                        width = gr.Slider(*DEMO_SIZE_RANGE, value=512, step=8, label="Width", elem_id=f"{tab}_width")
            with gr.Column():
                outputs = [gr.Image(label="Generated image", format="png", interactive=False, elem_id=f"{tab}_result")]
                if control_map_label:  # PNG: the map stays exactly white on black
                    outputs.append(
                        gr.Image(label=control_map_label, format="png", interactive=False, elem_id=f"{tab}_control_map")
                    )
                outputs.append(seed)  # reports the seed used
        examples, labels = _demo_examples(tab, example_files)
        example_inputs = [reference, control, prompt, source, target] if control_map_label else [reference, prompt, source, target]
        gr.Examples(examples, example_inputs, example_labels=labels, cache_examples=False)

    # The parameter names are the API's: client.predict(reference_image=..., prompt=..., api_name="/zero_shot").
    def generate(
        reference_image,
        control_image,
        prompt,
        source_category,
        target_category,
        guidance_scale,
        steps,
        seed,
        random_seed,
        negative_prompt,
        height,
        width,
        progress=gr.Progress(track_tqdm=True),  # follows the pipeline's tqdm bar over the denoising steps
    ):
        subject = _read_upload(reference, reference_image, "Reference image")
        if subject is None:
            raise _demo_error("Reference image: upload a picture of the subject")
        height = _whole_number(height, "Height", *DEMO_SIZE_RANGE)
        width = _whole_number(width, "Width", *DEMO_SIZE_RANGE)
        steps = _whole_number(steps, "Steps", 1, DEMO_MAX_STEPS)
        seed = random.randint(0, DEMO_MAX_SEED) if random_seed else _whole_number(seed, "Seed", 0, DEMO_MAX_SEED)
        control_map = None
        if tab == "canny":
            photo = _read_upload(control, control_image, "Edge source")
            if photo is None:
                raise _demo_error("Edge source: upload a photo whose edges should shape the result")
            # Edges found at the output size are exactly what the ControlNet sees (a resized edge map blurs).
            control_map = canny_map(to_rgb(photo).resize((width, height), PIL.Image.LANCZOS))
        elif tab == "scribble":
            control_map = sketch_to_scribble(_read_upload(control, control_image, "Scribble"))
            if control_map is None:
                raise _demo_error("Scribble: draw one on the canvas, or upload a photo or silhouette")
            control_map = control_map.resize((width, height), PIL.Image.LANCZOS)
        try:
            image = pipe(
                prompt,
                subject,
                source_category,
                target_category,
                conditioning_image=control_map,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                num_inference_steps=steps,
                neg_prompt=negative_prompt,
                generator=torch.Generator().manual_seed(seed),
            ).images[0]
        except ValueError as err:  # the pipeline's checks of its inputs
            raise _demo_error(str(err)) from err
        return (image, seed) if control_map is None else (image, control_map, seed)

    gr.on(
        [button.click, prompt.submit],
        generate,
        inputs=[reference, control, prompt, source, target, guidance, steps, seed, random_seed, negative, height, width],
        outputs=outputs,
        api_name=tab,
        preprocess=False,  # images go through _read_upload, which reports a broken upload
        concurrency_limit=1,
        concurrency_id=DEMO_CONCURRENCY_ID,
    )


def make_demo(pipe: OVBlipDiffusionPipeline, title: str = "BLIP-Diffusion on OpenVINO"):
    """A Gradio app around ``pipe`` with a tab per task: zero-shot, Canny-edge and scribble controlled generation.

    Each tab takes a prompt, a reference image of the subject, its source and target categories, and
    the generation settings (guidance scale, steps, seed or a random one, negative prompt, output size);
    it shows the image, the seed used and, for the controlled tabs, the control map used. Requests wait
    in a queue and run one at a time (the pipeline is not thread-safe), with a progress bar over the
    denoising steps. Clients can call the API endpoints ``/zero_shot``, ``/canny`` and ``/scribble``.

    Returns a ``gr.Blocks`` with the queue enabled: start it with :func:`launch_demo`.
    """
    import gradio as gr

    example_files = _example_files()
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {title}\n"
            "Show it a subject (your dog, a kettle, a cat) and describe a scene: it draws *that* subject there. "
            f"Running on OpenVINO ({pipe.device})."
        )
        for tab in _DEMO_TABS:
            _demo_tab(gr, pipe, tab, example_files)
    return demo.queue(max_size=32)


def launch_demo(
    demo,
    server_name: str = "127.0.0.1",
    server_port: int | None = None,
    share: bool = False,
    prevent_thread_lock: bool | None = None,
    **launch_kwargs,
):
    """Start a demo from :func:`make_demo` and return ``(app, local_url, share_url)``.

    Defaults keep it private: it listens on this machine only (``server_name="0.0.0.0"`` opens it to
    the network) and makes no public share link (``share=True`` asks for one, through gradio.live). In
    Jupyter it is shown inline and the cell returns at once, the server running until the kernel stops
    or ``demo.close()``; in a script it blocks until interrupted. Other arguments go to
    ``gr.Blocks.launch`` (``server_port`` defaults to the first free port from 7860).
    """
    from gradio.utils import ipython_check

    if prevent_thread_lock is None:
        prevent_thread_lock = ipython_check()  # blocking only where nothing else would keep the process alive
    return demo.launch(
        server_name=server_name,
        server_port=server_port,
        share=share,
        prevent_thread_lock=prevent_thread_lock,
        **launch_kwargs,
    )


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
#
#   python blip_helper.py convert --model Salesforce/blipdiffusion \
#       --controlnet-model Salesforce/blipdiffusion-controlnet --output ir/blipdiffusion
#   python blip_helper.py generate --models ir/blipdiffusion --reference dog.jpg --source-category dog \
#       --target-category dog --prompt "swimming underwater" --output dog.png
#   python blip_helper.py benchmark            # PyTorch FP32 / bf16 vs OpenVINO (/ INT8), see the README
#
# Errors end as one line on stderr: exit status 2 for bad arguments, 1 when the command fails.

import argparse
import functools
import statistics
import subprocess
import sys
import time

DEFAULT_SEED = 88888  # the notebook's
BENCHMARK_CONFIGURATIONS = ("pytorch-fp32", "pytorch-bf16", "openvino", "openvino-int8")
_CONTROL_MAPS = {"canny": canny_map, "scribble": scribble_map}


def _status(message: str) -> None:
    # On stdout: stderr is kept for progress bars and the one-line error.
    print(message, flush=True)


def _one_line(err: BaseException) -> str:
    message = " ".join(str(err).split()) or type(err).__name__
    # ValueError / OSError messages of this module say what is wrong; name the type of anything else.
    return message if isinstance(err, (ValueError, OSError)) else f"{type(err).__name__}: {message}"


def _open_image(path: Path, argument: str) -> PIL.Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: no image file at {path}")
    try:
        image = PIL.Image.open(path)
        image.load()
    except PIL.UnidentifiedImageError as err:
        raise OSError(f"{argument}: {path} is not an image file PIL can read") from err
    return image


# -- argument types: a bad value is reported by argparse as "argument --NAME: ..." with exit status 2


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse


def _image_side(text: str) -> int:
    if not text.isdigit() or int(text) == 0 or int(text) % 8:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8 (pixels), got {text!r}")
    return int(text)


def _guidance_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0 (<= 1 disables classifier-free guidance), got {text!r}")
    return value


def _image_output(text: str) -> Path:
    # Checked before generating, so that a typo does not cost a whole generation.
    extensions = PIL.Image.registered_extensions()
    if Path(text).suffix.lower() not in extensions:
        raise argparse.ArgumentTypeError(f"{text!r} has no image extension PIL knows; use .png, .jpg, .webp, ...")
    return Path(text)


class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line that points to --help, instead of a usage block and a line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="blip_helper.py",
        description="BLIP-Diffusion on OpenVINO: convert the diffusers pipelines, generate images, benchmark.",
        epilog="Run 'blip_helper.py COMMAND --help' for the options of a command.",
    )
    # The metavar leaves out the hidden benchmark-worker command.
    commands = parser.add_subparsers(dest="command", required=True, title="commands", metavar="{convert,generate,benchmark}")

    convert = commands.add_parser(
        "convert",
        help="convert a diffusers BLIP-Diffusion pipeline to an OpenVINO IR directory",
        description="Convert a BLIP-Diffusion pipeline (and optionally its ControlNet) to an OpenVINO IR directory "
        "with FP16 weights. Parts already converted from the same architecture are kept.",
    )
    convert.add_argument("--model", required=True, metavar="ID_OR_DIR", help=f"hub id or local directory of the pipeline, e.g. {DEFAULT_MODEL}")
    convert.add_argument(
        "--controlnet-model", metavar="ID_OR_DIR", help=f"also convert the ControlNet of this pipeline, e.g. {DEFAULT_CONTROLNET_MODEL}"
    )
    convert.add_argument("--output", required=True, type=Path, metavar="DIR", help="the IR directory to write")
    convert.add_argument("--int8", action="store_true", help="compress to INT8 with NNCF (compress_pipeline); DIR gets the INT8 IR")
    _add_int8_arguments(convert)
    convert.add_argument(
        "--overwrite", action="store_true", help="convert again the parts already in DIR (needed for another checkpoint of the same architecture)"
    )
    convert.set_defaults(handler=_command_convert)

    generate = commands.add_parser(
        "generate",
        help="generate an image of a subject with the OpenVINO pipeline",
        description="Draw the subject of a reference image in a new scene, optionally following the edges (canny) "
        "or a scribble of a conditioning image (needs an IR directory converted with --controlnet-model).",
    )
    generate.add_argument("--models", required=True, type=Path, metavar="DIR", help="an IR directory written by 'convert'")
    generate.add_argument("--reference", required=True, type=Path, metavar="IMG", help="image of the subject")
    generate.add_argument("--source-category", required=True, metavar="TEXT", help="what the reference shows, e.g. dog")
    generate.add_argument("--target-category", required=True, metavar="TEXT", help="what to draw the subject as, usually the same")
    generate.add_argument("--prompt", required=True, metavar="TEXT", help='the new scene, e.g. "swimming underwater"')
    generate.add_argument("--control", choices=sorted(_CONTROL_MAPS), help="turn --conditioning into this control map for the ControlNet")
    generate.add_argument("--conditioning", type=Path, metavar="IMG", help="image whose structure to follow (with --control)")
    generate.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the initial noise (default: %(default)s)")
    generate.add_argument("--steps", type=_int_at_least(1), default=50, help="denoising steps (default: %(default)s)")
    generate.add_argument("--guidance", type=_guidance_scale, default=7.5, help="classifier-free guidance scale (default: %(default)s)")
    generate.add_argument("--height", type=_image_side, default=512, help="pixels, a multiple of 8 (default: %(default)s)")
    generate.add_argument("--width", type=_image_side, default=512, help="pixels, a multiple of 8 (default: %(default)s)")
    generate.add_argument("--negative", default=DEFAULT_NEGATIVE_PROMPT, metavar="TEXT", help="negative prompt (default: diffusers' example)")
    generate.add_argument("--device", default="CPU", help="OpenVINO device (default: %(default)s)")
    generate.add_argument("--output", required=True, type=_image_output, metavar="PNG", help="where to save the image")
    generate.set_defaults(handler=_command_generate, parser=generate)

    benchmark = commands.add_parser(
        "benchmark",
        help="compare PyTorch FP32, PyTorch bf16, OpenVINO and OpenVINO INT8",
        description="Measure diffusers on PyTorch (FP32 and bf16 autocast), the OpenVINO pipeline and its INT8 "
        "compression side by side: seconds per UNet step and per image (with and without ControlNet), peak memory, "
        "IR size, compile time (with the default settings and from a model cache), and the conversion. Each measurement runs in its "
        "own process. By default the models are the published full-size architecture with random weights "
        "(built with tests/pipeline_builder.py): the cost of a forward pass does not depend on the weights.",
    )
    source = benchmark.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="ID_OR_DIR", help="measure this pipeline instead of random weights")
    source.add_argument(
        "--spec", choices=("full_size", "tiny"), help="architecture of the random pipelines (default: full_size; tiny: a quick check)"
    )
    benchmark.add_argument("--controlnet-model", metavar="ID_OR_DIR", help="with --model: the ControlNet pipeline to measure too")
    benchmark.add_argument("--steps", type=_int_at_least(1), default=3, help="denoising steps per image (default: %(default)s)")
    benchmark.add_argument("--height", type=_image_side, default=512, help="pixels (default: %(default)s)")
    benchmark.add_argument("--width", type=_image_side, default=512, help="pixels (default: %(default)s)")
    benchmark.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the initial noise (default: %(default)s)")
    benchmark.add_argument("--guidance", type=_guidance_scale, default=7.5, help="guidance scale (default: %(default)s)")
    benchmark.add_argument("--device", default="CPU", help="OpenVINO device (default: %(default)s)")
    benchmark.add_argument(
        "--work-dir", type=Path, default=Path("bench_out"), metavar="DIR", help="models, IR and caches go here (default: %(default)s)"
    )
    benchmark.add_argument("--json", type=Path, metavar="PATH", help="where to write the results (default: WORK_DIR/benchmark.json)")
    _add_int8_arguments(benchmark)
    benchmark.set_defaults(handler=_command_benchmark, parser=benchmark)

    # Not listed: one measurement of the benchmark, run in a process of its own.
    worker = commands.add_parser("benchmark-worker")
    worker.add_argument("--config", required=True, help="the measurement, as JSON")
    worker.add_argument("--result", required=True, type=Path, help="where to write its result, as JSON")
    worker.set_defaults(handler=_command_benchmark_worker)
    return parser


def _quiet_library_notices() -> None:
    # diffusers' notices for library developers (BLIP-Diffusion is deprecated, accelerate is not installed)
    # would bury the command's own output; real errors still surface as exceptions.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0, 1 when the command fails, 2 for bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_library_notices()
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        print(f"{parser.prog} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line for the user, never a traceback
        print(f"{parser.prog} {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1


def _add_int8_arguments(parser) -> None:
    parser.add_argument(
        "--int8-subset-size", type=_int_at_least(1), default=64, metavar="N", help="INT8 calibration: recorded UNet inputs used (default: %(default)s)"
    )
    parser.add_argument(
        "--calibration-size", type=_image_side, default=512, metavar="PIXELS", help="INT8 calibration: image size of the calibration generations (default: %(default)s)"
    )


def _command_convert(args) -> None:
    _status(f"Loading {args.model}")
    pipe = load_pipeline(args.model)
    controlnet_pipe = None
    if args.controlnet_model:
        _status(f"Loading {args.controlnet_model}")
        controlnet_pipe = load_pipeline(args.controlnet_model, controlnet=True, **shared_components(pipe))
    if args.int8:
        import tempfile

        args.output.parent.mkdir(parents=True, exist_ok=True)
        # The FP16 IR is only the input of the compression: DIR receives the INT8 IR alone.
        with tempfile.TemporaryDirectory(dir=args.output.parent, prefix=f".{args.output.name}.fp16-") as fp16_dir:
            convert_pipeline(pipe, fp16_dir, controlnet_pipe=controlnet_pipe)
            del pipe, controlnet_pipe
            gc.collect()
            _status("Compressing to INT8")
            compress_pipeline(fp16_dir, args.output, subset_size=args.int8_subset_size, calibration_size=args.calibration_size)
    else:
        convert_pipeline(pipe, args.output, controlnet_pipe=controlnet_pipe, overwrite=args.overwrite)
    sizes = ir_sizes(args.output)
    print(f"Wrote {args.output}: " + ", ".join(f"{part} {size / 2**20:.1f} MiB" for part, size in sizes.items()))


def _command_generate(args) -> None:
    if (args.control is None) != (args.conditioning is None):
        given, missing = ("--control", "--conditioning IMG") if args.control else ("--conditioning", "--control canny|scribble")
        args.parser.error(f"argument {given}: needs {missing} too")
    reference = _open_image(args.reference, "--reference")
    control_map = None
    if args.control:
        control_map = _CONTROL_MAPS[args.control](_open_image(args.conditioning, "--conditioning"))
    pipe = OVBlipDiffusionPipeline.from_pretrained(args.models, device=args.device)
    if control_map is not None and not pipe.has_controlnet:
        raise ValueError(f"--control needs an IR directory with a ControlNet; {args.models} has none (convert with --controlnet-model)")
    _status(f"Compiling for {args.width}x{args.height} on {args.device}")
    pipe.compile(height=args.height, width=args.width, guidance_scale=args.guidance)
    pipe.set_progress_bar_config(desc="Denoising")
    image = pipe(
        args.prompt,
        reference,
        args.source_category,
        args.target_category,
        conditioning_image=control_map,
        guidance_scale=args.guidance,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        generator=torch.Generator().manual_seed(args.seed),
        neg_prompt=args.negative,
    ).images[0]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.output)
    print(f"Saved {args.output} ({image.width}x{image.height})")


# -- benchmark: the parent plans the measurements and runs each one in a `benchmark-worker` process


def _command_benchmark(args) -> None:
    if args.controlnet_model and not args.model:
        args.parser.error("argument --controlnet-model: needs --model (the random pipelines include a ControlNet)")
    json_path = args.json or args.work_dir / "benchmark.json"
    results = run_benchmark(
        args.work_dir,
        model=args.model,
        controlnet_model=args.controlnet_model,
        spec=args.spec or "full_size",
        steps=args.steps,
        height=args.height,
        width=args.width,
        seed=args.seed,
        guidance=args.guidance,
        device=args.device,
        int8_subset_size=args.int8_subset_size,
        calibration_size=args.calibration_size,
    )
    print(benchmark_report(results))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2))
    print(f"\nResults written to {json_path}")
    if results["failures"]:
        raise RuntimeError(
            f"{len(results['failures'])} benchmark step(s) failed: {', '.join(results['failures'])} (see the notes above and {json_path})"
        )


def run_benchmark(
    work_dir: str | os.PathLike = "bench_out",
    model: str | None = None,
    controlnet_model: str | None = None,
    spec: str = "full_size",
    steps: int = 3,
    height: int = 512,
    width: int = 512,
    seed: int = DEFAULT_SEED,
    guidance: float = 7.5,
    device: str = "CPU",
    int8_subset_size: int = 64,
    calibration_size: int = 512,
) -> dict:
    """Measure PyTorch FP32, PyTorch bf16 autocast, OpenVINO and OpenVINO INT8 side by side; return the results.

    Without ``model``, random pipelines of the ``spec`` architecture (``configs/``) are built in
    ``work_dir`` first. Each step (build, conversion, compression, and each configuration's
    measurement) runs in a process of its own, so that its peak memory is its own. A failed step is
    recorded in ``results["failures"]``; the steps that need it are skipped.
    """
    work_dir = Path(work_dir).resolve()
    ir_dir, int8_dir = work_dir / "ir", work_dir / "ir-int8"
    settings = {"steps": steps, "height": height, "width": width, "seed": seed, "guidance": guidance, "device": device,
                "int8_subset_size": int8_subset_size, "calibration_size": calibration_size}
    given_models = {"model": model, "controlnet_model": controlnet_model}
    steps_to_run = []
    if model is None:
        models_dir = work_dir / f"random-{spec}"  # one folder per spec: build_pipelines keeps what is there
        models = {"model": str(models_dir / "blipdiffusion"), "controlnet_model": str(models_dir / "blipdiffusion-controlnet")}
        steps_to_run.append({"name": "build", "kind": "build", "output_dir": str(models_dir), "spec": spec})
    else:
        # Here, once: a missing model fails at once, and a hub model is downloaded before the workers need it.
        models = {"model": str(_resolve_model_dir(model))}
        models["controlnet_model"] = str(_resolve_model_dir(controlnet_model)) if controlnet_model else None
    steps_to_run += [
        {"name": "convert", "kind": "convert", **models, "ir_dir": str(ir_dir), "needs": ["build"]},
        {
            "name": "compress",
            "kind": "compress",
            "ir_dir": str(ir_dir),
            "output_dir": str(int8_dir),
            "subset_size": int8_subset_size,
            "calibration_size": calibration_size,
            "needs": ["convert"],
        },
        {"name": "pytorch-fp32", "kind": "pytorch", **models, **settings, "bf16": False, "needs": ["build"]},
        {"name": "pytorch-bf16", "kind": "pytorch", **models, **settings, "bf16": True, "needs": ["build"]},
    ]
    for name, directory, source in (("openvino", ir_dir, "convert"), ("openvino-int8", int8_dir, "compress")):
        openvino = {"kind": "openvino", "ir_dir": str(directory), **settings}
        # The model cache's default place: the last process, with the pipeline's defaults, finds it filled
        # if the defaults use it (INT8 on the CPU), as a second start would.
        cache = {**openvino, "cache_dir": str(directory / "model_cache"), "generate": False}
        steps_to_run += [
            {"name": f"{name}-fill-cache", **cache, "empty_cache": True, "needs": [source]},
            {"name": f"{name}-from-cache", **cache, "empty_cache": False, "needs": [f"{name}-fill-cache"]},
            {"name": name, **openvino, "cache_dir": None, "generate": True, "needs": [source]},
        ]

    outcomes: dict[str, dict] = {}
    with tqdm(steps_to_run, desc="Benchmark", unit="step") as progress:
        for step in progress:
            progress.set_postfix_str(step["name"])
            blocked = [need for need in step.get("needs", []) if need in outcomes and not _succeeded(outcomes[need])]
            if blocked:  # its cause was reported when it happened
                outcomes[step["name"]] = {"skipped": outcomes[blocked[0]].get("skipped") or f"{blocked[0]} failed"}
                continue
            outcome = _run_worker(step, work_dir / "results" / f"{step['name']}.json")
            if not _succeeded(outcome):
                status = "failed" if "error" in outcome else "skipped"
                progress.write(f"{step['name']}: {status}: {outcome.get('error') or outcome['skipped']}")
            outcomes[step["name"]] = outcome

    configurations = {name: outcomes[name] for name in ("pytorch-fp32", "pytorch-bf16")}
    for name, directory in (("openvino", ir_dir), ("openvino-int8", int8_dir)):
        configurations[name] = row = outcomes[name]
        if _succeeded(row):
            row["ir_size_bytes"] = ir_sizes(directory)["total"]
            for step, key in ((f"{name}-fill-cache", "compile_filling_cache"), (f"{name}-from-cache", "compile_from_cache")):
                if _succeeded(outcomes[step]):
                    row[f"{key}_s"] = outcomes[step]["compile_s"]
                    row[f"{key}_peak_rss_bytes"] = outcomes[step]["peak_rss_bytes"]
    return {
        "machine": machine_info(device),
        "settings": {**settings, **(given_models if model else models), "spec": None if model else spec},
        "build": outcomes.get("build"),
        "conversion": outcomes["convert"],
        "compression": outcomes["compress"],
        "configurations": configurations,
        "ratios": _benchmark_ratios(configurations),
        "failures": {name: outcome["error"] for name, outcome in outcomes.items() if "error" in outcome},
    }


def _succeeded(outcome: dict) -> bool:
    return "error" not in outcome and "skipped" not in outcome


def _run_worker(step: dict, result_file: Path) -> dict:
    """Run one benchmark step in a fresh Python process; return what it measured, or {"error": ...}."""
    import signal

    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "benchmark-worker", "--config", json.dumps(step), "--result", str(result_file)]
    start = time.perf_counter()
    # Output captured: the workers' progress bars and notices would garble the benchmark's progress bar.
    process = subprocess.run(command, capture_output=True, text=True)
    if result_file.is_file():
        result = json.loads(result_file.read_text())
        if "error" not in result:
            result["time_s"] = time.perf_counter() - start  # the whole step, process start included
        return result
    if process.returncode < 0:
        signal_name = signal.Signals(-process.returncode).name
        hint = " (out of memory?)" if process.returncode == -signal.SIGKILL else ""
        return {"error": f"the worker process was killed by {signal_name}{hint}"}
    last_lines = [line for line in process.stderr.splitlines() if line.strip()][-1:]
    return {"error": f"the worker process exited with status {process.returncode}: {' '.join(last_lines) or 'no output'}"}


def _command_benchmark_worker(args) -> int:
    config = json.loads(args.config)
    measure = {
        "build": _measure_build,
        "convert": _measure_conversion,
        "compress": _measure_compression,
        "pytorch": _measure_pytorch,
        "openvino": _measure_openvino,
    }[config["kind"]]
    try:
        result = measure(config)
    except Exception as err:  # reported by the parent, in its table
        result = {"error": _one_line(err)}
    result["peak_rss_bytes"] = _peak_rss_bytes()
    _write_json_atomic(args.result, result)
    return 1 if "error" in result else 0


def _peak_rss_bytes() -> int | None:
    """Peak resident memory of this process, in bytes.

    On Linux this is VmHWM from /proc/self/status rather than ``ru_maxrss``: a child's ``ru_maxrss``
    starts at its parent's peak (the kernel carries it over on exec), so a worker would report at
    least the benchmark process's own memory.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _load_pipeline_builder():
    """tests/pipeline_builder.py, imported by its path: a tool of the repository, not a package."""
    import importlib.util

    path = Path(__file__).resolve().parent / "tests" / "pipeline_builder.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"random pipelines are built by {path}, which is missing (it comes with the repository); "
            "pass --model to benchmark a model instead"
        )
    spec = importlib.util.spec_from_file_location("pipeline_builder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _measure_build(config: dict) -> dict:
    base_dir, controlnet_dir = _load_pipeline_builder().build_pipelines(config["output_dir"], config["spec"])
    return {"model": str(base_dir), "controlnet_model": str(controlnet_dir)}


def _measure_conversion(config: dict) -> dict:
    ir_dir = Path(config["ir_dir"])
    shutil.rmtree(ir_dir, ignore_errors=True)  # convert every part: convert_pipeline would keep parts already there
    start = time.perf_counter()
    pipe = load_pipeline(config["model"])
    controlnet_pipe = None
    if config["controlnet_model"]:
        controlnet_pipe = load_pipeline(config["controlnet_model"], controlnet=True, **shared_components(pipe))
    loaded = time.perf_counter()
    sizes = convert_pipeline(pipe, ir_dir, controlnet_pipe=controlnet_pipe)
    return {"load_s": loaded - start, "convert_s": time.perf_counter() - loaded, "ir_sizes": sizes}


def _measure_compression(config: dict) -> dict:
    output_dir = Path(config["output_dir"])
    shutil.rmtree(output_dir, ignore_errors=True)
    start = time.perf_counter()
    compress_pipeline(config["ir_dir"], output_dir, subset_size=config["subset_size"], calibration_size=config["calibration_size"])
    return {"compress_s": time.perf_counter() - start, "ir_sizes": ir_sizes(output_dir)}


def _benchmark_tasks(config: dict) -> dict[str, dict]:
    """The notebook's zero-shot and Canny tasks, with the benchmark's size and guidance."""
    images = example_images()
    common = {"guidance_scale": config["guidance"], "height": config["height"], "width": config["width"], "neg_prompt": DEFAULT_NEGATIVE_PROMPT}
    return {
        "plain": {"prompt": "swimming underwater", "reference_image": images["cat"], "source_subject_category": "cat", "target_subject_category": "cat", **common},
        "controlnet": {
            "prompt": "on a marble table",
            "reference_image": images["cat"],
            "conditioning_image": canny_map(images["coffee"]),
            "source_subject_category": "cat",
            "target_subject_category": "cup",
            **common,
        },
    }


class _TimedPart:
    """Stands in for an OVModelPart and records how long each call takes."""

    def __init__(self, part: OVModelPart, durations: list[float]):
        self._part, self._durations = part, durations

    def __getattr__(self, name: str):
        return getattr(self._part, name)

    def __call__(self, **inputs):
        start = time.perf_counter()
        try:
            return self._part(**inputs)
        finally:
            self._durations.append(time.perf_counter() - start)


@contextmanager
def _recorded_calls(parts: Sequence[tuple[Any, str]]):
    """Seconds of every call of each ``getattr(owner, name)`` during the block, one list per part.

    PyTorch modules are timed with forward hooks; OpenVINO parts are swapped for a _TimedPart.
    """
    recorded: list[list[float]] = [[] for _ in parts]
    undo = []
    for (owner, name), durations in zip(parts, recorded):
        part = getattr(owner, name)
        if isinstance(part, torch.nn.Module):
            starts: list[float] = []
            pre = part.register_forward_pre_hook(lambda module, inputs, starts=starts: starts.append(time.perf_counter()))
            post = part.register_forward_hook(
                lambda module, inputs, output, starts=starts, durations=durations: durations.append(time.perf_counter() - starts.pop())
            )
            undo += [pre.remove, post.remove]
        else:
            setattr(owner, name, _TimedPart(part, durations))
            undo.append(functools.partial(setattr, owner, name, part))
    try:
        yield recorded
    finally:
        for restore in reversed(undo):
            restore()


# What _time_generation measures, by task: seconds per image, per step (a ControlNet step is ControlNet + UNet),
# and the number of steps timed.
_TIMING_KEYS = {
    "plain": ("image_s", "unet_step_s", "unet_steps_timed"),
    "controlnet": ("controlnet_image_s", "controlnet_step_s", "controlnet_steps_timed"),
}


def _time_generation(generate, task: dict, config: dict, denoisers: Sequence[tuple[Any, str]]) -> tuple[float, float, int]:
    """Seconds per image and per denoising step (median), and the number of steps, after a one-step warm-up.

    A step is timed as the calls of the denoisers (ControlNet and UNet) in it, recorded as they run:
    exact whatever the scheduler adds (PNDM makes 4 UNet calls for 3 steps), and without
    the second generation and the noise of differencing two step counts.
    """
    generate(**task, num_inference_steps=1, generator=torch.Generator().manual_seed(config["seed"]))  # first-call setup
    with _recorded_calls(denoisers) as calls:
        start = time.perf_counter()
        generate(**task, num_inference_steps=config["steps"], generator=torch.Generator().manual_seed(config["seed"]))
        image_s = time.perf_counter() - start
    step_times = [sum(durations) for durations in zip(*calls, strict=True)]
    return image_s, statistics.median(step_times), len(step_times)


def _measure_pytorch(config: dict) -> dict:
    """diffusers in FP32, or under bf16 autocast: the base pipeline, then (freed first) the ControlNet one."""
    tasks = _benchmark_tasks(config)
    result = {}
    runs = [("plain", config["model"])] + ([("controlnet", config["controlnet_model"])] if config["controlnet_model"] else [])
    for kind, model in runs:
        controlnet = kind == "controlnet"
        pipe = load_pipeline(model, controlnet=controlnet)
        pipe.set_progress_bar_config(disable=True)
        # output_type "pt": diffusers cannot turn bf16 images into numpy arrays (the same for FP32, for fairness).
        generate = functools.partial(generate_with_diffusers, pipe, pipe if controlnet else None, output_type="pt")
        denoisers = [(pipe, "controlnet"), (pipe, "unet")] if controlnet else [(pipe, "unet")]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config["bf16"]):
            image_s, step_s, step_count = _time_generation(generate, tasks[kind], config, denoisers)
        result.update(zip(_TIMING_KEYS[kind], (image_s, step_s, step_count)))
        del pipe, generate, denoisers
        gc.collect()
    return result


def _measure_openvino(config: dict) -> dict:
    """Load and compile for the benchmark's size; with ``generate``, then time the generations.

    ``cache_dir``: compile with this model cache (emptied first with ``empty_cache``); ``None``: with
    the pipeline's default configuration.
    """
    ov_config = None
    if config["cache_dir"]:
        if config["empty_cache"]:
            shutil.rmtree(config["cache_dir"], ignore_errors=True)
        ov_config = {"CACHE_DIR": config["cache_dir"]}
    start = time.perf_counter()
    pipe = OVBlipDiffusionPipeline.from_pretrained(config["ir_dir"], device=config["device"], ov_config=ov_config)
    pipe.compile(height=config["height"], width=config["width"], guidance_scale=config["guidance"])
    result = {"compile_s": time.perf_counter() - start}  # from_pretrained (reading the IR) + compile
    if not config["generate"]:
        return result
    try:
        precision = pipe.unet._request.get_compiled_model().get_property("INFERENCE_PRECISION_HINT")
        result["inference_precision"] = precision.get_type_name()
    except RuntimeError:  # a device without this property
        result["inference_precision"] = None
    pipe.set_progress_bar_config(disable=True)
    tasks = _benchmark_tasks(config)
    generate = functools.partial(pipe, output_type="np")
    result.update(zip(_TIMING_KEYS["plain"], _time_generation(generate, tasks["plain"], config, [(pipe, "unet")])))
    if pipe.has_controlnet:
        denoisers = [(pipe, "controlnet"), (pipe, "unet")]
        result.update(zip(_TIMING_KEYS["controlnet"], _time_generation(generate, tasks["controlnet"], config, denoisers)))
    return result


def machine_info(device: str = "CPU") -> dict:
    """CPU, cores, memory and library versions: what the benchmark's numbers depend on."""
    import platform
    from importlib import metadata

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    fields = [line.partition(":")[::2] for line in cpuinfo.splitlines()]
    fields = [(key.strip(), value.strip()) for key, value in fields]
    cpu_model = next((value for key, value in fields if key == "model name"), None) or platform.processor() or platform.machine()
    flags = set(next((value for key, value in fields if key == "flags"), "").split())
    # A core is a (physical id, core id) pair; /proc/cpuinfo lists one block per logical CPU.
    physical, core_ids = None, set()
    for key, value in fields:
        if key == "physical id":
            physical = value
        elif key == "core id":
            core_ids.add((physical, value))
    try:
        ram_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not on Windows
        ram_bytes = None

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    info = {
        "cpu": cpu_model,
        "logical_cores": os.cpu_count(),
        "physical_cores": len(core_ids) or None,
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        # The instructions that decide OpenVINO's and PyTorch's fast paths (bf16 needs AVX512-BF16 or AMX).
        "cpu_flags": [flag for flag in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8") if flag in flags],
        "ram_bytes": ram_bytes,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {package: version(package) for package in ("openvino", "torch", "diffusers", "transformers", "nncf")},
        "openvino_device": device,
    }
    try:
        core = ov.Core()
        info["openvino_device_name"] = core.get_property(device, "FULL_DEVICE_NAME")
        info["openvino_default_precision"] = core.get_property(device, "INFERENCE_PRECISION_HINT").get_type_name()
    except RuntimeError:  # an unknown device, or one without these properties
        pass
    return info


_RATIO_METRICS = {"unet_step": "unet_step_s", "image": "image_s", "controlnet_image": "controlnet_image_s"}


def _benchmark_ratios(configurations: dict[str, dict]) -> dict[str, dict]:
    """Speed-ups (PyTorch's seconds / this configuration's) and memory ratios (this peak / PyTorch's)."""
    ratios = {}
    for name, row in configurations.items():
        for baseline_name in ("pytorch-fp32", "pytorch-bf16"):
            baseline = configurations[baseline_name]
            entry = {}
            for label, key in _RATIO_METRICS.items():
                if row.get(key) and baseline.get(key):
                    entry[f"{label}_speedup"] = baseline[key] / row[key]
            if row.get("peak_rss_bytes") and baseline.get("peak_rss_bytes") and _succeeded(row) and _succeeded(baseline):
                entry["memory_ratio"] = row["peak_rss_bytes"] / baseline["peak_rss_bytes"]
            ratios.setdefault(name, {})[baseline_name] = entry
    return ratios


def _seconds(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _mebibytes(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:,.1f}"


def _times(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _configuration_label(name: str, row: dict) -> str:
    label = {
        "pytorch-fp32": "PyTorch FP32",
        "pytorch-bf16": "PyTorch bf16 autocast",
        "openvino": "OpenVINO, FP16 weights",
        "openvino-int8": "OpenVINO, INT8 weights",
    }[name]
    if row.get("inference_precision"):
        label += f", {row['inference_precision']} compute"
    return label


def benchmark_report(results: dict) -> str:
    """The results of :func:`run_benchmark` as Markdown: settings, machine, a table of measurements, ratios, notes."""
    settings, machine = results["settings"], results["machine"]
    models = (
        f"random weights, `{settings['spec']}` architecture (configs/{settings['spec']}.json)"
        if settings["spec"]
        else " + ".join(model for model in (settings["model"], settings["controlnet_model"]) if model)
    )
    versions = ", ".join(f"{package} {version}" for package, version in machine["versions"].items() if version)
    ram = f"{machine['ram_bytes'] / 2**30:.1f} GiB RAM" if machine["ram_bytes"] else "RAM unknown"
    lines = [
        "## BLIP-Diffusion benchmark",
        "",
        f"- Models: {models}",
        f"- Settings: {settings['width']}x{settings['height']}, {settings['steps']} steps, guidance {settings['guidance']}, "
        f"seed {settings['seed']}, OpenVINO device {settings['device']}",
        f"- Machine: {machine['cpu']}, {machine['logical_cores']} logical cores ({machine['physical_cores'] or '?'} physical, "
        f"{machine['usable_cores']} usable), {ram}, CPU flags: {' '.join(machine['cpu_flags']) or 'none of note'}",
        f"- Software: Python {machine['python']}, {versions}",
        "",
        "| configuration | s / UNet step | s / image | s / image, ControlNet | peak memory, MiB | IR size, MiB "
        "| compile (s) | compile from model cache (s) |",
        "|:--|--:|--:|--:|--:|--:|--:|--:|",
    ]
    notes = []
    for name, row in results["configurations"].items():
        label = _configuration_label(name, row)
        if not _succeeded(row):
            status = "failed" if "error" in row else "skipped"
            notes.append(f"- {label}: {status}: {row.get('error') or row.get('skipped')}")
            lines.append(f"| {label} ({status}) |" + " – |" * 7)
            continue
        cells = [
            _seconds(row.get("unet_step_s")),
            _seconds(row.get("image_s")),
            _seconds(row.get("controlnet_image_s")),
            _mebibytes(row.get("peak_rss_bytes")),
            _mebibytes(row.get("ir_size_bytes")),
            _seconds(row.get("compile_s")),
            _seconds(row.get("compile_from_cache_s")),
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Speed-up: PyTorch's seconds / this configuration's (higher is faster). Memory: this configuration's peak / PyTorch's.",
        "",
        "| configuration | UNet step vs FP32 | image vs FP32 | ControlNet image vs FP32 | memory vs FP32 "
        "| UNet step vs bf16 | image vs bf16 | ControlNet image vs bf16 | memory vs bf16 |",
        "|:--|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, row in results["configurations"].items():
        cells = [
            _times(results["ratios"][name][baseline].get(key))
            for baseline in ("pytorch-fp32", "pytorch-bf16")
            for key in ("unet_step_speedup", "image_speedup", "controlnet_image_speedup", "memory_ratio")
        ]
        lines.append(f"| {_configuration_label(name, row)} | " + " | ".join(cells) + " |")

    conversion = results["conversion"]
    if _succeeded(conversion):
        notes.append(
            f"- Conversion (load_pipeline + convert_pipeline to FP16 IR{', ControlNet included' if settings['controlnet_model'] else ''}): "
            f"loading {_seconds(conversion['load_s'])} s, converting {_seconds(conversion['convert_s'])} s, "
            f"peak memory {_mebibytes(conversion['peak_rss_bytes'])} MiB, IR {_mebibytes(conversion['ir_sizes']['total'])} MiB"
        )
    else:
        notes.append(f"- Conversion: {'failed' if 'error' in conversion else 'skipped'}: {conversion.get('error') or conversion.get('skipped')}")
    compression = results["compression"]
    if _succeeded(compression):
        notes.append(
            f"- INT8 compression (compress_pipeline): {_seconds(compression['compress_s'])} s, "
            f"peak memory {_mebibytes(compression['peak_rss_bytes'])} MiB, IR {_mebibytes(compression['ir_sizes']['total'])} MiB"
        )
    cache_notes = [
        f"{_configuration_label(name, row)}: filling it {_seconds(row['compile_filling_cache_s'])} s "
        f"(peak {_mebibytes(row['compile_filling_cache_peak_rss_bytes'])} MiB), loading from it "
        f"{_seconds(row['compile_from_cache_s'])} s (peak {_mebibytes(row['compile_from_cache_peak_rss_bytes'])} MiB)"
        for name, row in results["configurations"].items()
        if "compile_from_cache_s" in row and "compile_filling_cache_s" in row
    ]
    if cache_notes:
        notes.append(f"- Compiling with a model cache (`CACHE_DIR`, each in a process of its own): {'; '.join(cache_notes)}")
    notes += [f"- {name} failed: {error}" for name, error in results["failures"].items() if name not in results["configurations"]]
    return "\n".join(lines + [""] + notes)


if __name__ == "__main__":
    sys.exit(main())
