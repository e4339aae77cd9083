"""Build tiny random BLIP-Diffusion pipelines in code, for tests and CI.

Nothing here touches the network: the CLIP and BERT tokenizers are generated from small local
vocabularies, and every model is randomly initialised with a fixed seed. The pipelines are saved
with ``save_pretrained`` so that tests load them back through ``blip_helper.load_pipeline``,
exactly like a local copy of the hub repositories.

    python tests/tiny_pipelines.py OUTPUT_DIR   # writes OUTPUT_DIR/blipdiffusion and .../blipdiffusion-controlnet
"""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import torch

# Sizes are chosen to be consistent with each other: 2 UNet blocks downscale latents by 2, the VAE
# (2 blocks) upscales by 2 and the ControlNet's conditioning embedding (2 stages) downscales by 2.
HIDDEN = 32
NUM_QUERY_TOKENS = 4
TEXT_MAX_POSITIONS = 32
QFORMER_VOCAB = 128
SEED = 0


def _bytes_to_unicode() -> dict[int, str]:
    # The byte-to-unicode table of GPT-2/CLIP byte-level BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer(directory: Path) -> Path:
    """A byte-level CLIP tokenizer with a few merges: every text tokenizes, offline."""
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges = ["a </w>", "d o", "do g</w>", "c a", "ca t</w>", "i n", "t h", "th e</w>"]
    for merge in merges:
        vocab.append(merge.replace(" ", ""))
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory


def write_bert_tokenizer(directory: Path) -> Path:
    """A word-piece BERT tokenizer over single characters and a few words."""
    directory.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "dog", "cat", "cup", "horse", "rocket", "teapot"]
    words += list(string.ascii_lowercase) + ["##" + c for c in string.ascii_lowercase]
    assert len(words) < QFORMER_VOCAB - 1  # room for the [DEC] token the Q-Former adds
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    return directory


def _common_components(bert_tokenizer_dir: Path, clip_tokenizer_dir: Path) -> dict:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer
    from transformers.models.blip_2.configuration_blip_2 import Blip2Config

    from blip_helper import BlipImageProcessor, Blip2QFormerModel, ContextCLIPTextModel

    torch.manual_seed(SEED)
    text_encoder = ContextCLIPTextModel(
        CLIPTextConfig(
            vocab_size=600,
            hidden_size=HIDDEN,
            intermediate_size=37,
            projection_dim=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TEXT_MAX_POSITIONS,
        )
    )
    qformer_config = Blip2Config(
        vision_config={
            "hidden_size": HIDDEN,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 28,
            "patch_size": 14,
            "hidden_act": "quick_gelu",
        },
        qformer_config={
            "vocab_size": QFORMER_VOCAB,
            "hidden_size": HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "max_position_embeddings": 64,
            "cross_attention_frequency": 1,
            "encoder_hidden_size": HIDDEN,
        },
        num_query_tokens=NUM_QUERY_TOKENS,
    )
    qformer_config.tokenizer = str(bert_tokenizer_dir.resolve())
    qformer = Blip2QFormerModel(qformer_config)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        skip_prk_steps=True,
    )
    image_processor = BlipImageProcessor(size={"height": 28, "width": 28})
    return {
        "tokenizer": CLIPTokenizer.from_pretrained(clip_tokenizer_dir),
        "text_encoder": text_encoder.eval(),
        "vae": vae.eval(),
        "unet": unet.eval(),
        "scheduler": scheduler,
        "qformer": qformer.eval(),
        "image_processor": image_processor,
        "ctx_begin_pos": 2,
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
    }


def tiny_controlnet():
    from diffusers import ControlNetModel

    torch.manual_seed(SEED + 1)
    controlnet = ControlNetModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        in_channels=4,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=4,
        conditioning_embedding_out_channels=(4, 8),
    )
    # A fresh ControlNet starts with zero convolutions, i.e. no effect at all: randomise them so that
    # tests can tell whether the control signal reaches the UNet.
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block, controlnet.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.normal_(0.0, 0.3)
            conv.bias.normal_(0.0, 0.3)
    return controlnet.eval()


def build_tiny_pipelines(output_dir: str | Path) -> tuple[Path, Path]:
    """Write tiny BLIP-Diffusion and BLIP-Diffusion-ControlNet pipelines; return their directories.

    As on the hub, both pipelines share the Q-Former, text encoder, UNet and VAE weights; the
    ControlNet pipeline adds a ControlNet.
    """
    from blip_helper import BlipDiffusionControlNetPipeline, BlipDiffusionPipeline

    output_dir = Path(output_dir)
    base_dir, controlnet_dir = output_dir / "blipdiffusion", output_dir / "blipdiffusion-controlnet"
    if (base_dir / "model_index.json").exists() and (controlnet_dir / "model_index.json").exists():
        return base_dir, controlnet_dir
    components = _common_components(
        write_bert_tokenizer(output_dir / "bert-tokenizer"), write_clip_tokenizer(output_dir / "clip-tokenizer")
    )
    BlipDiffusionPipeline(**components).save_pretrained(base_dir)
    BlipDiffusionControlNetPipeline(**components, controlnet=tiny_controlnet()).save_pretrained(controlnet_dir)
    return base_dir, controlnet_dir


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    for path in build_tiny_pipelines(sys.argv[1]):
        print(path)
