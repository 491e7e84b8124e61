"""Model sources: a local diffusers folder, or a built-in spec that needs no download.

``load_model`` returns the torch modules the exporter traces. Nothing here touches the network:
folders load with ``local_files_only=True`` and the built-in specs are created from seeded random
weights with tokenizers built locally.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from postdiff.errors import ModelSourceError
from postdiff.exporter.options import source_layout

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"

# The scheduler configuration Stable Diffusion 1.x ships with (PNDM, "leading" spacing).
SD1_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


# The scheduler configuration LCM-distilled SD 1.5 checkpoints ship (LCMScheduler, 50 original steps).
LCM_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "LCMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_scaling": 10.0,
    "timestep_spacing": "leading",
    "trained_betas": None,
}


class LabelEncoder(torch.nn.Module):
    """Label id -> its rows of the embedding table: ids (1, 1) int64 -> (1, L, D)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids[:, 0]]


@dataclass
class LoadedModel:
    """The torch parts of a diffusion pipeline, in eval mode, fp32.

    Text-conditioned models (SD 1.x/2.x) have a CLIP ``tokenizer`` and ``text_encoder`` and a
    ``vae``; label-conditioned pixel-space models (``digits``) have ``labels`` and a
    :class:`LabelEncoder`, and no VAE (their samples are the images).
    """

    source: str
    tokenizer: CLIPTokenizer | None
    text_encoder: torch.nn.Module
    unet: UNet2DConditionModel
    vae: AutoencoderKL | None
    scheduler_config: dict[str, Any]
    labels: tuple[str, ...] = ()  # label prompts by id; the null label (unconditional) is id len(labels)
    default_guidance: float = 7.5
    # SDXL only: the second tokenizer and text encoder, and the pipeline's force_zeros_for_empty_prompt
    # (model_index.json; diffusers' default True): an absent negative prompt is all-zero conditioning.
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    force_zeros_for_empty_prompt: bool = False

    @property
    def is_sdxl(self) -> bool:
        """Two text encoders and a UNet with SDXL's "text_time" addition embedding."""
        return self.text_encoder_2 is not None

    @property
    def is_pixart(self) -> bool:
        """A PixArt-alpha pipeline (a T5 encoder and a diffusion transformer: exporter/pixart_models.py)."""
        return False

    @property
    def embedded_guidance_dim(self) -> int | None:
        """Length of the guidance-scale embedding the denoiser takes (LCM), None for classifier-free guidance."""
        return self.unet.config.time_cond_proj_dim

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side (1 in pixel space)."""
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def downsample_factor(self) -> int:
        """Latent sides must be multiples of this: 2 ** (number of UNet downsamplers)."""
        return 2 ** sum(1 for block in self.unet.down_blocks if block.downsamplers)

    @property
    def default_resolution(self) -> tuple[int, int]:
        """The image size the UNet was configured for, (height, width) in pixels."""
        side = self.unet.config.sample_size * self.vae_scale_factor
        return side, side

    @property
    def id_length(self) -> int:
        """Length of the token-id row the text encoder takes."""
        return 1 if self.labels else int(self.tokenizer.model_max_length)

    @property
    def context_length(self) -> int:
        """Length L' of the conditioning sequence the UNet cross-attends to."""
        return int(self.text_encoder.table.shape[1]) if self.labels else int(self.tokenizer.model_max_length)

    @property
    def vocab_size(self) -> int:
        """Number of distinct ids the text encoder accepts."""
        return len(self.labels) + 1 if self.labels else int(self.text_encoder.config.vocab_size)

    def token_ids(self, prompt: str, second: bool = False) -> torch.Tensor:
        """The id row (1, L) the text encoder graph takes for ``prompt`` (as the runtime makes it);
        ``second``: SDXL's second tokenizer."""
        if self.labels:
            from postdiff.runtime.tokenizer import label_id

            return torch.tensor([[label_id(prompt, self.labels)]], dtype=torch.int64)
        tokenizer = self.tokenizer_2 if second else self.tokenizer
        return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Conditioning states (1, L', D) for an id row (SDXL: the first encoder's penultimate layer)."""
        if self.labels:
            return self.text_encoder(ids)
        if self.is_sdxl:  # SDXL cross-attends to the penultimate layer, without the final LayerNorm
            return self.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        return self.text_encoder(ids, return_dict=False)[0]

    def encode_ids_2(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's second encoder: (penultimate hidden states (1, L, D2), pooled projection (1, P))."""
        out = self.text_encoder_2(ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds


def load_model(source: str) -> LoadedModel:
    """Load ``source``: a built-in spec name or a local diffusers folder.

    Raises:
        ModelSourceError: unknown spec, or a folder that is not a readable SD 1.x/2.x pipeline.
    """
    if source == "digits":
        return _load_label_folder(BUILTIN_DIR / "digits", "digits")
    if source == "random:tiny-sd":
        return _random_tiny_sd()
    if source == "random:tiny-lcm":
        return _random_tiny_sd(lcm=True)
    if source == "random:sd15":
        return _random_sd15()
    if source in _SDXL_BUILTINS:
        from postdiff.exporter.sdxl_models import random_sdxl

        return random_sdxl(source)
    if source in ("random:tiny-pixart", "random:pixart-slim"):
        from postdiff.exporter.pixart_models import random_pixart

        return random_pixart(source)
    layout = source_layout(source)  # ModelSourceError: unknown built-in, missing folder, wrong layout
    if layout == "pixart":
        from postdiff.exporter.pixart_models import load_pixart_folder

        return load_pixart_folder(Path(source))
    if layout == "label":
        return _load_label_folder(Path(source), source)
    if layout == "sdxl":
        from postdiff.exporter.sdxl_models import load_sdxl_folder

        return load_sdxl_folder(Path(source))
    return _load_folder(Path(source))


def _load_folder(folder: Path) -> LoadedModel:
    """An SD 1.x/2.x diffusers folder (its layout already checked by :func:`source_layout`)."""
    part = "scheduler"
    try:
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        part = "tokenizer"
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        part = "text_encoder"
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
        part = "unet"
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
        part = "vae"
        vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True)
    except Exception as exc:  # diffusers/transformers raise many unrelated types
        raise ModelSourceError(
            f"{folder / part} could not be loaded ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "check that the folder is a complete diffusers export"
        ) from None
    return _finish(str(folder), tokenizer, text_encoder, unet, vae, scheduler_config)


def _load_label_folder(folder: Path, source: str) -> LoadedModel:
    """A label-conditioned pixel-space model: unet/, scheduler/, label_encoder/ (config.json +
    safetensors table of shape (labels + 1, L, D), the last row the null label)."""
    from safetensors.torch import load_file

    if not folder.is_dir():
        raise ModelSourceError(f"model folder {folder} does not exist; the built-in `digits` model ships with "
                               "postdiff's source tree: reinstall it, or train it with tools/train_digits.py")
    part = "label_encoder"
    try:
        config = json.loads((folder / "label_encoder" / "config.json").read_text())
        table = load_file(str(folder / "label_encoder" / config["file"]))[config["tensor"]]
        part = "scheduler"
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        part = "unet"
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    except Exception as exc:  # safetensors/diffusers raise many unrelated types
        raise ModelSourceError(f"{folder / part} could not be loaded ({type(exc).__name__}: {exc}); check that "
                               "the folder is a complete label-conditioned model") from None
    labels = tuple(config["labels"][: config["null_label"]])
    if config["null_label"] != len(labels) or table.shape[0] != len(labels) + 1:
        raise ModelSourceError(f"{folder / 'label_encoder'}: the null label must be the last of "
                               f"{table.shape[0]} rows (got null_label {config['null_label']})")
    model = _finish(source, None, LabelEncoder(table.float()), unet, None, scheduler_config)
    model.labels = labels
    model.default_guidance = float(config.get("default_guidance", 3.0))
    return model


_SDXL_BUILTINS = ("random:tiny-sdxl", "random:sdxl-slim", "random:sdxl")


def _finish(source: str, tokenizer: CLIPTokenizer | None, text_encoder: torch.nn.Module,
            unet: UNet2DConditionModel, vae: AutoencoderKL | None, scheduler_config: dict[str, Any]) -> LoadedModel:
    for module in (text_encoder, unet, vae):
        if module is not None:
            module.float().eval().requires_grad_(False)
    return LoadedModel(source, tokenizer, text_encoder, unet, vae, dict(scheduler_config))


def build_byte_tokenizer(max_length: int = 77, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIP BPE tokenizer built locally: the 512 byte-level symbols, a few merges, BOS/EOS.

    Real checkpoints bring their own tokenizer; the built-in random models only need ids that are
    deterministic and inside the text encoder's vocabulary.
    """
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for symbol in symbols:
            vocab[symbol + suffix] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("i", "n"), ("a", "n"), ("e", "r"), ("o", "n")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, pad_token=pad_token)


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable character table (256 symbols)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _text_encoder(tokenizer: CLIPTokenizer, **config: Any) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_position_embeddings=77, **config,
    ))


def _random_tiny_sd(lcm: bool = False) -> LoadedModel:
    """A few-hundred-kB SD-shaped pipeline: exports in seconds, for tests. With ``lcm`` it is
    shaped as an LCM-distilled one: the UNet takes a 32-long guidance embedding
    (``time_cond_proj_dim``) and the model ships LCMScheduler."""
    torch.manual_seed(0)
    tokenizer = build_byte_tokenizer()
    text_encoder = _text_encoder(tokenizer, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                                 num_attention_heads=4, num_hidden_layers=2)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
        time_cond_proj_dim=32 if lcm else None,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=32,
    )
    if lcm:
        model = _finish("random:tiny-lcm", tokenizer, text_encoder, unet, vae, LCM_SCHEDULER_CONFIG)
        model.default_guidance = 8.0  # LCM's usual w + 1 (diffusers' LCM examples use 8.0)
        return model
    return _finish("random:tiny-sd", tokenizer, text_encoder, unet, vae, SD1_SCHEDULER_CONFIG)


def _random_sd15() -> LoadedModel:
    """The Stable Diffusion 1.5 architecture (860 M-parameter UNet) with seeded random weights."""
    torch.manual_seed(0)
    tokenizer = build_byte_tokenizer()
    text_encoder = _text_encoder(tokenizer, vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                 num_attention_heads=12, num_hidden_layers=12, hidden_act="quick_gelu",
                                 projection_dim=768)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
    )
    return _finish("random:sd15", tokenizer, text_encoder, unet, vae, SD1_SCHEDULER_CONFIG)
