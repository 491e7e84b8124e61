"""A diffusers ``PixArtTransformer2DModel`` run block by block, so that one traced graph can cut or feed caches.

:class:`LayeredPixArt` re-drives the real submodules of the transformer (patch + position embedding,
adaLN-single timestep embedding, caption projection, each transformer block, the output head and the
unpatchify) in the order diffusers' ``PixArtTransformer2DModel.forward`` runs them, so its plain output
equals the diffusers forward up to kernel choice. On top of the diffusers forward it:

* keeps the *epsilon half* of a learned-sigma output (``out_channels == 2 * in_channels``), as
  ``PixArtAlphaPipeline`` does after guidance (guidance is per channel, so the half commutes with it);
* bakes the micro-conditions in (``use_additional_conditions``): resolution = the graph's own image
  size (latent side x ``vae_scale``), aspect ratio = height / width -- what the pipeline feeds at that
  size (without resolution binning). Each graph is traced at one latent size, so the 2-D sin-cos
  position embedding (``PatchEmbed``, ``base_size`` and ``interpolation_scale``) is computed for that
  token grid and lands in the graph as a constant: a graph for another size is another trace.

The caches (docs/pixart.md):

* **Block cache** (the DiT analogue of DeepCache, schedule role ``deep``, "branch" ``b``): the cached
  range is blocks ``[b, N - b)`` of the N blocks -- ``b`` blocks recomputed at each end, as DeepCache
  recomputes the shallow layers at both ends of a UNet. ``write`` runs every block and also emits the
  residual the range adds, ``deep_feature = h_out(N-b-1) - h_in(b)`` (B, tokens, width); ``read`` runs
  blocks ``[0, b)``, adds the fed residual, runs blocks ``[N - b, N)``. Branch 0 caches every block.
* **Cross-attention cache** (``xattn``): the output of every block's ``attn2`` (after its output
  projection, before the residual add), tapped or replaced through a temporary attention processor; a
  read graph takes no ``encoder_hidden_states`` and no mask (the caption projection is skipped too).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import PixArtTransformer2DModel

from postdiff.errors import InputError, ModelSourceError
from postdiff.exporter.layered_unet import LayerPlan, _Replay, _Tap, attn2_processors, cache_role_io
from postdiff.runtime import names
from postdiff.runtime.names import xattn_tensor_name


def num_blocks(transformer: PixArtTransformer2DModel) -> int:
    return len(transformer.transformer_blocks)


def cached_range(transformer: PixArtTransformer2DModel, branch: int) -> tuple[int, int]:
    """Blocks [start, end) whose residual branch ``branch`` caches: [b, N - b).

    Raises:
        InputError: the range would be empty (2b >= N), naming the valid branches.
    """
    n = num_blocks(transformer)
    if isinstance(branch, bool) or not isinstance(branch, int) or branch < 0 or 2 * branch >= n:
        raise InputError(f"block-cache branch {branch!r} does not exist in this {n}-block transformer: branch b caches "
                         f"blocks [b, {n} - b), so valid branches are 0..{(n - 1) // 2}; pick one in that range")
    return branch, n - branch


def check_transformer(transformer: Any) -> None:
    """Reject denoisers this module does not drive, with the reason."""
    if not isinstance(transformer, PixArtTransformer2DModel):
        raise ModelSourceError(f"the denoiser is a {type(transformer).__name__}, expected a PixArtTransformer2DModel")
    if transformer.config.norm_type != "ada_norm_single":
        raise ModelSourceError(f"the transformer's norm_type is {transformer.config.norm_type!r}; PixArt-alpha uses "
                               "'ada_norm_single'")
    for i, block in enumerate(transformer.transformer_blocks):
        if block.attn2 is None:
            raise ModelSourceError(f"transformer_blocks.{i} has no cross-attention (attn2); expected PixArt-alpha's "
                                   "self-attention, cross-attention, MLP blocks")


class LayeredPixArt(torch.nn.Module):
    """A ``PixArtTransformer2DModel`` driven block by block as ``plan`` says (see the module docstring).

    ``forward`` takes, positionally: ``sample`` (B, C, h, w); ``timestep`` (B,) float32;
    ``encoder_hidden_states`` (B, 120, D_T5) and ``encoder_attention_mask`` (B, 120) int64 unless
    ``xattn == "read"``; ``deep_feature`` (B, tokens, width) if ``deep == "read"``; one
    ``xattn/transformer_blocks.{i}.attn2`` (B, tokens, width) per computed block if ``xattn == "read"``.
    It returns ``noise_pred`` (B, C, h, w) (the epsilon half), then ``deep_feature`` if ``deep ==
    "write"``, then the computed blocks' attn2 outputs if ``xattn == "write"``.
    """

    def __init__(self, transformer: PixArtTransformer2DModel, plan: LayerPlan, vae_scale: int) -> None:
        super().__init__()
        check_transformer(transformer)
        self.unet = transformer  # parameter names ``unet.*`` as every denoiser graph of a bundle
        self.eval()  # torch.onnx.export restores the wrapper's mode on every submodule afterwards
        self.plan = plan
        self.vae_scale = vae_scale
        n = num_blocks(transformer)
        self.cached = cached_range(transformer, plan.branch) if plan.deep != "none" else (n, n)
        start, end = self.cached
        computed = [i for i in range(n) if plan.deep != "read" or not start <= i < end]
        self.computed = tuple(computed)
        self.xattn_names = [f"transformer_blocks.{i}.attn2" for i in computed]
        cache_names = [xattn_tensor_name(name) for name in self.xattn_names]
        self.time_cond_dim = None  # no guidance embedding (the torch reference asks)
        self.input_names: list[str] = [names.SAMPLE, names.TIMESTEP]
        if plan.xattn != "read" and computed:  # branch-0 reads compute no block: no cross-attention at all
            self.input_names += [names.CONTEXT, names.ENCODER_MASK]
        cache_inputs, self.output_names = cache_role_io(plan, cache_names)
        self.input_names += cache_inputs

    @property
    def width(self) -> int:
        return int(self.unet.config.num_attention_heads * self.unet.config.attention_head_dim)

    def cache_shapes(self, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the cache tensors at latent ``height`` x ``width``: all (batch, tokens, width)."""
        patch = int(self.unet.config.patch_size)
        if height % patch or width % patch:
            raise InputError(f"latent {height}x{width} is off the transformer's patch grid: sides must be multiples "
                             f"of the patch size {patch}")
        shape = (batch, (height // patch) * (width // patch), self.width)
        shapes = {names.DEEP_FEATURE: shape} if self.plan.deep != "none" else {}
        shapes.update({xattn_tensor_name(name): shape for name in self.xattn_names})
        return shapes

    def example_inputs(self, batch: int, height: int, width: int, context_length: int,
                       generator: torch.Generator) -> list[torch.Tensor]:
        """Seeded inputs in :attr:`input_names` order; the mask keeps the first 17 tokens of each row."""
        channels = int(self.unet.config.in_channels)
        values: dict[str, torch.Tensor] = {
            names.SAMPLE: torch.randn(batch, channels, height, width, generator=generator),
            names.TIMESTEP: torch.full((batch,), 500.0),
            names.CONTEXT: torch.randn(batch, context_length, int(self.unet.config.caption_channels),
                                       generator=generator),
            names.ENCODER_MASK: (torch.arange(context_length)[None, :] < torch.tensor([[17]] * batch)).long(),
        }
        for name, shape in self.cache_shapes(batch, height, width).items():
            values[name] = torch.randn(*shape, generator=generator) * 0.1
        return [values[name] for name in self.input_names]

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        bound = dict(zip(self.input_names, inputs))
        taps: dict[str, torch.Tensor] = {}
        if self.plan.xattn == "write":
            processors: dict[str, Any] = {name: _Tap(self.unet.get_submodule(name).processor, name, taps)
                                          for name in self.xattn_names}
        elif self.plan.xattn == "read":
            processors = {name: _Replay(bound[xattn_tensor_name(name)]) for name in self.xattn_names}
        else:
            processors = {}
        with attn2_processors(self.unet, processors):
            noise_pred, feature = self._run(bound)
        outputs = [noise_pred]
        if self.plan.deep == "write":
            outputs.append(feature)
        if self.plan.xattn == "write":
            outputs += [taps[name] for name in self.xattn_names]
        return tuple(outputs)

    def _run(self, bound: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``PixArtTransformer2DModel.forward`` (diffusers 0.42) in its op order, with the cut."""
        model, config = self.unet, self.unet.config
        sample, timestep = bound[names.SAMPLE], bound[names.TIMESTEP]
        batch = sample.shape[0]
        patch = config.patch_size
        height, width = sample.shape[-2] // patch, sample.shape[-1] // patch
        bias = None
        mask = bound.get(names.ENCODER_MASK)
        if mask is not None:  # mask (1 keep, 0 discard) -> bias (0, -10000), with a query axis
            bias = ((1 - mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        hidden = model.pos_embed(sample)  # the sin-cos embedding of this token grid: a trace-time constant
        added: dict[str, torch.Tensor | None] = {"resolution": None, "aspect_ratio": None}
        if model.use_additional_conditions:
            pixels_h, pixels_w = sample.shape[-2] * self.vae_scale, sample.shape[-1] * self.vae_scale
            where = dict(dtype=hidden.dtype, device=sample.device)
            added = {"resolution": torch.tensor([[float(pixels_h), float(pixels_w)]], **where).expand(batch, 2),
                     "aspect_ratio": torch.tensor([[float(pixels_h / pixels_w)]], **where).expand(batch, 1)}
        temb, embedded = model.adaln_single(timestep, added, batch_size=batch, hidden_dtype=hidden.dtype)
        context = bound.get(names.CONTEXT)
        if context is not None and model.caption_projection is not None:
            context = model.caption_projection(context).view(batch, -1, hidden.shape[-1])
        start, end = self.cached
        feature = None
        entering = None
        for i, block in enumerate(model.transformer_blocks):
            if self.plan.deep == "read" and start <= i < end:
                if i == start:
                    hidden = hidden + bound[names.DEEP_FEATURE]
                continue
            if self.plan.deep == "write" and i == start:
                entering = hidden
            hidden = block(hidden, attention_mask=None, encoder_hidden_states=context, encoder_attention_mask=bias,
                           timestep=temb, cross_attention_kwargs=None, class_labels=None)
            if self.plan.deep == "write" and i == end - 1:
                feature = hidden - entering
        shift, scale = (model.scale_shift_table[None] + embedded[:, None]).chunk(2, dim=1)
        hidden = model.norm_out(hidden)
        hidden = hidden * (1 + scale) + shift
        hidden = model.proj_out(hidden).squeeze(1)
        hidden = hidden.reshape(-1, height, width, patch, patch, model.out_channels)
        hidden = torch.einsum("nhwpqc->nchpwq", hidden)
        out = hidden.reshape(-1, model.out_channels, height * patch, width * patch)
        if model.out_channels == 2 * config.in_channels:  # learned sigma: the pipeline keeps the epsilon half
            out = out[:, : config.in_channels]
        return out, feature


class T5EncoderGraph(torch.nn.Module):
    """input_ids (1, L) int64, attention_mask (1, L) int64 -> last_hidden_state (1, L, D) (T5 under its mask)."""

    def __init__(self, text_encoder: torch.nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.eval()  # T5 has dropout: torch.onnx.export restores the wrapper's mode on every submodule afterwards

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, attention_mask=attention_mask)[0]
