"""Fusing a LoRA into the model before export: W <- W + scale * (alpha / r) * B A.

A LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3) adds to a
weight W (out x in, or out x in x k x k for a convolution) the product of an up matrix B (out x r)
and a down matrix A (r x in ...), scaled by alpha / r; ``--lora-scale`` multiplies it again, as
diffusers' ``fuse_lora(lora_scale=...)`` does. Fused, the bundle's graphs are ordinary graphs:
no runtime support, no extra cost per step.

Formats read (one ``.safetensors`` file, as diffusers saves and loads them):

* diffusers / PEFT: ``unet.<module>.lora_A.weight`` and ``.lora_B.weight`` (``text_encoder.`` for
  the text encoder), alpha from the file's ``lora_adapter_metadata`` (``unet.lora_alpha``,
  ``unet.r``) when present, else alpha = r;
* diffusers' older attention-processor names: ``<prefix>.<module>.lora.down.weight`` / ``.lora.up.weight``;
* kohya / A1111 (LCM-LoRA as published): ``lora_unet_<module with _ for .>.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha``; ``lora_te_...`` for the text encoder.

Anything else (DoRA magnitudes, per-module rank/alpha patterns, keys naming no module of the model)
is an error naming the key: a LoRA is fused whole or not at all.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from postdiff.exporter.models import LoadedModel
from postdiff.errors import InputError, ModelSourceError

_COMPONENTS = {"unet": "unet", "text_encoder": "text_encoder"}
_KOHYA = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
_SUFFIXES = {  # key suffix -> which factor
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_down.weight": "down", ".lora_up.weight": "up",
    ".alpha": "alpha",
}


@dataclass
class _Factors:
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None


def _bad(path: Path, what: str) -> ModelSourceError:
    return ModelSourceError(f"LoRA {path}: {what}; expected a diffusers/PEFT or kohya LoRA .safetensors file "
                            "for this model")


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise ModelSourceError(f"LoRA file {path} does not exist; pass the .safetensors file of a diffusers LoRA")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises several unrelated types
        raise ModelSourceError(f"LoRA file {path} could not be read ({type(exc).__name__}: {exc}); pass a "
                               ".safetensors file") from None
    return tensors, metadata


def _module_index(model: LoadedModel, component: str) -> dict[str, str]:
    """kohya name (dots as underscores) -> module path, for every module of ``component``."""
    module = getattr(model, component)
    return {name.replace(".", "_"): name for name, _ in module.named_modules() if name}


def _alphas(path: Path, metadata: dict[str, str]) -> dict[str, float]:
    """Per-component alpha from diffusers' adapter metadata (``unet.lora_alpha``), if recorded."""
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        raise _bad(path, "its lora_adapter_metadata is not JSON") from None
    alphas = {}
    for component in _COMPONENTS:
        for pattern in ("alpha_pattern", "rank_pattern"):
            if meta.get(f"{component}.{pattern}"):
                raise _bad(path, f"it sets a per-module {pattern} for the {component}, which is not supported")
        if meta.get(f"{component}.use_dora") or meta.get(f"{component}.use_rslora"):
            raise _bad(path, f"it is a DoRA / rsLoRA adapter for the {component}, which is not supported")
        if f"{component}.lora_alpha" in meta:
            alphas[component] = float(meta[f"{component}.lora_alpha"])
    return alphas


def _group(path: Path, model: LoadedModel, tensors: dict[str, torch.Tensor]) -> dict[tuple[str, str], _Factors]:
    groups: dict[tuple[str, str], _Factors] = {}
    indexes: dict[str, dict[str, str]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise _bad(path, f"key '{key}' is not a LoRA factor (lora_A/lora_B, lora.down/lora.up, "
                             "lora_down/lora_up or alpha)")
        stem = key[: -len(suffix)]
        kohya = next((p for p in _KOHYA if stem.startswith(p)), None)
        if kohya is not None:
            component = _KOHYA[kohya]
            index = indexes.setdefault(component, _module_index(model, component))
            name = index.get(stem[len(kohya):])
            if name is None:
                raise _bad(path, f"key '{key}' names no module of the model's {component}")
        else:
            component, _, name = stem.partition(".")
            if component not in _COMPONENTS or not name:
                raise _bad(path, f"key '{key}' starts with neither 'unet.' nor 'text_encoder.'")
        if getattr(model, component, None) is None:
            raise _bad(path, f"key '{key}' is for the {component}, which this model does not have")
        factors = groups.setdefault((component, name), _Factors())
        kind = _SUFFIXES[suffix]
        if kind == "alpha":
            factors.alpha = float(value.float().item())
        else:
            setattr(factors, kind, value.float())
    return groups


@torch.no_grad()
def fuse_lora(model: LoadedModel, path: Path, scale: float = 1.0) -> int:
    """Fuse the LoRA in ``path`` into ``model``'s weights, in place; returns the number of layers changed.

    Raises:
        ModelSourceError: the file is missing or unreadable, or is not a LoRA of this model.
    """
    path = Path(path)
    tensors, metadata = _read(path)
    if not tensors:
        raise _bad(path, "it holds no tensors")
    alphas = _alphas(path, metadata)
    groups = _group(path, model, tensors)
    changed = 0
    for (component, name), factors in sorted(groups.items()):
        where = f"{component}.{name}"
        if factors.down is None or factors.up is None:
            raise _bad(path, f"{where} has only one of its two factors")
        try:
            module = getattr(model, component).get_submodule(name)
        except AttributeError:
            raise _bad(path, f"{where} is not a module of the model") from None
        weight = getattr(module, "weight", None)
        rank = factors.down.shape[0]
        if weight is None or factors.up.shape[0] != weight.shape[0] or factors.up.shape[1] != rank:
            raise _bad(path, f"{where}: factors {tuple(factors.up.shape)} x {tuple(factors.down.shape)} do not fit "
                             f"a weight of shape {tuple(weight.shape) if weight is not None else None}")
        delta = (factors.up.flatten(1) @ factors.down.flatten(1)).reshape(weight.shape)
        alpha = factors.alpha if factors.alpha is not None else alphas.get(component, float(rank))
        weight += (scale * alpha / rank) * delta.to(weight.dtype)
        changed += 1
    return changed


def check_lora_scale(scale: float) -> None:
    """--lora-scale must be a finite number (InputError otherwise)."""
    if not math.isfinite(scale):
        raise InputError(f"--lora-scale {scale} is not a finite number; use e.g. 1.0 (the LoRA as trained)")
