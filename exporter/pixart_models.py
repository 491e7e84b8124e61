"""PixArt-α model sources: local diffusers PixArt-α folders and the seeded random built-ins.

A PixArt-α pipeline (``PixArtAlphaPipeline``) is a diffusion transformer, not a UNet:

* one text encoder, T5 (``T5EncoderModel``, T5-XXL v1.1 in the real model), fed the prompt's ids *and
  its attention mask*, 120 tokens (the pipeline's ``max_sequence_length``), prompts lower-cased and
  stripped (diffusers' ``_text_preprocessing`` without ``clean_caption``);
* the denoiser ``PixArtTransformer2DModel``: patch embedding with a 2-D sin-cos position embedding
  computed from the token grid (``base_size`` = sample_size / patch, ``interpolation_scale``), an
  adaLN-single timestep embedding that also takes the resolution / aspect-ratio micro-conditions
  when ``use_additional_conditions``, a stack of transformer blocks (self-attention, cross-attention
  to the projected T5 states under the T5 mask, MLP), and a learned-sigma output (8 channels: the
  pipeline keeps the epsilon half);
* SD's VAE and ``DPMSolverMultistepScheduler``.

Built-ins (no download; seeded random weights; a T5-style Unigram tokenizer built locally with the
``tokenizers`` library):

* ``random:tiny-pixart``: PixArt-α-1024's layout (sample_size 128, so micro-conditions on and
  interpolation_scale 2; patch 2; learned sigma) at toy widths, 6 blocks; a 32x32 px image. Seconds.
* ``random:pixart-slim``: the benchmark model this machine can export and run: PixArt-XL-2-512's exact
  layout -- 28 blocks, 72-channel heads, patch 2, learned sigma, sample_size 64 (no micro-conditions,
  interpolation_scale 1), 120 T5 tokens -- at 4 heads instead of 16 (width 288 instead of 1152), a
  4-layer T5 of width 512 instead of T5-XXL (24 layers, 4096), SD's VAE at 1/4 width; 512x512 px.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, PixArtTransformer2DModel
from transformers import PreTrainedTokenizerBase, T5Config, T5EncoderModel

from postdiff.errors import ModelSourceError
from postdiff.exporter.models import LoadedModel
from postdiff.exporter.options import PIXART_SUBFOLDERS

MAX_SEQUENCE_LENGTH = 120  # PixArtAlphaPipeline's max_sequence_length
PIXART_GUIDANCE = 4.5  # PixArtAlphaPipeline's default guidance_scale

# PixArt-α's scheduler_config.json (DPM-Solver++ 2M, linear betas, "linspace" spacing).
PIXART_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DPMSolverMultistepScheduler",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_karras_sigmas": False,
    "variance_type": None,
}

# Per built-in: transformer (blocks, heads, head width, sample_size), T5 (width, layers, heads, ff),
# VAE widths, image side in pixels.
_SPECS: dict[str, dict[str, Any]] = {
    "random:tiny-pixart": dict(blocks=6, heads=3, head_dim=8, sample_size=128, t5=(32, 2, 4, 37),
                               vae=(16, 32), pixels=32),
    "random:pixart-slim": dict(blocks=28, heads=4, head_dim=72, sample_size=64, t5=(512, 4, 8, 1024),
                               vae=(32, 64, 128, 128), pixels=512),
}


class PixArtModel(LoadedModel):
    """A PixArt-α pipeline's torch parts. ``unet`` holds the ``PixArtTransformer2DModel`` (the bundle's
    denoiser role is still called ``unet``); ``tokenizer`` is a T5 tokenizer whose rows come with an
    attention mask."""

    @property
    def is_pixart(self) -> bool:
        return True

    @property
    def transformer(self) -> PixArtTransformer2DModel:
        return self.unet

    @property
    def downsample_factor(self) -> int:
        """Latent sides must be multiples of the patch size."""
        return int(self.unet.config.patch_size)

    @property
    def default_resolution(self) -> tuple[int, int]:
        return self.pixels, self.pixels

    @property
    def id_length(self) -> int:
        return MAX_SEQUENCE_LENGTH

    @property
    def context_length(self) -> int:
        return MAX_SEQUENCE_LENGTH

    @property
    def embedded_guidance_dim(self) -> int | None:
        return None

    def tokenize(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), each (1, 120) int64, as ``PixArtAlphaPipeline.encode_prompt`` makes them
        (``clean_caption=False``: lower-cased and stripped)."""
        out = self.tokenizer(prompt.lower().strip(), padding="max_length", max_length=MAX_SEQUENCE_LENGTH,
                             truncation=True, add_special_tokens=True, return_tensors="pt")
        return out.input_ids, out.attention_mask

    def token_ids(self, prompt: str, second: bool = False) -> torch.Tensor:
        return self.tokenize(prompt)[0]

    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """T5's last hidden state (1, 120, D) under the attention mask."""
        return self.text_encoder(ids, attention_mask=mask)[0]

    pixels: int = 0  # set by finish_pixart: the default image side


def build_t5_tokenizer(max_length: int = MAX_SEQUENCE_LENGTH) -> PreTrainedTokenizerBase:
    """A small T5-style SentencePiece-Unigram tokenizer built with the ``tokenizers`` library (offline):
    ids 0/1/2 = ``<pad>``/``</s>``/``<unk>`` as T5's, "▁" word-start pieces, a ``</s>`` appended to every
    row. Wrapped as a ``T5TokenizerFast`` so diffusers' pipeline can use it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0}
    for word in ("a", "the", "red", "cube", "on", "table", "of", "cat", "dog", "blurry", "photo", "in", "and",
                 "an", "astronaut", "riding", "horse", "low", "quality"):
        pieces.setdefault("▁" + word, -2.0 - 0.1 * len(word))
    pieces.setdefault("▁", -3.0)
    for char in string.ascii_lowercase:
        pieces.setdefault("▁" + char, -4.0)
    for char in string.ascii_lowercase + string.digits + string.punctuation:
        pieces.setdefault(char, -5.0)
    tokenizer = Tokenizer(models.Unigram(list(pieces.items()), unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, extra_ids=0, model_max_length=max_length,
                           pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def random_pixart(name: str) -> PixArtModel:
    """A built-in PixArt-α-architecture pipeline with seeded random weights (see the module docstring)."""
    spec = _SPECS[name]
    torch.manual_seed(0)
    tokenizer = build_t5_tokenizer()
    width, layers, heads, ff = spec["t5"]
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=width // heads, d_ff=ff, num_layers=layers, num_heads=heads,
        relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        pad_token_id=0, eos_token_id=1))
    inner = spec["heads"] * spec["head_dim"]
    transformer = PixArtTransformer2DModel(
        sample_size=spec["sample_size"], num_layers=spec["blocks"], patch_size=2, attention_head_dim=spec["head_dim"],
        num_attention_heads=spec["heads"], caption_channels=width, in_channels=4, out_channels=8,
        cross_attention_dim=inner)
    with torch.no_grad():  # random weights: keep the noise prediction near unit scale, as a trained one is
        transformer.proj_out.weight.mul_(0.1)
    vae_widths = spec["vae"]
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_widths,
        layers_per_block=2 if len(vae_widths) == 4 else 1, down_block_types=("DownEncoderBlock2D",) * len(vae_widths),
        up_block_types=("UpDecoderBlock2D",) * len(vae_widths), norm_num_groups=min(32, vae_widths[0] // 2),
        sample_size=spec["pixels"])
    return finish_pixart(name, tokenizer, text_encoder, transformer, vae, PIXART_SCHEDULER_CONFIG)


def load_pixart_folder(folder: Path) -> PixArtModel:
    """A local diffusers PixArt-α folder (``PixArtAlphaPipeline.save_pretrained`` layout: tokenizer,
    text_encoder, transformer, vae, scheduler).

    The tokenizer is read as a fast (``tokenizers``) T5 tokenizer: from its ``tokenizer.json`` where the
    folder has one, else converted from ``spiece.model``, which needs ``sentencepiece`` on the export
    machine (never on the device: the bundle carries the converted ``tokenizer.json``).

    Raises:
        ModelSourceError: a part that does not load, or parts that do not fit together.
    """
    from transformers import T5TokenizerFast

    part = "scheduler"
    try:
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        part = "tokenizer"
        tokenizer = T5TokenizerFast.from_pretrained(folder / "tokenizer", local_files_only=True)
        tokenizer.model_max_length = MAX_SEQUENCE_LENGTH
        part = "text_encoder"
        text_encoder = T5EncoderModel.from_pretrained(folder / "text_encoder", local_files_only=True)
        part = "transformer"
        transformer = PixArtTransformer2DModel.from_pretrained(folder / "transformer", local_files_only=True)
        part = "vae"
        vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True)
    except Exception as exc:  # diffusers/transformers raise many unrelated types
        hint = (" (a tokenizer without tokenizer.json is converted from spiece.model: install sentencepiece and "
                "protobuf on the export machine)" if part == "tokenizer" else "")
        raise ModelSourceError(
            f"{folder / part} could not be loaded ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            f"{hint}; check that the folder is a complete diffusers PixArt-alpha export") from None
    return finish_pixart(str(folder), tokenizer, text_encoder, transformer, vae, scheduler_config)


def finish_pixart(source: str, tokenizer: PreTrainedTokenizerBase, text_encoder: T5EncoderModel,
                  transformer: PixArtTransformer2DModel, vae: AutoencoderKL,
                  scheduler_config: dict[str, Any]) -> PixArtModel:
    """Check that the parts fit together as ``PixArtAlphaPipeline`` needs, and bundle them (fp32, eval)."""
    config = transformer.config
    if config.caption_channels is None or int(config.caption_channels) != int(text_encoder.config.d_model):
        raise ModelSourceError(f"{source}: the transformer projects captions of {config.caption_channels} channels but "
                               f"the T5 encoder is {text_encoder.config.d_model} wide; the folder mixes parts of "
                               "different models")
    out_channels = transformer.out_channels
    if out_channels not in (config.in_channels, 2 * config.in_channels):
        raise ModelSourceError(f"{source}: the transformer outputs {out_channels} channels for {config.in_channels} in; "
                               "expected the same (epsilon) or twice as many (learned sigma)")
    if vae.config.latent_channels != config.in_channels:
        raise ModelSourceError(f"{source}: the VAE has {vae.config.latent_channels} latent channels, the transformer "
                               f"takes {config.in_channels}; the folder mixes parts of different models")
    if tokenizer.pad_token_id is None:
        raise ModelSourceError(f"{source}: the tokenizer has no pad token; T5's pads with <pad> (id 0)")
    for module in (text_encoder, transformer, vae):
        module.float().eval().requires_grad_(False)
    model = PixArtModel(source=source, tokenizer=tokenizer, text_encoder=text_encoder, unet=transformer, vae=vae,
                        scheduler_config=scheduler_config, default_guidance=PIXART_GUIDANCE)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    model.pixels = _SPECS[source]["pixels"] if source in _SPECS else int(config.sample_size) * vae_scale
    return model
