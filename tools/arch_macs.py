"""UNet MACs of a schedule on a built-in SDXL architecture, counted without weights or an export.

``python -m postdiff.tools.arch_macs random:sdxl --schedule baseline --schedule postdiff-sdxl`` builds
the UNet on torch's meta device (no memory for its 2.6 B parameters), runs every
:class:`~postdiff.exporter.layered_unet.LayeredUNet` variant the schedules evaluate on meta tensors
under ``torch.utils.flop_counter.FlopCounterMode`` and prints each schedule's total (FLOPs / 2:
convolutions, linear layers and both attention matmuls; GroupNorm, softmax and elementwise ops are
not counted). It is what ``postdiff schedule --explain`` reports from a bundle's exported graphs,
for models too big to export on the machine at hand (docs/sdxl.md). CFG batches count twice.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from postdiff.exporter.layered_unet import LayeredUNet, LayerPlan
from postdiff.exporter.sdxl_models import _SPECS, unet_config
from postdiff.profiles.presets import resolve_schedule
from postdiff.runtime import names
from postdiff.runtime.schedule import Schedule, Variant, latent_size, plan_steps

CONTEXT_LEN = 77


class ArchMacs:
    """MACs per UNet variant of one built-in SDXL architecture at one full latent size (cached)."""

    def __init__(self, model: str, latent: tuple[int, int] | None = None) -> None:
        config = unet_config(model)
        with torch.device("meta"):
            self.unet = UNet2DConditionModel(**config)
        self.latent = latent or (config["sample_size"], config["sample_size"])
        self.grid = 2 ** (len(config["block_out_channels"]) - 1)
        self._cache: dict[tuple, float] = {}

    def variant(self, variant: Variant) -> float:
        """MACs of one evaluation of ``variant``."""
        h, w = latent_size(self.latent, variant.scale, self.grid)
        key = (h, w, variant.batch, variant.deep, variant.branch, variant.xattn)
        if key not in self._cache:
            module = LayeredUNet(self.unet, LayerPlan(deep=variant.deep, branch=variant.branch, xattn=variant.xattn))
            shapes = module.cache_shapes(variant.batch, h, w)
            config = self.unet.config
            pooled = self.unet.add_embedding.linear_1.in_features - 6 * config.addition_time_embed_dim
            shapes.update({names.SAMPLE: (variant.batch, config.in_channels, h, w), names.TIMESTEP: (variant.batch,),
                           names.CONTEXT: (variant.batch, CONTEXT_LEN, config.cross_attention_dim),
                           names.TEXT_EMBEDS: (variant.batch, pooled), names.TIME_IDS: (variant.batch, 6)})
            with torch.device("meta"):
                inputs = [torch.empty(shapes[name]) for name in module.input_names]
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                module(*inputs)
            self._cache[key] = counter.get_total_flops() / 2
        return self._cache[key]

    def schedule(self, schedule: Schedule) -> float:
        """MACs of one generation of ``schedule`` (a switch's x̂0 evaluation included)."""
        return sum(self.variant(v) for plan in plan_steps(schedule) for v in (plan.switch_from, plan.variant)
                   if v is not None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m postdiff.tools.arch_macs", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(_SPECS), help="built-in SDXL architecture")
    parser.add_argument("--schedule", action="append", required=True, help="preset or schedule file (repeatable)")
    parser.add_argument("--latent", type=int, help="full latent side (default: the model's, 128 = 1024 px)")
    args = parser.parse_args(argv)
    counter = ArchMacs(args.model, (args.latent, args.latent) if args.latent else None)
    schedules = [resolve_schedule(spec) for spec in args.schedule]
    totals = [counter.schedule(s) for s in schedules]
    for schedule, total in zip(schedules, totals):
        print(f"{args.model} latent {counter.latent[0]}x{counter.latent[1]} {schedule.name}: {total / 1e12:.2f} TMACs "
              f"({totals[0] / total:.2f}x fewer than {schedules[0].name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
