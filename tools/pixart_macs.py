"""Transformer MACs of a schedule on PixArt-alpha's architecture, and the real model's sizes, without weights.

``python -m postdiff.tools.pixart_macs --schedule baseline --schedule postdiff-pixart`` builds the
PixArt-XL-2-1024-MS transformer (``PIXART_ALPHA_1024``, the config diffusers' PixArt-alpha checkpoints
ship) on torch's meta device, runs every :class:`~postdiff.exporter.layered_pixart.LayeredPixArt` variant
the schedules evaluate on meta tensors under ``torch.utils.flop_counter.FlopCounterMode`` and prints each
schedule's total (FLOPs / 2: linear layers and both attention matmuls, the patch convolution; norms,
softmax and elementwise ops are not counted), CFG batches counted twice. ``--sizes`` also prints the
parameter counts and fp32/fp16 bytes of the real T5-XXL encoder, transformer and VAE decoder, counted
from their configs on the meta device (docs/pixart.md). ``--model random:pixart-slim`` counts the
benchmark model instead, ``--model random:tiny-pixart`` the test model (equal to what
``postdiff schedule --explain`` reports from its exported graphs, tested).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from diffusers import PixArtTransformer2DModel

from postdiff.exporter.layered_pixart import LayeredPixArt
from postdiff.exporter.layered_unet import LayerPlan
from postdiff.tools.arch_macs import MetaMacs
from postdiff.profiles.presets import resolve_schedule
from postdiff.runtime import names

CONTEXT_LEN = 120
# PixArt-XL-2-1024-MS transformer/config.json (diffusers' PixArt-alpha 1024 checkpoint).
PIXART_ALPHA_1024: dict[str, Any] = dict(
    sample_size=128, num_layers=28, patch_size=2, attention_head_dim=72, num_attention_heads=16,
    caption_channels=4096, in_channels=4, out_channels=8, cross_attention_dim=1152, attention_bias=True,
    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
    norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None, use_additional_conditions=None)
# google/t5-v1_1-xxl's encoder (PixArt-alpha's text_encoder/config.json).
T5_XXL: dict[str, Any] = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                              feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
VAE_SCALE = 8


def _builtin_config(model: str) -> tuple[dict[str, Any], int]:
    """(transformer config, VAE scale) of a built-in PixArt spec, read from the built-in on the meta device."""
    from postdiff.exporter import pixart_models

    spec = pixart_models._SPECS[model]
    inner = spec["heads"] * spec["head_dim"]
    config = dict(sample_size=spec["sample_size"], num_layers=spec["blocks"], patch_size=2,
                  attention_head_dim=spec["head_dim"], num_attention_heads=spec["heads"], caption_channels=spec["t5"][0],
                  in_channels=4, out_channels=8, cross_attention_dim=inner)
    return config, 2 ** (len(spec["vae"]) - 1)


class PixArtMacs(MetaMacs):
    """MACs per transformer variant of one PixArt architecture at one full latent size (cached)."""

    def __init__(self, config: dict[str, Any], vae_scale: int, latent: tuple[int, int] | None = None) -> None:
        with torch.device("meta"):
            self.transformer = PixArtTransformer2DModel(**config)
        self.vae_scale = vae_scale
        super().__init__(latent or (config["sample_size"], config["sample_size"]), int(config["patch_size"]))

    def _module(self, plan: LayerPlan) -> torch.nn.Module:
        return LayeredPixArt(self.transformer, plan, self.vae_scale)

    def _input_shapes(self, module: torch.nn.Module, batch: int, h: int, w: int) -> dict[str, tuple[int, ...]]:
        config = self.transformer.config
        shapes = module.cache_shapes(batch, h, w)
        shapes.update({names.SAMPLE: (batch, config.in_channels, h, w), names.TIMESTEP: (batch,),
                       names.CONTEXT: (batch, CONTEXT_LEN, config.caption_channels),
                       names.ENCODER_MASK: (batch, CONTEXT_LEN)})
        return shapes

    def _dtype(self, name: str) -> torch.dtype:
        return torch.int64 if name == names.ENCODER_MASK else torch.float32


def real_sizes() -> dict[str, int]:
    """Parameter counts of the real PixArt-alpha parts, from their configs on the meta device."""
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(**T5_XXL))
        transformer = PixArtTransformer2DModel(**PIXART_ALPHA_1024)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4)
    decoder = sum(p.numel() for name, p in vae.named_parameters() if not name.startswith(("encoder.", "quant_conv.")))
    return {"text_encoder (T5-XXL encoder)": sum(p.numel() for p in t5.parameters()),
            "transformer (PixArt-XL-2)": sum(p.numel() for p in transformer.parameters()),
            "vae_decoder": decoder}


def t5_macs(tokens: int = CONTEXT_LEN) -> float:
    """MACs of one T5-XXL encoder call on ``tokens`` ids, from its config (transformers' T5 does not run on the
    meta device): per layer, the q/k/v/o projections (4 x d_model x heads*d_kv per token), the gated-GELU
    MLP (3 x d_model x d_ff per token) and both attention matmuls (2 x tokens^2 x heads*d_kv)."""
    c = T5_XXL
    inner = c["num_heads"] * c["d_kv"]
    per_layer = tokens * (4 * c["d_model"] * inner + 3 * c["d_model"] * c["d_ff"]) + 2 * tokens * tokens * inner
    return float(c["num_layers"] * per_layer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m postdiff.tools.pixart_macs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pixart-alpha-1024",
                        choices=["pixart-alpha-1024", "random:pixart-slim", "random:tiny-pixart"])
    parser.add_argument("--schedule", action="append", default=[], help="preset or schedule file (repeatable)")
    parser.add_argument("--latent", type=int, help="full latent side (default: the model's sample_size)")
    parser.add_argument("--sizes", action="store_true", help="also the real model's parameter counts and bytes")
    args = parser.parse_args(argv)
    config, scale = (PIXART_ALPHA_1024, VAE_SCALE) if args.model == "pixart-alpha-1024" else _builtin_config(args.model)
    counter = PixArtMacs(config, scale, (args.latent, args.latent) if args.latent else None)
    schedules = [resolve_schedule(spec) for spec in args.schedule]
    totals = [counter.schedule(s) for s in schedules]
    for schedule, total in zip(schedules, totals):
        print(f"{args.model} latent {counter.latent[0]}x{counter.latent[1]} {schedule.name}: {total / 1e12:.2f} TMACs "
              f"({totals[0] / total:.2f}x fewer than {schedules[0].name})")
    if args.sizes:
        for part, count in real_sizes().items():
            print(f"{part}: {count / 1e9:.3f} B parameters, fp32 {count * 4 / 1e9:.2f} GB, fp16 {count * 2 / 1e9:.2f} GB")
        print(f"T5-XXL encoder, one 120-token prompt: {t5_macs() / 1e12:.3f} TMACs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
