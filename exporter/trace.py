"""Torch modules -> ONNX graphs at static shapes.

Each graph has a small wrapper module whose ``forward`` takes and returns exactly the tensors the
runtime exchanges, under the names in ``postdiff.runtime.names``. UNet graphs, plain or cache
variants, all come from :class:`~postdiff.exporter.layered_unet.LayeredUNet`. Export uses the
TorchScript-based exporter (``dynamo=False``): it is fast on big UNets.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from postdiff.exporter.layered_unet import LayeredUNet, LayerPlan
from postdiff.exporter.models import LoadedModel
from postdiff.runtime import names
from postdiff.runtime.manifest import UNetVariant

OPSET = 17


class TextEncoderGraph(torch.nn.Module):
    """input_ids (1, L) int64 -> last_hidden_state (1, L', D) (CLIP text or a label table)."""

    def __init__(self, model: LoadedModel) -> None:
        super().__init__()
        self.text_encoder = model.text_encoder
        self._encode = model.encode_ids

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._encode(input_ids)


class SecondTextEncoderGraph(torch.nn.Module):
    """SDXL's second encoder: input_ids (1, L) int64 -> (penultimate hidden states (1, L, D2),
    pooled projection ``text_embeds`` (1, P))."""

    def __init__(self, model: LoadedModel) -> None:
        super().__init__()
        self.text_encoder_2 = model.text_encoder_2
        self._encode = model.encode_ids_2

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._encode(input_ids)


class VaeDecoderGraph(torch.nn.Module):
    """latents (1, C, h, w) -> image (1, 3, H, W) in [-1, 1]; the latent unscaling is inside:
    ``latents / scaling_factor``, or ``latents * std / scaling_factor + mean`` for VAEs whose config
    carries ``latents_mean`` / ``latents_std`` (as diffusers' SDXL pipeline decodes)."""

    def __init__(self, model: LoadedModel) -> None:
        super().__init__()
        self.vae = model.vae
        config = model.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        channels = config.latent_channels
        self._stats = None if mean is None or std is None else (
            torch.tensor(mean, dtype=torch.float32).reshape(1, channels, 1, 1),
            torch.tensor(std, dtype=torch.float32).reshape(1, channels, 1, 1))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        scaling = self.vae.config.scaling_factor
        if self._stats is None:
            latents = latents / scaling
        else:
            mean, std = (s.to(latents.dtype) for s in self._stats)
            latents = latents * std / scaling + mean
        return self.vae.decode(latents, return_dict=False)[0]


@dataclass(frozen=True)
class GraphPlan:
    """What to export for one graph: the module, example inputs and tensor names."""

    name: str
    role: str
    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: tuple[str, ...]
    variant: UNetVariant | None = None
    dynamic: bool = False  # batch and spatial sides left free (the branches of the merged UNet)


def text_and_decoder_plans(model: LoadedModel, height: int, width: int) -> list[GraphPlan]:
    """The text encoder and (latent models only) the VAE decoder graphs at one image size, with
    seeded example inputs."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.vocab_size, (1, model.id_length), generator=generator)
    if model.is_pixart:  # T5 under its attention mask (a padded row: the first 17 tokens kept)
        from postdiff.exporter.layered_pixart import T5EncoderGraph

        mask = (torch.arange(model.id_length)[None, :] < 17).long()
        plans = [GraphPlan(names.TEXT_ENCODER, names.TEXT_ENCODER, T5EncoderGraph(model.text_encoder),
                           {names.INPUT_IDS: ids, names.ATTENTION_MASK: mask}, (names.HIDDEN_STATES,))]
    else:
        plans = [GraphPlan(names.TEXT_ENCODER, names.TEXT_ENCODER, TextEncoderGraph(model), {names.INPUT_IDS: ids},
                           (names.HIDDEN_STATES,))]
    if model.is_sdxl:
        plans.append(GraphPlan(names.TEXT_ENCODER_2, names.TEXT_ENCODER_2, SecondTextEncoderGraph(model),
                               {names.INPUT_IDS: ids.clone()}, (names.HIDDEN_STATES, names.TEXT_EMBEDS)))
    if model.vae is not None:
        latent_h, latent_w = height // model.vae_scale_factor, width // model.vae_scale_factor
        latents = torch.randn(1, model.vae.config.latent_channels, latent_h, latent_w, generator=generator)
        plans.append(GraphPlan(names.VAE_DECODER, names.VAE_DECODER, VaeDecoderGraph(model),
                               {names.LATENTS: latents}, (names.IMAGE,)))
    return plans


def unet_plan(model: LoadedModel, variant: UNetVariant, dynamic: bool = False) -> GraphPlan:
    """The UNet graph computing ``variant``, with seeded example inputs (timestep 500); ``dynamic``:
    traced at ``variant``'s shapes but with batch and spatial sides free (:func:`dynamic_axes`)."""
    plan = LayerPlan(deep=variant.deep, branch=variant.branch, xattn=variant.xattn)
    if model.is_pixart:
        from postdiff.exporter.layered_pixart import LayeredPixArt

        module = LayeredPixArt(model.unet, plan, model.vae_scale_factor)
    else:
        module = LayeredUNet(model.unet, plan)
    generator = torch.Generator().manual_seed(0)
    example = module.example_inputs(variant.batch, variant.latent[0], variant.latent[1],
                                    model.context_length, generator)
    inputs = dict(zip(module.input_names, example))
    inputs[names.TIMESTEP] = torch.full((variant.batch,), 500.0, dtype=inputs[names.TIMESTEP].dtype)
    if names.TIME_IDS in inputs:  # SDXL size ids as the pipeline makes them at this latent size
        side_h, side_w = (s * model.vae_scale_factor for s in variant.latent)
        inputs[names.TIME_IDS] = torch.tensor([[side_h, side_w, 0, 0, side_h, side_w]] * variant.batch,
                                              dtype=torch.float32)
    name = names.unet_graph_name(variant.latent, variant.batch, variant.deep, variant.branch, variant.xattn)
    return GraphPlan(name, names.UNET, module, inputs, tuple(module.output_names), variant, dynamic)


def dynamic_axes(tensor: str) -> dict[int, str]:
    """The free axes of a UNet tensor in a dynamic trace: batch everywhere, height and width of the
    latent-shaped tensors, the token count of the cross-attention maps. Every axis gets its own
    symbol (``tensor#axis``): TensorRT's parser takes two equal symbols to mean equal sides, which a
    placeholder fed to an unused input would break."""
    return {axis: f"{tensor}#{axis}" for axis in names.free_axes(tensor)}


def half_precision(plan: GraphPlan) -> GraphPlan:
    """``plan`` with its module and floating-point example inputs in fp16 (the timestep and SDXL's
    size ids stay fp32: Euler's fractional timesteps would round in half precision, and both go
    through float32 sinusoidal projections)."""
    plan.module.half()
    keep = (names.TIMESTEP, names.TIME_IDS)
    inputs = {k: v.half() if v.is_floating_point() and k not in keep else v for k, v in plan.inputs.items()}
    return GraphPlan(plan.name, plan.role, plan.module, inputs, plan.outputs, plan.variant, plan.dynamic)


def export_onnx(plan: GraphPlan, path: Path) -> None:
    """Trace ``plan.module`` into ``path`` (weights may land in side files if > 2 GB)."""
    axes = {name: dynamic_axes(name) for name in (*plan.inputs, *plan.outputs)} if plan.dynamic else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow on static shapes
        torch.onnx.export(
            plan.module, tuple(plan.inputs.values()), str(path), input_names=list(plan.inputs),
            output_names=list(plan.outputs), opset_version=OPSET, dynamo=False, do_constant_folding=True,
            dynamic_axes=axes,
        )
