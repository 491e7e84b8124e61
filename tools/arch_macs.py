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


class MetaMacs:
    """MACs per denoiser variant of one architecture at one full ``latent`` size, counted on torch's
    meta device under ``FlopCounterMode`` (FLOPs / 2) and cached. ``grid``: what a latent side must
    divide by. A subclass says how one variant's layered module and its input shapes are built."""

    def __init__(self, latent: tuple[int, int], grid: int) -> None:
        self.latent = latent
        self.grid = grid
        self._cache: dict[tuple, float] = {}

    def _module(self, plan: LayerPlan) -> torch.nn.Module:
        raise NotImplementedError

    def _input_shapes(self, module: torch.nn.Module, batch: int, h: int, w: int) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def _dtype(self, name: str) -> torch.dtype:
        return torch.float32

    def variant(self, variant: Variant) -> float:
        """MACs of one evaluation of ``variant``."""
        h, w = latent_size(self.latent, variant.scale, self.grid)
        key = (h, w, variant.batch, variant.deep, variant.branch, variant.xattn)
        if key not in self._cache:
            module = self._module(LayerPlan(deep=variant.deep, branch=variant.branch, xattn=variant.xattn))
            shapes = self._input_shapes(module, variant.batch, h, w)
            with torch.device("meta"):
                inputs = [torch.ones(shapes[name], dtype=self._dtype(name)) for name in module.input_names]
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                module(*inputs)
            self._cache[key] = counter.get_total_flops() / 2
        return self._cache[key]

    def schedule(self, schedule: Schedule) -> float:
        """MACs of one generation of ``schedule`` (a switch's x̂0 evaluation included)."""
        return sum(self.variant(v) for plan in plan_steps(schedule) for v in (plan.switch_from, plan.variant)
                   if v is not None)


class ArchMacs(MetaMacs):
    """MACs per UNet variant of one built-in SDXL architecture at one full latent size (cached)."""

    def __init__(self, model: str, latent: tuple[int, int] | None = None) -> None:
        config = unet_config(model)
        with torch.device("meta"):
            self.unet = UNet2DConditionModel(**config)
        super().__init__(latent or (config["sample_size"], config["sample_size"]),
                         2 ** (len(config["block_out_channels"]) - 1))

    def _module(self, plan: LayerPlan) -> torch.nn.Module:
        return LayeredUNet(self.unet, plan)

    def _input_shapes(self, module: torch.nn.Module, batch: int, h: int, w: int) -> dict[str, tuple[int, ...]]:
        config = self.unet.config
        pooled = self.unet.add_embedding.linear_1.in_features - 6 * config.addition_time_embed_dim
        shapes = module.cache_shapes(batch, h, w)
        shapes.update({names.SAMPLE: (batch, config.in_channels, h, w), names.TIMESTEP: (batch,),
                       names.CONTEXT: (batch, CONTEXT_LEN, config.cross_attention_dim),
                       names.TEXT_EMBEDS: (batch, pooled), names.TIME_IDS: (batch, 6)})
        return shapes


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
