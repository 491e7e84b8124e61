"""What the UNet is conditioned on, beyond the latent and the timestep: the runtime half of SDXL.

SD 1.x/2.x UNets take one thing, the text encoder's hidden states. SDXL UNets take three, which
:class:`Conditioning` carries as [negative; positive] rows:

* ``context``: both encoders' penultimate hidden states concatenated along the width (2, L, D1 + D2);
* ``text_embeds``: the second encoder's pooled, projected output (2, P);
* ``time_ids``: six numbers per row -- original size (h, w), crop top-left (y, x), target size
  (h, w), in pixels -- that SDXL's "micro-conditioning" embeds sinusoidally.

:class:`SdxlPromptEncoder` computes the first two from prompts exactly as diffusers'
``StableDiffusionXLPipeline.encode_prompt`` does (each tokenizer pads to its own max length; an
empty negative prompt is all-zero conditioning when the bundle says ``force_zeros_for_empty_prompt``,
which is what diffusers does when no negative prompt is passed). :meth:`Conditioning.time_ids`
gives the size ids of one resolution stage (docs/sdxl.md explains what a low-resolution stage carries).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from postdiff.errors import BundleError, InputError
from postdiff.runtime.manifest import Manifest
from postdiff.runtime.names import HIDDEN_STATES, INPUT_IDS, TEXT_EMBEDS, TEXT_ENCODER, TEXT_ENCODER_2
from postdiff.runtime.runners.base import Runner
from postdiff.runtime.tokenizer import PromptTokenizer

Size = tuple[int, int]


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning of one generation, in pixels (h, w); None: the full image size,
    as diffusers defaults ``original_size`` and ``target_size`` to (height, width)."""

    original_size: Size | None = None
    crop_top_left: Size = (0, 0)
    target_size: Size | None = None

    def validate(self) -> None:
        """Raise InputError for sizes no SDXL pipeline takes."""
        for name, size, least in (("original size", self.original_size, 1), ("crop top-left", self.crop_top_left, 0),
                                  ("target size", self.target_size, 1)):
            if size is not None and (len(size) != 2 or any(int(v) != v or v < least for v in size)):
                raise InputError(f"SDXL {name} {size} is not two whole pixel counts >= {least} (height, width)")


def stage_time_ids(sizes: SizeConditioning, full: Size, stage: Size) -> np.ndarray:
    """The six size ids (1, 6) float32 of a UNet evaluation at pixel size ``stage`` of a generation
    whose full image is ``full`` pixels.

    The original size and crop are the generation's; the target size is the generation's target
    scaled to the stage (= the stage's own pixel size by default): SDXL was trained with the
    target size equal to the size of the tensor it denoises, and a low-resolution stage is still a
    downscaled view of the same full-size original (docs/sdxl.md).
    """
    original = sizes.original_size or full
    target = sizes.target_size or full
    # Scale the target to the stage: stage / full is exact (both on the model's grid).
    target_h = round(target[0] * stage[0] / full[0])
    target_w = round(target[1] * stage[1] / full[1])
    ids = [*original, *sizes.crop_top_left, target_h, target_w]
    return np.asarray([ids], dtype=np.float32)


@dataclass(frozen=True)
class Conditioning:
    """The UNet conditioning of one generation, [negative; positive] rows (see the module docstring).

    SD bundles set only ``context``; SDXL bundles set all fields.
    """

    context: np.ndarray  # (2, L, D)
    text_embeds: np.ndarray | None = None  # (2, P)
    sizes: SizeConditioning | None = None
    full_pixels: Size | None = None  # the generation's full image size (h, w)
    mask: np.ndarray | None = None  # (2, L) int64: PixArt-alpha's T5 attention masks (the transformer's encoder mask)

    def rows(self, batch: int) -> Conditioning:
        """Both rows for a guided batch (2), the positive one for a conditional-only batch (1)."""
        if batch == 2:
            return self
        return Conditioning(self.context[1:], None if self.text_embeds is None else self.text_embeds[1:],
                            self.sizes, self.full_pixels, None if self.mask is None else self.mask[1:])

    def time_ids(self, batch: int, stage_pixels: Size) -> np.ndarray:
        """(batch, 6) float32 size ids at a stage of ``stage_pixels``; the negative row equals the
        positive one, as diffusers' default ``negative_original_size`` etc. leave it."""
        if self.sizes is None or self.full_pixels is None:
            raise BundleError("this UNet graph takes time_ids but the generation has no SDXL size conditioning; "
                              "the bundle's manifest lacks its 'sdxl' section: re-export it")
        return np.repeat(stage_time_ids(self.sizes, self.full_pixels, stage_pixels), batch, axis=0)


class SdxlPromptEncoder:
    """Prompts -> SDXL conditioning through a bundle's two text-encoder graphs."""

    def __init__(self, manifest: Manifest, bundle: Path, runner: Callable[[str], Runner]) -> None:
        if manifest.sdxl is None or manifest.tokenizer_2 is None:
            raise BundleError(f"bundle {bundle} is not an SDXL bundle (its manifest has no 'sdxl' section or no "
                              "tokenizer_2); re-export the SDXL model")
        self.manifest = manifest
        self._tokenizers = (PromptTokenizer(manifest.tokenizer, bundle), PromptTokenizer(manifest.tokenizer_2, bundle))
        self._runner = runner

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(states (1, L, D1 + D2), pooled (1, P)) of one prompt: each encoder's penultimate hidden
        states, concatenated along the width; the pooled embedding from the second encoder."""
        states = []
        pooled = None
        for graph, tokenizer in zip((TEXT_ENCODER, TEXT_ENCODER_2), self._tokenizers):
            spec = self.manifest.graph(graph).input(INPUT_IDS)
            outputs = self._runner(graph).infer({INPUT_IDS: tokenizer.encode(text, dtype=spec.dtype)})
            states.append(outputs[HIDDEN_STATES].astype(np.float32, copy=False))
            if graph == TEXT_ENCODER_2:
                pooled = outputs[TEXT_EMBEDS].astype(np.float32, copy=False)
        return np.concatenate(states, axis=-1), pooled

    def pair(self, prompt: str, negative_prompt: str, guidance: float, sizes: SizeConditioning,
             full_pixels: Size) -> Conditioning:
        """[negative; positive] conditioning; with guidance off (<= 1) both rows are the prompt's, so
        that only the conditional half matters."""
        sizes.validate()
        states, pooled = self.encode(prompt)
        if guidance <= 1.0:
            neg_states, neg_pooled = states, pooled
        elif negative_prompt == "" and self.manifest.sdxl.force_zeros_for_empty_prompt:
            neg_states, neg_pooled = np.zeros_like(states), np.zeros_like(pooled)
        else:
            neg_states, neg_pooled = self.encode(negative_prompt)
        return Conditioning(np.concatenate([neg_states, states]), np.concatenate([neg_pooled, pooled]), sizes,
                            full_pixels)
