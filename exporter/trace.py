"""Torch modules -> ONNX graphs at static shapes.

Each graph role has a small wrapper module whose ``forward`` takes and returns exactly the tensors
the runtime exchanges, under the names in ``postdiff.runtime.names``. Export uses the
TorchScript-based exporter (``dynamo=False``): it is fast on big UNets and keeps parameter names as
initializer names, which lets graph variants share one weights file.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from onnx.external_data_helper import convert_model_to_external_data

from postdiff.exporter.models import LoadedModel
from postdiff.runtime import names

OPSET = 17


class TextEncoderGraph(torch.nn.Module):
    """input_ids (1, L) int64 -> last_hidden_state (1, L, D)."""

    def __init__(self, model: LoadedModel) -> None:
        super().__init__()
        self.text_encoder = model.text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, return_dict=False)[0]


class UNetGraph(torch.nn.Module):
    """sample (B, C, h, w), timestep (B,) float32, encoder_hidden_states (B, L, D) -> noise_pred."""

    def __init__(self, model: LoadedModel) -> None:
        super().__init__()
        self.unet = model.unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]


class VaeDecoderGraph(torch.nn.Module):
    """latents (1, C, h, w) -> image (1, 3, H, W) in [-1, 1]; the 1/scaling_factor is inside."""

    def __init__(self, model: LoadedModel) -> None:
        super().__init__()
        self.vae = model.vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]


@dataclass(frozen=True)
class GraphPlan:
    """What to export for one graph: the module, example inputs and tensor names."""

    name: str
    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: tuple[str, ...]


def graph_plans(model: LoadedModel, height: int, width: int) -> list[GraphPlan]:
    """The three graphs of a plain bundle at one image size (CFG batch 2 for the UNet).

    Example inputs are seeded so that the parity check at export is reproducible.
    """
    generator = torch.Generator().manual_seed(0)
    max_length = model.tokenizer.model_max_length
    hidden = model.text_encoder.config.hidden_size
    channels = model.unet.config.in_channels
    latent_h, latent_w = height // model.vae_scale_factor, width // model.vae_scale_factor
    ids = torch.randint(0, model.text_encoder.config.vocab_size, (1, max_length), generator=generator)
    sample = torch.randn(2, channels, latent_h, latent_w, generator=generator)
    context = torch.randn(2, max_length, hidden, generator=generator)
    latents = torch.randn(1, model.vae.config.latent_channels, latent_h, latent_w, generator=generator)
    return [
        GraphPlan(names.TEXT_ENCODER, TextEncoderGraph(model), {names.INPUT_IDS: ids}, (names.HIDDEN_STATES,)),
        GraphPlan(names.UNET, UNetGraph(model),
                  {names.SAMPLE: sample, names.TIMESTEP: torch.full((2,), 500.0), names.CONTEXT: context},
                  (names.NOISE_PRED,)),
        GraphPlan(names.VAE_DECODER, VaeDecoderGraph(model), {names.LATENTS: latents}, (names.IMAGE,)),
    ]


def export_onnx(plan: GraphPlan, path: Path) -> None:
    """Trace ``plan.module`` into ``path`` (weights may land in side files if > 2 GB)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow on static shapes
        torch.onnx.export(
            plan.module, tuple(plan.inputs.values()), str(path), input_names=list(plan.inputs),
            output_names=list(plan.outputs), opset_version=OPSET, dynamo=False, do_constant_folding=True,
        )


def move_weights_to_file(src: Path, dst: Path, weights_name: str) -> None:
    """Re-save graph ``src`` as ``dst`` with all large initializers in one file ``weights_name``.

    The TorchScript exporter scatters >2 GB models over hundreds of side files; this gathers them
    into one file beside ``dst``, written in initializer order (deterministic).
    """
    model = onnx.load(str(src), load_external_data=True)
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location=weights_name, size_threshold=1024)
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=weights_name, size_threshold=1024)
