"""An independent torch reference of PixArt-alpha's caches, on diffusers' own transformer forward.

The exported graphs come from :class:`~postdiff.exporter.layered_pixart.LayeredPixArt`, which re-drives
the transformer's blocks itself. This module shares none of that code: it calls
``PixArtTransformer2DModel.forward`` as diffusers wrote it and changes its behaviour only from outside,

* block cache ``write``: a forward pre-hook on block b and a forward hook on block N-b-1 record the
  hidden states entering and leaving the cached range; their difference is the residual;
* block cache ``read``: for the call, ``transformer_blocks`` is swapped for a list whose blocks b..N-b-1
  are stand-ins (the first adds the cached residual, the others pass the hidden states through);
* cross-attention ``write`` / ``read``: every computed block's ``attn2`` gets a processor that records
  its output / returns the cached output instead of attending;

and it feeds the micro-conditions as ``PixArtAlphaPipeline`` does at the stage's pixel size, then keeps
the epsilon half of the learned-sigma output after guidance, as the pipeline does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, ExitStack
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class PixArtCaches:
    """What a reference run keeps between steps."""

    residual: torch.Tensor | None = None
    maps: dict[int, torch.Tensor] | None = None  # block index -> attn2 output


class _AddResidual(torch.nn.Module):
    def __init__(self, residual: torch.Tensor) -> None:
        super().__init__()
        self.residual = residual

    def forward(self, hidden_states: torch.Tensor, **_: Any) -> torch.Tensor:
        return hidden_states + self.residual


class _PassThrough(torch.nn.Module):
    def forward(self, hidden_states: torch.Tensor, **_: Any) -> torch.Tensor:
        return hidden_states


class _Record:
    def __init__(self, inner: Any, sink: dict[int, torch.Tensor], index: int) -> None:
        self.inner, self.sink, self.index = inner, sink, index

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 **kwargs: Any) -> torch.Tensor:
        out = self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                         attention_mask=attention_mask, **kwargs)
        self.sink[self.index] = out
        return out


class _Return:
    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.value


@contextmanager
def _processors(transformer, processors: dict[int, Any]) -> Iterator[None]:
    originals = {}
    try:
        for index, processor in processors.items():
            attn = transformer.transformer_blocks[index].attn2
            originals[index] = attn.processor
            attn.set_processor(processor)
        yield
    finally:
        for index, processor in originals.items():
            transformer.transformer_blocks[index].attn2.set_processor(processor)


@torch.no_grad()
def reference_eps(transformer, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor | None,
                  mask: torch.Tensor | None, pixels: tuple[int, int], deep: str, branch: int, xattn: str,
                  caches: PixArtCaches, keep_map) -> torch.Tensor:
    """The transformer's output (B, C_out, h, w) for one evaluation of a cache variant, updating ``caches``.

    ``keep_map(value)`` reduces a guided batch's attn2 output to what the schedule keeps (Cond / Ave).
    """
    n = len(transformer.transformer_blocks)
    start, end = (branch, n - branch) if deep != "none" else (n, n)
    batch = sample.shape[0]
    added = {"resolution": None, "aspect_ratio": None}
    if transformer.use_additional_conditions:  # as PixArtAlphaPipeline at this size (sample_size 128 models)
        height, width = pixels
        added = {"resolution": torch.tensor([height, width]).repeat(batch, 1).to(sample.dtype),
                 "aspect_ratio": torch.tensor([float(height / width)]).repeat(batch, 1).to(sample.dtype)}
    computed = [i for i in range(n) if deep != "read" or not start <= i < end]
    recorded: dict[int, torch.Tensor] = {}
    with ExitStack() as stack:
        if xattn == "write":
            stack.enter_context(_processors(transformer, {
                i: _Record(transformer.transformer_blocks[i].attn2.processor, recorded, i) for i in computed}))
        elif xattn == "read":
            stack.enter_context(_processors(transformer, {i: _Return(caches.maps[i]) for i in computed}))
        edges: dict[str, torch.Tensor] = {}
        if deep == "write":
            blocks = transformer.transformer_blocks
            stack.callback(blocks[start].register_forward_pre_hook(
                lambda module, args, kwargs: edges.__setitem__("in", args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True).remove)
            stack.callback(blocks[end - 1].register_forward_hook(
                lambda module, args, output: edges.__setitem__("out", output)).remove)
        if deep == "read":
            original = transformer.transformer_blocks
            stand_ins = [original[i] if i in computed else
                         (_AddResidual(caches.residual) if i == start else _PassThrough()) for i in range(n)]
            transformer.transformer_blocks = torch.nn.ModuleList(stand_ins)
            stack.callback(setattr, transformer, "transformer_blocks", original)
        if context is None:  # a cross-attention read: the cached maps stand in for every attn2 (shape only)
            context = torch.zeros(batch, 1, int(transformer.config.caption_channels))
        out = transformer(sample, encoder_hidden_states=context, encoder_attention_mask=mask,
                          timestep=timestep.expand(batch), added_cond_kwargs=added, return_dict=False)[0]
    if deep == "write":
        caches.residual = edges["out"] - edges["in"]
    if xattn == "write":
        caches.maps = {i: keep_map(v) for i, v in recorded.items()}
    return out
