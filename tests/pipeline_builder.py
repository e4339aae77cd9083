"""Build random BLIP-Diffusion pipelines in code: tiny ones for tests and CI, full-size ones for benchmarks.

Nothing here touches the network: the CLIP and BERT tokenizers are generated from small local
vocabularies, and every model is randomly initialised with a fixed seed from a spec in ``configs/``.
The pipelines are saved with ``save_pretrained`` so that they are loaded back through
``blip_helper.load_pipeline``, exactly like a local copy of the hub repositories.

    python tests/pipeline_builder.py OUTPUT_DIR [tiny|full_size]
    # writes OUTPUT_DIR/blipdiffusion and OUTPUT_DIR/blipdiffusion-controlnet
"""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import torch

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


# Words given BPE merges, so that the notebook's prompts and the default negative prompt (69 tokens)
# fit in the text encoder's 77 positions; merges of different words interfere, so not every word
# ends up as one token. Any other text still tokenizes, one byte per token.
CLIP_WORDS = (
    "a the of on in and with dog cat cup horse coffee teapot rocket astronaut swimming underwater marble "
    "table meadow beach running field over under exposure saturated duplicate out frame lowres cropped worst "
    "quality low jpeg artifacts morbid mutilated ugly bad anatomy proportions deformed blurry"
).split()


def _word_merges(word: str) -> list[str]:
    """BPE merges that build ``word</w>`` from its characters, left to right."""
    pieces = [*word[:-1], word[-1] + "</w>"]
    merges, current = [], pieces[0]
    for piece in pieces[1:]:
        merges.append(f"{current} {piece}")
        current += piece
    return merges


def write_clip_tokenizer(directory: Path) -> Path:
    """A byte-level CLIP tokenizer with merges for ``CLIP_WORDS``: every text tokenizes, offline."""
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges = list(dict.fromkeys(m for word in CLIP_WORDS for m in _word_merges(word)))
    vocab += list(dict.fromkeys(m.replace(" ", "") for m in merges if m.replace(" ", "") not in vocab))
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory


def write_bert_tokenizer(directory: Path) -> Path:
    """A word-piece BERT tokenizer over single characters and a few words."""
    directory.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "dog", "cat", "cup", "horse", "rocket", "teapot"]
    words += list(string.ascii_lowercase) + ["##" + c for c in string.ascii_lowercase]
    # 63 tokens, and the Q-Former adds [DEC] as id 63: every spec's Q-Former vocabulary is larger.
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    return directory


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def load_spec(spec: str | Path) -> dict:
    """A builder spec: ``"tiny"``, ``"full_size"`` (files in ``configs/``) or the path of such a JSON file."""
    path = Path(spec) if Path(spec).suffix == ".json" else CONFIG_DIR / f"{spec}.json"
    return json.loads(path.read_text())


def _components(spec: dict, bert_tokenizer_dir: Path, clip_tokenizer_dir: Path) -> dict:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer
    from transformers.models.blip_2.configuration_blip_2 import Blip2Config

    from blip_helper import BlipImageProcessor, Blip2QFormerModel, ContextCLIPTextModel

    torch.manual_seed(SEED)
    qformer_config = Blip2Config(**spec["qformer"])
    # Blip2QFormerModel loads its BERT tokenizer from here (bert-base-uncased from the hub by default).
    qformer_config.tokenizer = str(bert_tokenizer_dir.resolve())
    return {
        "tokenizer": CLIPTokenizer.from_pretrained(clip_tokenizer_dir),
        "text_encoder": ContextCLIPTextModel(CLIPTextConfig(**spec["text_encoder"])).eval(),
        "vae": AutoencoderKL(**spec["vae"]).eval(),
        "unet": UNet2DConditionModel(**spec["unet"]).eval(),
        "scheduler": PNDMScheduler(**spec["scheduler"]),
        "qformer": Blip2QFormerModel(qformer_config).eval(),
        "image_processor": BlipImageProcessor(**spec["image_processor"]),
        "ctx_begin_pos": spec["ctx_begin_pos"],
        "mean": spec["mean"],
        "std": spec["std"],
    }


def _controlnet(spec: dict):
    from diffusers import ControlNetModel

    torch.manual_seed(SEED + 1)
    controlnet = ControlNetModel(**spec["controlnet"])
    # A fresh ControlNet starts with zero convolutions, i.e. no effect at all: randomise them so that
    # tests can tell whether the control signal reaches the UNet.
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block, controlnet.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.normal_(0.0, conv.weight[0].numel() ** -0.5)
            conv.bias.normal_(0.0, 0.3)
    return controlnet.eval()


def build_pipelines(output_dir: str | Path, spec: str | Path = "tiny") -> tuple[Path, Path]:
    """Write random BLIP-Diffusion and BLIP-Diffusion-ControlNet pipelines; return their directories.

    As on the hub, both pipelines share the Q-Former, text encoder, UNet and VAE weights; the
    ControlNet pipeline adds a ControlNet. A pipeline already written is kept.
    """
    from blip_helper import BlipDiffusionControlNetPipeline, BlipDiffusionPipeline

    output_dir = Path(output_dir)
    base_dir, controlnet_dir = output_dir / "blipdiffusion", output_dir / "blipdiffusion-controlnet"
    if (base_dir / "model_index.json").exists() and (controlnet_dir / "model_index.json").exists():
        return base_dir, controlnet_dir
    spec = load_spec(spec)
    components = _components(
        spec, write_bert_tokenizer(output_dir / "bert-tokenizer"), write_clip_tokenizer(output_dir / "clip-tokenizer")
    )
    # model_index.json is written last by save_pretrained, so a half-written pipeline is rebuilt.
    BlipDiffusionPipeline(**components).save_pretrained(base_dir)
    BlipDiffusionControlNetPipeline(**components, controlnet=_controlnet(spec)).save_pretrained(controlnet_dir)
    return base_dir, controlnet_dir


def build_tiny_pipelines(output_dir: str | Path) -> tuple[Path, Path]:
    return build_pipelines(output_dir, "tiny")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    for path in build_pipelines(*sys.argv[1:]):
        print(path)
