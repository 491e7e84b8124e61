"""SDXL model sources: local diffusers SDXL folders and the seeded random built-ins.

An SDXL pipeline differs from SD 1.x/2.x in its conditioning, not in its UNet's block kinds:

* two tokenizers and two text encoders, a ``CLIPTextModel`` and a ``CLIPTextModelWithProjection``;
  the UNet cross-attends to both encoders' penultimate hidden states, concatenated along the width;
* the UNet's ``addition_embed_type="text_time"`` embedding takes the second encoder's pooled,
  projected output (``text_embeds``) and six size numbers (``time_ids``: original size, crop
  top-left, target size), each of the six through a sinusoidal projection of
  ``addition_time_embed_dim`` channels;
* ``force_zeros_for_empty_prompt`` (model_index.json): an absent negative prompt is all-zero
  conditioning rather than the encoding of "".

Built-ins (no download; seeded random weights; byte-level tokenizers built locally):

* ``random:tiny-sdxl``: SDXL's block layout (first down block without attention, transformer depth
  growing with depth, the mid block as deep as the last stage) at toy widths; exports in seconds.
* ``random:sdxl-slim``: the benchmark model this 24 GB CPU machine can export and run: SDXL's exact
  layout -- three stages, two layers per block, transformer depths (1, 2, 10) with a depth-10 mid
  block, 64-channel attention heads, conditioning widths 2048 / 1280 / 6 x 256 -- at 1/5 of its
  widths (64, 128, 256 channels); VAE at 1/4 width. See docs/sdxl.md.
* ``random:sdxl``: the real SDXL 1.0 architecture (2.6 B-parameter UNet, CLIP-L and OpenCLIP
  bigG-sized encoders). Building it takes ~14 GB in fp32; exporting it needs a workstation (docs/sdxl.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from postdiff.errors import ModelSourceError
from postdiff.exporter.models import LoadedModel, _finish, build_byte_tokenizer
from postdiff.exporter.options import SDXL_SUBFOLDERS

# The scheduler configuration SDXL 1.0 base ships with (Euler, "leading" spacing, steps_offset 1).
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
SDXL_VAE_SCALING = 0.13025  # SDXL's VAE latent scaling factor (SD 1.x: 0.18215)

# Per built-in: UNet widths, attention heads and transformer depths per stage (the mid block takes the
# last depth, as diffusers does), encoder widths / layers / heads (first, second), time-id channels,
# VAE widths, latent side, GroupNorm groups, vocabulary size (None: the byte tokenizer's).
_SPECS: dict[str, dict[str, Any]] = {
    "random:tiny-sdxl": dict(
        channels=(16, 32, 32), heads=(2, 2, 2), depths=(1, 1, 2), encoders=(32, 32), encoder_layers=2,
        encoder_heads=(4, 4), time_dim=8, vae=(16, 32), sample_size=16, groups=8, vocab=None,
    ),
    "random:sdxl-slim": dict(
        channels=(64, 128, 256), heads=(1, 2, 4), depths=(1, 2, 10), encoders=(768, 1280), encoder_layers=2,
        encoder_heads=(12, 20), time_dim=256, vae=(32, 64, 128, 128), sample_size=128, groups=32, vocab=None,
    ),
    "random:sdxl": dict(
        channels=(320, 640, 1280), heads=(5, 10, 20), depths=(1, 2, 10), encoders=(768, 1280),
        encoder_layers=(12, 32), encoder_heads=(12, 20), time_dim=256, vae=(128, 256, 512, 512),
        sample_size=128, groups=32, vocab=49408,
    ),
}


def random_sdxl(name: str) -> LoadedModel:
    """A built-in SDXL-architecture pipeline with seeded random weights (see the module docstring)."""
    spec = _SPECS[name]
    torch.manual_seed(0)
    tokenizer = build_byte_tokenizer()
    tokenizer_2 = build_byte_tokenizer(pad_token="!")  # SDXL's second tokenizer pads with "!" (id 0)
    layers = spec["encoder_layers"]
    layers = layers if isinstance(layers, tuple) else (layers, layers)
    width_1, width_2 = spec["encoders"]
    vocab = spec["vocab"] or len(tokenizer)
    text_encoder = CLIPTextModel(_encoder_config(tokenizer, vocab, width_1, layers[0], spec["encoder_heads"][0],
                                                 hidden_act="quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(_encoder_config(
        tokenizer_2, vocab, width_2, layers[1], spec["encoder_heads"][1], hidden_act="gelu", projection_dim=width_2))
    unet = UNet2DConditionModel(**unet_config(name))
    vae_widths = spec["vae"]
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_widths, layers_per_block=2 if
        len(vae_widths) == 4 else 1, down_block_types=("DownEncoderBlock2D",) * len(vae_widths),
        up_block_types=("UpDecoderBlock2D",) * len(vae_widths), norm_num_groups=min(32, vae_widths[0] // 2),
        sample_size=spec["sample_size"] * 2 ** (len(vae_widths) - 1), scaling_factor=SDXL_VAE_SCALING,
        force_upcast=True,
    )
    return finish_sdxl(name, tokenizer, text_encoder, tokenizer_2, text_encoder_2, unet, vae,
                       SDXL_SCHEDULER_CONFIG, force_zeros=True)


def unet_config(name: str) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` configuration of built-in ``name``: SDXL's block layout at its widths."""
    spec = _SPECS[name]
    width_1, width_2 = spec["encoders"]
    return dict(
        sample_size=spec["sample_size"], in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=spec["channels"],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=spec["depths"], attention_head_dim=spec["heads"], use_linear_projection=True,
        cross_attention_dim=width_1 + width_2, addition_embed_type="text_time",
        addition_time_embed_dim=spec["time_dim"], projection_class_embeddings_input_dim=width_2 + 6 * spec["time_dim"],
        norm_num_groups=spec["groups"],
    )


def _encoder_config(tokenizer: CLIPTokenizer, vocab: int, width: int, layers: int, heads: int,
                    **extra: Any) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=4 * width, num_attention_heads=heads,
                          num_hidden_layers=layers, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)


def load_sdxl_folder(folder: Path) -> LoadedModel:
    """A local diffusers SDXL folder (``StableDiffusionXLPipeline.save_pretrained`` layout).

    Raises:
        ModelSourceError: a missing subfolder, a part that does not load, or a UNet whose addition
            embedding does not fit the encoders.
    """
    missing = [name for name in SDXL_SUBFOLDERS if not (folder / name).is_dir()]
    if missing:
        raise ModelSourceError(f"{folder} looks like an SDXL folder (it has text_encoder_2) but lacks {missing}; "
                               f"it needs the subfolders {list(SDXL_SUBFOLDERS)}")
    part = "model_index.json"
    try:
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text()) if index_path.is_file() else {}
        part = "scheduler"
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        parts: dict[str, Any] = {}
        for part, loader in (("tokenizer", CLIPTokenizer), ("tokenizer_2", CLIPTokenizer),
                             ("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection),
                             ("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
            parts[part] = loader.from_pretrained(folder / part, local_files_only=True)
    except Exception as exc:  # diffusers/transformers raise many unrelated types
        raise ModelSourceError(
            f"{folder / part} could not be loaded ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "check that the folder is a complete diffusers SDXL export"
        ) from None
    # diffusers' StableDiffusionXLPipeline defaults force_zeros_for_empty_prompt to True.
    force_zeros = bool(index.get("force_zeros_for_empty_prompt", True))
    return finish_sdxl(str(folder), parts["tokenizer"], parts["text_encoder"],
                       parts["tokenizer_2"], parts["text_encoder_2"], parts["unet"], parts["vae"], scheduler_config,
                       force_zeros)


def finish_sdxl(source: str, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, tokenizer_2: CLIPTokenizer,
                text_encoder_2: CLIPTextModelWithProjection, unet: UNet2DConditionModel, vae: AutoencoderKL,
                scheduler_config: dict[str, Any], force_zeros: bool) -> LoadedModel:
    """Check that the parts fit together as diffusers' SDXL pipeline needs, and bundle them (fp32, eval)."""
    config = unet.config
    if config.addition_embed_type != "text_time":
        raise ModelSourceError(f"{source}: the UNet's addition_embed_type is {config.addition_embed_type!r}; an "
                               "SDXL pipeline needs 'text_time' (pooled text embeddings + size conditioning)")
    pooled = int(text_encoder_2.config.projection_dim)
    expected = int(unet.add_embedding.linear_1.in_features)
    if pooled + 6 * int(config.addition_time_embed_dim) != expected:
        raise ModelSourceError(
            f"{source}: the UNet's addition embedding takes {expected} features but text_encoder_2's projection "
            f"({pooled}) + 6 x addition_time_embed_dim ({config.addition_time_embed_dim}) give "
            f"{pooled + 6 * int(config.addition_time_embed_dim)}; the folder mixes parts of different models"
        )
    width = int(text_encoder.config.hidden_size) + int(text_encoder_2.config.hidden_size)
    if width != int(config.cross_attention_dim):
        raise ModelSourceError(f"{source}: the encoders' widths add up to {width} but the UNet cross-attends to "
                               f"{config.cross_attention_dim}; the folder mixes parts of different models")
    if tokenizer.model_max_length != tokenizer_2.model_max_length:
        raise ModelSourceError(f"{source}: the tokenizers pad to {tokenizer.model_max_length} and "
                               f"{tokenizer_2.model_max_length} tokens; SDXL's two must agree")
    model = _finish(source, tokenizer, text_encoder, unet, vae, scheduler_config)
    text_encoder_2.float().eval().requires_grad_(False)
    model.tokenizer_2 = tokenizer_2
    model.text_encoder_2 = text_encoder_2
    model.force_zeros_for_empty_prompt = force_zeros
    model.default_guidance = 5.0  # StableDiffusionXLPipeline's default guidance_scale
    return model
