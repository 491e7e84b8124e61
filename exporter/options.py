"""`postdiff export`'s arguments, checked without torch.

Everything here imports only the standard library and the torch-free parts of postdiff, so that the
command line rejects a malformed ``--resolution``, an existing ``--out``, an unknown precision or
schedule, or a model folder that is missing or of the wrong layout in a fraction of a second, before
it imports torch and diffusers (seconds). What needs the model itself (the resolution grid, the
weights) is checked by :mod:`postdiff.exporter.export` once the model is loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from postdiff.errors import InputError, ModelSourceError

PRECISIONS = ("fp32", "fp16")
#: the models that need no folder: the embedded MNIST model and seeded random architectures
BUILTIN_SPECS = ("digits", "random:tiny-sd", "random:tiny-lcm", "random:sd15", "random:tiny-sdxl", "random:sdxl-slim",
                 "random:sdxl", "random:tiny-pixart", "random:pixart-slim")
SD_SUBFOLDERS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
# SDXL adds a second tokenizer and a CLIPTextModelWithProjection (its pooled, projected output feeds
# the UNet's "text_time" addition embedding together with the size micro-conditioning).
SDXL_SUBFOLDERS = (*SD_SUBFOLDERS, "text_encoder_2", "tokenizer_2")
# PixArt-alpha: a T5 encoder and a diffusion transformer (PixArtAlphaPipeline's layout).
PIXART_SUBFOLDERS = ("text_encoder", "tokenizer", "transformer", "vae", "scheduler")
# A label-conditioned pixel-space model (the embedded `digits`): no VAE, no text encoder; a table of
# label embeddings feeds the UNet's cross-attention.
LABEL_SUBFOLDERS = ("unet", "scheduler", "label_encoder")


@dataclass(frozen=True)
class ExportOptions:
    """Validated `postdiff export` arguments."""

    source: str
    out: Path
    resolution: tuple[int, int] | None = None  # (height, width) in pixels; None: the model's default
    precision: str = "fp32"
    schedules: tuple[str, ...] = ()  # schedule files or preset names; () = plain generation only
    tuning_space: bool = False  # also every variant `postdiff tune` may pick (profiles/tuning.py)
    lora: str | None = None  # a LoRA .safetensors file fused into the weights before tracing
    lora_scale: float = 1.0
    merged: bool = False  # also the merged UNet graph: every variant as If branches over one set of weights


def parse_resolution(text: str) -> tuple[int, int]:
    """``"512x768"`` -> (512, 768) (height x width); InputError for anything else."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise InputError(f"--resolution '{text}' is not HEIGHTxWIDTH in pixels, e.g. 512x512")
    return int(match.group(1)), int(match.group(2))


def source_layout(source: str) -> str:
    """What ``source`` is: ``"builtin"``, ``"label"`` (a label-model folder), ``"sdxl"`` (an SDXL
    diffusers folder: one with ``text_encoder_2``), ``"pixart"`` (a PixArt-alpha folder: one with
    ``transformer``) or ``"sd"`` (an SD 1.x/2.x diffusers folder).

    Raises:
        ModelSourceError: an unknown built-in name, a missing folder, or a folder of neither layout.
    """
    if source in BUILTIN_SPECS:
        return "builtin"
    if source.startswith("random:"):
        raise ModelSourceError(f"unknown built-in model '{source}'; expected one of {list(BUILTIN_SPECS)} or a folder")
    folder = Path(source)
    if not folder.is_dir():
        raise ModelSourceError(
            f"model folder {folder} does not exist; pass a local diffusers folder "
            f"(with {', '.join(SD_SUBFOLDERS)}) or one of {list(BUILTIN_SPECS)}"
        )
    if all((folder / name).is_dir() for name in LABEL_SUBFOLDERS):
        return "label"
    if (folder / "transformer").is_dir():
        missing = [name for name in PIXART_SUBFOLDERS if not (folder / name).is_dir()]
        if missing:
            raise ModelSourceError(f"{folder} looks like a PixArt-alpha folder (it has transformer) but lacks {missing}; "
                                   f"it needs the subfolders {list(PIXART_SUBFOLDERS)}")
        return "pixart"
    if (folder / "text_encoder_2").is_dir():
        missing = [name for name in SDXL_SUBFOLDERS if not (folder / name).is_dir()]
        if missing:
            raise ModelSourceError(f"{folder} looks like an SDXL folder (it has text_encoder_2) but lacks {missing}; "
                                   f"it needs the subfolders {list(SDXL_SUBFOLDERS)}")
        return "sdxl"
    missing = [name for name in SD_SUBFOLDERS if not (folder / name).is_dir()]
    if missing:
        raise ModelSourceError(
            f"{folder} is not a Stable Diffusion 1.x/2.x diffusers folder: missing {missing}; "
            f"it needs the subfolders {list(SD_SUBFOLDERS)}"
        )
    return "sd"


def check_options(options: ExportOptions) -> None:
    """Every check that needs neither torch nor the model: precision, destination, schedules, source.

    Raises:
        InputError, ScheduleError, ModelSourceError: naming the argument and the fix.
    """
    from postdiff.exporter.bundle import check_destination
    from postdiff.profiles.presets import resolve_schedule

    if options.precision not in PRECISIONS:
        raise InputError(f"--precision '{options.precision}' is not supported; expected one of {list(PRECISIONS)}")
    check_destination(options.out)
    for spec in options.schedules:
        resolve_schedule(spec)
    source_layout(options.source)


def source_id(source: str) -> str:
    """Built-in specs by name, folders by their last path component (no machine paths in bundles)."""
    return source if source in BUILTIN_SPECS else Path(source).resolve().name
