"""An independent DeepCache: the skip rule of DeepCache's ``DeepCacheSDHelper`` applied to a diffusers UNet.

Written from the helper's documented behaviour (reference notes §2.2), not from postdiff's layered
UNet: ``cache_branch_id`` splits into ``block = id // 3`` and ``layer = id % 3``; on a cached step
every down block deeper than ``block``, the mid block, and in block ``block`` the down layers with
index >= ``layer`` return what they returned on the last full step; so do the up blocks whose
reversed index is deeper than ``block`` and, in the mirrored up block, the layers whose reversed
index is > ``layer``. Everything else recomputes. The helper also wraps each down block as a whole
under layer index 0, so the down block ``block`` itself is replayed whole.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, Iterator

import torch


class DeepCacheOracle:
    """Run a diffusers UNet as DeepCache's helper would, one full step then cached steps."""

    def __init__(self, unet: Any, branch_id: int) -> None:
        self.unet = unet
        self.block, self.layer = branch_id // 3, branch_id % 3
        self.cached: dict[tuple, Any] = {}
        self.skipping = False

    def _skip(self, kind: str, block: int, layer: int) -> bool:
        if not self.skipping:
            return False
        if kind == "mid" or block > self.block:
            return True
        if block < self.block:
            return False
        return layer >= self.layer if kind == "down" else layer > self.layer

    def _modules(self) -> Iterator[tuple[tuple, torch.nn.Module]]:
        unet = self.unet
        for i, block in enumerate(unet.down_blocks):
            for j, attention in enumerate(getattr(block, "attentions", None) or []):
                yield ("down", "attention", i, j), attention
            for j, resnet in enumerate(block.resnets):
                yield ("down", "resnet", i, j), resnet
            for downsampler in block.downsamplers or []:
                yield ("down", "downsampler", i, len(block.resnets)), downsampler
            yield ("down", "block", i, 0), block
        yield ("mid", "block", 0, 0), unet.mid_block
        count = len(unet.up_blocks)
        for i, block in enumerate(unet.up_blocks):
            layers = len(block.resnets)
            for j, attention in enumerate(getattr(block, "attentions", None) or []):
                yield ("up", "attention", count - 1 - i, layers - 1 - j), attention
            for j, resnet in enumerate(block.resnets):
                yield ("up", "resnet", count - 1 - i, layers - 1 - j), resnet
            for upsampler in block.upsamplers or []:
                yield ("up", "upsampler", count - 1 - i, 0), upsampler
            yield ("up", "block", count - 1 - i, 0), block

    @contextmanager
    def wrapped(self) -> Iterator[None]:
        originals: list[tuple[torch.nn.Module, Callable]] = []

        def wrap(key: tuple, module: torch.nn.Module) -> None:
            inner = module.forward

            def forward(*args: Any, **kwargs: Any) -> Any:
                if self._skip(key[0], key[2], key[3]):
                    return self.cached[key]
                out = inner(*args, **kwargs)
                self.cached[key] = out
                return out

            originals.append((module, inner))
            module.forward = forward

        try:
            for key, module in self._modules():
                wrap(key, module)
            yield
        finally:
            for module, _ in originals:
                del module.forward  # back to the class's forward

    @torch.no_grad()
    def full(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.skipping = False
        with self.wrapped():
            return self.unet(*args, **kwargs).sample

    @torch.no_grad()
    def cached_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.skipping = True
        with self.wrapped():
            return self.unet(*args, **kwargs).sample
