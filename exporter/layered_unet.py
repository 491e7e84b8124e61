"""A diffusers SD 1.x/2.x or SDXL UNet run layer by layer, so that one traced graph can cut or feed caches.

:class:`LayeredUNet` re-drives the real submodules of a ``UNet2DConditionModel`` (time embedding,
``conv_in``, each down layer, the mid block, each up layer, the output head) in exactly the order
diffusers runs them, so its "full" output equals ``unet(sample, t, context).sample`` bit for bit
up to kernel choice. Because the schedule is explicit, a :class:`LayerPlan` can ask the same
forward to

* emit the DeepCache feature of a branch (``deep="write"``) or start from a fed one and run only
  the shallow part (``deep="read"``), and
* emit every cross-attention (``attn2``) output (``xattn="write"``) or take them as inputs instead
  of computing cross-attention (``xattn="read"``, no ``encoder_hidden_states`` at all).

Layer granularity (DeepCache's ``cache_branch_id``). Every skip connection is a branch::

    skip 0            = conv_in output
    skip 1, 2, ...    = each down layer (resnet [+ transformer]) output and each downsampler
                        output, in execution order
    up layer for b    = the up layer that concatenates skip b: cat([h, skip b]) -> resnet
                        [-> transformer], followed by its block's upsampler if it is the block's
                        last layer
    feature of b      = the h entering that up layer, before the concat

The shallow part of branch b recomputes the time embedding, ``conv_in``, the down layers that
produce skips 1..b, then the up layers that consume skips b..0 (the first one fed the cached
feature), then the output head. Branch 0 is the cheapest: conv_in, the last up layer and the head.

Cross-attention caches are the output of each ``attn2`` module (after its output projection,
before the residual add of its transformer block). They are tapped or replaced through a temporary
attention processor, installed and removed inside ``forward`` so the wrapped UNet is left as it was.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
)

from postdiff.runtime import names
from postdiff.runtime.names import CACHE_ROLES, xattn_tensor_name
from postdiff.errors import InputError, ModelSourceError

_SUPPORTED_DOWN = (CrossAttnDownBlock2D, DownBlock2D)
_SUPPORTED_UP = (CrossAttnUpBlock2D, UpBlock2D)
_UNSUPPORTED_FIX = ("the layered (DeepCache / cross-attention caching) graphs support Stable Diffusion 1.x/2.x "
                    "and SDXL UNets only; export this model without cache variants")
# SDXL's addition embedding: pooled text embeddings + sinusoidal size ids (diffusers' "text_time").
TEXT_TIME = "text_time"


@contextmanager
def attn2_processors(model: torch.nn.Module, processors: dict[str, Any]) -> Iterator[None]:
    """Install ``processors`` on the named attention modules of ``model`` (the cross-attention taps
    and replays of a layered trace); restore the originals on exit."""
    originals: dict[str, Any] = {}
    try:
        for name, processor in processors.items():
            attn = model.get_submodule(name)
            originals[name] = attn.processor
            attn.set_processor(processor)
        yield
    finally:
        for name, processor in originals.items():
            model.get_submodule(name).set_processor(processor)


@dataclass(frozen=True)
class LayerPlan:
    """What one traced graph computes.

    Attributes:
        deep: ``"none"``; ``"write"``: the full UNet that also emits the DeepCache feature
            (``names.DEEP_FEATURE``); ``"read"``: only the shallow part of ``branch``, starting from a fed one.
        branch: DeepCache branch (0 = shallowest skip connection); used when ``deep != "none"``.
        xattn: ``"none"``; ``"write"``: also emit every computed attn2 output; ``"read"``: attn2
            outputs are inputs and the graph has no ``encoder_hidden_states`` input.

    Raises:
        InputError: a mode outside the choices above, or a branch that is not a non-negative int
            (the upper bound depends on the UNet and is checked by :class:`LayeredUNet`).
    """

    deep: str = "none"
    branch: int = 0
    xattn: str = "none"

    def __post_init__(self) -> None:
        if self.deep not in CACHE_ROLES:
            raise InputError(f"LayerPlan.deep = {self.deep!r} is not a cache role; "
                             f"expected one of {list(CACHE_ROLES)}")
        if self.xattn not in CACHE_ROLES:
            raise InputError(f"LayerPlan.xattn = {self.xattn!r} is not a cache role; "
                             f"expected one of {list(CACHE_ROLES)}")
        if isinstance(self.branch, bool) or not isinstance(self.branch, int) or self.branch < 0:
            raise InputError(f"LayerPlan.branch = {self.branch!r} is not a DeepCache branch; "
                             "expected a non-negative int (0 = shallowest skip connection)")


def cache_role_io(plan: LayerPlan, xattn_names: list[str]) -> tuple[list[str], list[str]]:
    """The cache inputs a graph of ``plan`` reads and all the outputs it writes (noise_pred first),
    by the cache-role contract (docs/cache-roles.md): a DeepCache read takes the feature a write
    emits; a cross-attention read takes the maps (``xattn_names``) a write emits."""
    inputs = ([names.DEEP_FEATURE] if plan.deep == "read" else []) + (list(xattn_names) if plan.xattn == "read" else [])
    outputs = [names.NOISE_PRED] + ([names.DEEP_FEATURE] if plan.deep == "write" else []) + \
        (list(xattn_names) if plan.xattn == "write" else [])
    return inputs, outputs


# ---------------------------------------------------------------------------------------------
# The UNet's layer schedule


@dataclass(frozen=True)
class _Layer:
    """One step of the layer-by-layer schedule.

    ``kind`` is ``"down"`` (resnet [+ transformer] of a down block), ``"downsample"`` (a down
    block's downsamplers), ``"mid"`` (the whole mid block) or ``"up"`` (cat + resnet
    [+ transformer], then the block's upsamplers when ``upsample``). ``skip`` is the skip
    connection the layer produces (down, downsample) or consumes (up); -1 for mid. ``scale`` is the
    layer's working resolution as a divisor of the latent size (for up layers: before upsampling).
    """

    kind: str
    block: int
    index: int
    skip: int
    scale: int
    xattn: tuple[str, ...]
    attention: bool = False  # the layer has a transformer after its resnet
    upsample: bool = False


@dataclass(frozen=True)
class _Topology:
    """The layer schedule of one UNet and the channel counts needed to size cache tensors."""

    down: tuple[_Layer, ...]  # down[i] produces skip i + 1
    mid: _Layer
    up: tuple[_Layer, ...]  # up[j] consumes skip num_skips - 1 - j
    skip_scales: tuple[int, ...]
    feature_channels: tuple[int, ...]  # channels of h entering the up layer consuming skip b
    xattn_channels: dict[str, int]  # attn2 output channels by qualified name
    context_dim: int
    in_channels: int
    grid: int  # latent sides must be multiples of this: 2 ** (number of downsamplers)
    pooled_dim: int = 0  # SDXL: width of text_embeds (0: the UNet has no text_time embedding)

    @property
    def num_skips(self) -> int:
        return len(self.skip_scales)

    def shallow(self, branch: int) -> tuple[tuple[_Layer, ...], tuple[_Layer, ...]]:
        """The down and up layers the shallow part of ``branch`` recomputes."""
        return self.down[:branch], self.up[self.num_skips - 1 - branch:]


def _reject(what: str) -> ModelSourceError:
    return ModelSourceError(f"{what}; {_UNSUPPORTED_FIX}")


def _check_unet(unet: Any) -> None:
    """Reject everything outside the SD 1.x/2.x family with the reason."""
    if not isinstance(unet, UNet2DConditionModel):
        raise _reject(f"the denoiser is a {type(unet).__name__}, expected a diffusers UNet2DConditionModel")
    config = unet.config
    unsupported = {
        "class embeddings (class_embed_type / num_class_embeds)": unet.class_embedding is not None,
        f"addition embeddings (addition_embed_type={config.addition_embed_type!r})":
            config.addition_embed_type not in (None, TEXT_TIME)
            or (config.addition_embed_type is None and getattr(unet, "add_embedding", None) is not None),
        f"an encoder hidden-state projection (encoder_hid_dim_type={config.encoder_hid_dim_type!r})":
            unet.encoder_hid_proj is not None,
        f"attention_type={config.attention_type!r} (GLIGEN)":
            config.attention_type != "default" or getattr(unet, "position_net", None) is not None,
        "dual cross-attention": bool(config.dual_cross_attention),
    }
    for what, present in unsupported.items():
        if present:
            raise _reject(f"this UNet uses {what}")
    for kind, blocks, allowed in (("down", unet.down_blocks, _SUPPORTED_DOWN), ("up", unet.up_blocks, _SUPPORTED_UP)):
        for i, block in enumerate(blocks):
            if type(block) not in allowed:
                raise _reject(f"{kind} block {i} is a {type(block).__name__}, expected one of "
                              f"{[cls.__name__ for cls in allowed]}")
    if type(unet.mid_block) is not UNetMidBlock2DCrossAttn:
        raise _reject(f"the mid block is {type(unet.mid_block).__name__ if unet.mid_block is not None else None}, "
                      "expected UNetMidBlock2DCrossAttn")
    _check_no_freeu(unet)


def _check_no_freeu(unet: UNet2DConditionModel) -> None:
    # FreeU rescales skips inside the up blocks' own forward, which the layered schedule bypasses.
    for i, block in enumerate(unet.up_blocks):
        if any(getattr(block, key, None) for key in ("s1", "s2", "b1", "b2")):
            raise ModelSourceError(f"FreeU is enabled on up block {i}; the layered UNet does not apply it. "
                                   "Call unet.disable_freeu() before building a LayeredUNet")


def _attn2_of(prefix: str, transformer: Any, channels: dict[str, int], context_dims: set[int]) -> tuple[str, ...]:
    """Qualified names of the attn2 modules inside one transformer, in execution order."""
    if type(transformer) is not Transformer2DModel or not transformer.is_input_continuous:
        raise _reject(f"{prefix} is a {type(transformer).__name__}, expected a Transformer2DModel on feature maps")
    found = []
    for k, block in enumerate(transformer.transformer_blocks):
        where = f"{prefix}.transformer_blocks.{k}"
        if type(block) is not BasicTransformerBlock:
            raise _reject(f"{where} is a {type(block).__name__}, expected BasicTransformerBlock")
        if block.norm_type != "layer_norm" or block.only_cross_attention or block.pos_embed is not None:
            raise _reject(f"{where} is configured with norm_type={block.norm_type!r}, "
                          f"only_cross_attention={block.only_cross_attention}, "
                          f"positional embedding={block.pos_embed is not None}; expected a plain SD block "
                          "(layer_norm, self- then cross-attention, no positional embedding)")
        if block.attn2 is None or not block.attn2.is_cross_attention:
            raise _reject(f"{where} has no cross-attention (attn2)")
        name = f"{where}.attn2"
        channels[name] = block.attn2.to_out[0].out_features
        context_dims.add(block.attn2.to_k.in_features)
        found.append(name)
    return tuple(found)


def _topology(unet: UNet2DConditionModel) -> _Topology:
    """Validate ``unet`` and lay out its skips and layers (see the module docstring)."""
    _check_unet(unet)
    xattn_channels: dict[str, int] = {}
    context_dims: set[int] = set()

    # Down path: every layer output and every downsampler output is a skip.
    scale = 1
    skip_scales = [1]
    skip_channels = [unet.conv_in.out_channels]
    down = []
    for i, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            xattn: tuple[str, ...] = ()
            channels = resnet.out_channels
            if attentions is not None:
                xattn = _attn2_of(f"down_blocks.{i}.attentions.{j}", attentions[j], xattn_channels, context_dims)
                channels = attentions[j].out_channels
            down.append(_Layer("down", i, j, len(skip_scales), scale, xattn, attention=attentions is not None))
            skip_scales.append(scale)
            skip_channels.append(channels)
        if block.downsamplers is not None:
            down.append(_Layer("downsample", i, 0, len(skip_scales), scale, ()))
            scale *= 2 ** len(block.downsamplers)
            skip_scales.append(scale)
            skip_channels.append(block.downsamplers[-1].out_channels)

    mid_xattn = tuple(name for j, attn in enumerate(unet.mid_block.attentions)
                      for name in _attn2_of(f"mid_block.attentions.{j}", attn, xattn_channels, context_dims))
    mid = _Layer("mid", 0, 0, -1, scale, mid_xattn)

    # Up path: layers consume the skips in reverse; each block's upsampler follows its last layer.
    num_skips = len(skip_scales)
    consumed = sum(len(block.resnets) for block in unet.up_blocks)
    if consumed != num_skips:
        raise _reject(f"the up blocks consume {consumed} skip connections but the down path produces {num_skips}")
    up = []
    feature_channels = [0] * num_skips
    skip = num_skips
    for i, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            skip -= 1
            xattn = ()
            if attentions is not None:
                xattn = _attn2_of(f"up_blocks.{i}.attentions.{j}", attentions[j], xattn_channels, context_dims)
            # The resnet sees cat([h, skip]): its input width minus the skip's is the width of h.
            feature_channels[skip] = resnet.in_channels - skip_channels[skip]
            if feature_channels[skip] <= 0:
                raise _reject(f"up_blocks.{i}.resnets.{j} takes {resnet.in_channels} channels, not more than "
                              f"its skip connection's {skip_channels[skip]}")
            last = j == len(block.resnets) - 1
            up.append(_Layer("up", i, j, skip, skip_scales[skip], xattn, attention=attentions is not None,
                             upsample=last and block.upsamplers is not None))

    if len(context_dims) > 1:
        raise _reject(f"the cross-attention modules take contexts of different widths {sorted(context_dims)}")
    pooled_dim = 0
    if unet.config.addition_embed_type == TEXT_TIME:
        # add_embedding takes cat([text_embeds, 6 sinusoidal size embeddings]).
        pooled_dim = unet.add_embedding.linear_1.in_features - 6 * unet.add_time_proj.num_channels
    return _Topology(
        down=tuple(down), mid=mid, up=tuple(up), skip_scales=tuple(skip_scales),
        feature_channels=tuple(feature_channels), xattn_channels=xattn_channels,
        context_dim=next(iter(context_dims), int(unet.config.cross_attention_dim)),
        in_channels=unet.conv_in.in_channels, grid=scale, pooled_dim=pooled_dim,
    )


def _check_branch(topology: _Topology, plan: LayerPlan) -> None:
    if plan.deep != "none" and plan.branch >= topology.num_skips:
        raise InputError(
            f"DeepCache branch {plan.branch} does not exist in this UNet: valid branches are "
            f"0..{topology.num_skips - 1} (0 = shallowest skip connection, {topology.num_skips - 1} = the one "
            "beside the mid block); pick a branch in that range"
        )


def _planned_xattn(topology: _Topology, plan: LayerPlan) -> list[str]:
    if plan.deep == "read":
        down, up = topology.shallow(plan.branch)
        layers: Sequence[_Layer] = (*down, *up)
    else:
        layers = (*topology.down, topology.mid, *topology.up)
    return [name for layer in layers for name in layer.xattn]


def num_branches(unet: UNet2DConditionModel) -> int:
    """Number of DeepCache branches (= skip connections) of ``unet``; valid branches are 0..n-1.

    Raises:
        ModelSourceError: ``unet`` is not a supported SD 1.x/2.x UNet.
    """
    return _topology(unet).num_skips


def xattn_modules(unet: UNet2DConditionModel, plan: LayerPlan) -> list[str]:
    """Qualified names of the attn2 modules the plan's graph computes, in execution order.

    All of them for ``deep`` in ("none", "write"); only those inside the recomputed shallow layers
    for ``deep == "read"``. E.g. ``'down_blocks.0.attentions.0.transformer_blocks.0.attn2'``.

    Raises:
        ModelSourceError: ``unet`` is not a supported SD 1.x/2.x UNet.
        InputError: the plan's branch does not exist in ``unet``.
    """
    topology = _topology(unet)
    _check_branch(topology, plan)
    return _planned_xattn(topology, plan)


# ---------------------------------------------------------------------------------------------
# Temporary attn2 processors


class _Tap:
    """Runs the original processor and keeps its output (the attn2 output) under ``name``."""

    def __init__(self, inner: Any, name: str, sink: dict[str, torch.Tensor]) -> None:
        self.inner, self.name, self.sink = inner, name, sink

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        out = self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                         attention_mask=attention_mask, **kwargs)
        self.sink[self.name] = out
        return out


class _Replay:
    """Computes nothing: returns the fed attn2 output in place of the cross-attention."""

    def __init__(self, cached: torch.Tensor) -> None:
        self.cached = cached

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        return self.cached


# ---------------------------------------------------------------------------------------------
# The module


class LayeredUNet(torch.nn.Module):
    """A ``UNet2DConditionModel`` driven layer by layer as ``plan`` says (see the module docstring).

    ``forward`` takes the tensors named in :attr:`input_names`, positionally and in that order, and
    returns a tuple in :attr:`output_names` order:

    * inputs: ``sample`` (B, C, h, w); ``timestep`` (B,) float32; ``names.TIMESTEP_COND`` (B, D_cond)
      for LCM-distilled UNets (``time_cond_proj_dim``); ``encoder_hidden_states``
      (B, L, D) unless ``xattn == "read"`` (or the plan computes no attn2 at all, which no
      SD 1.x/2.x shallow part does); SDXL UNets (``addition_embed_type="text_time"``) then take
      ``names.TEXT_EMBEDS`` (B, P) and ``names.TIME_IDS`` (B, 6) float32 in every variant (they feed
      the time embedding, which every layer uses); ``names.DEEP_FEATURE`` if ``deep == "read"``; then one
      :func:`xattn_tensor_name` per :func:`xattn_modules` entry if ``xattn == "read"``.
    * outputs: ``noise_pred`` (B, C_out, h, w); ``names.DEEP_FEATURE`` if ``deep == "write"``; then one
      xattn tensor per :func:`xattn_modules` entry if ``xattn == "write"``, each (B, h'·w', C').

    The wrapped UNet is registered as the submodule ``unet`` (parameter names ``unet.*``, as in the
    plain UNet graph) and is left unchanged by ``forward``.

    Raises:
        ModelSourceError: ``unet`` is not a supported SD 1.x/2.x UNet.
        InputError: the plan's branch does not exist in ``unet``.
    """

    def __init__(self, unet: UNet2DConditionModel, plan: LayerPlan) -> None:
        super().__init__()
        self._topo = _topology(unet)
        _check_branch(self._topo, plan)
        self.unet = unet
        self.plan = plan
        self.xattn_names = _planned_xattn(self._topo, plan)
        cache_names = [xattn_tensor_name(name) for name in self.xattn_names]
        self.input_names: list[str] = [names.SAMPLE, names.TIMESTEP]
        # LCM-distilled UNets take the guidance scale as an embedding added to the time embedding.
        self.time_cond_dim: int | None = unet.config.time_cond_proj_dim
        if self.time_cond_dim is not None:
            self.input_names.append(names.TIMESTEP_COND)
        # The context feeds only attn2. A graph that reads every attn2 output, or whose layers hold
        # none (a shallow part without transformers), does not take it: the exporter would drop an
        # unused input anyway, and the graph's inputs must match these names.
        if plan.xattn != "read" and self.xattn_names:
            self.input_names.append(names.CONTEXT)
        if self._topo.pooled_dim:
            self.input_names += [names.TEXT_EMBEDS, names.TIME_IDS]
        cache_inputs, self.output_names = cache_role_io(plan, cache_names)
        self.input_names += cache_inputs

    # -- shapes ------------------------------------------------------------------------------

    def cache_shapes(self, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the cache tensors this plan exchanges (DeepCache feature, xattn) at latent ``height`` x
        ``width``.

        Raises:
            InputError: ``height`` or ``width`` is not on the UNet's grid.
        """
        self._check_grid(height, width)
        topo, plan = self._topo, self.plan
        shapes: dict[str, tuple[int, ...]] = {}
        if plan.deep != "none":
            s = topo.skip_scales[plan.branch]
            shapes[names.DEEP_FEATURE] = (batch, topo.feature_channels[plan.branch], height // s, width // s)
        if plan.xattn != "none":
            scales = {name: layer.scale for layer in (*topo.down, topo.mid, *topo.up) for name in layer.xattn}
            for name in self.xattn_names:
                s = scales[name]
                # attn2 works on the flattened feature map: one token per latent cell at its scale.
                shapes[xattn_tensor_name(name)] = (batch, (height // s) * (width // s), topo.xattn_channels[name])
        return shapes

    def _check_grid(self, height: int, width: int) -> None:
        grid = self._topo.grid
        if height <= 0 or width <= 0 or height % grid or width % grid:
            raise InputError(f"latent size {height}x{width} is not on this UNet's grid: height and width must be "
                             f"positive multiples of {grid} (2 ** number of downsamplers); pick a size on the grid")

    def example_inputs(self, batch: int, height: int, width: int, context_len: int,
                       generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Seeded example inputs in :attr:`input_names` order, for tracing at latent ``height`` x ``width``.

        ``context_len`` is the text length L of ``encoder_hidden_states`` (unused for ``xattn="read"``).
        Cache inputs get random values of exactly the shape the matching write graph emits.
        """
        if batch <= 0 or context_len <= 0:
            raise InputError(f"example inputs need batch >= 1 and context_len >= 1, got batch={batch}, "
                             f"context_len={context_len}")
        dtype = self.unet.dtype
        shapes = self.cache_shapes(batch, height, width)
        shapes[names.SAMPLE] = (batch, self._topo.in_channels, height, width)
        shapes[names.CONTEXT] = (batch, context_len, self._topo.context_dim)
        if self.time_cond_dim is not None:
            shapes[names.TIMESTEP_COND] = (batch, self.time_cond_dim)
        shapes[names.TEXT_EMBEDS] = (batch, self._topo.pooled_dim)
        inputs = []
        for name in self.input_names:
            if name == names.TIMESTEP:
                inputs.append(torch.randint(0, 1000, (batch,), generator=generator).to(torch.float32))
            elif name == names.TIME_IDS:  # pixel sizes and crop offsets, as SDXL's pipeline passes them
                inputs.append(torch.randint(0, 1025, (batch, 6), generator=generator).to(torch.float32))
            else:
                inputs.append(torch.randn(shapes[name], generator=generator, dtype=dtype))
        return tuple(inputs)

    def _bind(self, inputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Name the positional inputs and check their shapes."""
        if len(inputs) != len(self.input_names):
            raise InputError(f"LayeredUNet got {len(inputs)} inputs; expected {len(self.input_names)}: "
                             f"{self.input_names}, in that order")
        bound = dict(zip(self.input_names, inputs))
        sample = bound[names.SAMPLE]
        if sample.ndim != 4 or sample.shape[1] != self._topo.in_channels:
            raise InputError(f"{names.SAMPLE} has shape {tuple(sample.shape)}; expected "
                             f"(batch, {self._topo.in_channels}, height, width)")
        batch, _, height, width = (int(d) for d in sample.shape)
        expected = self.cache_shapes(batch, height, width)
        expected[names.TIMESTEP] = (batch,)
        if self.time_cond_dim is not None:
            expected[names.TIMESTEP_COND] = (batch, self.time_cond_dim)
        if self._topo.pooled_dim:
            expected[names.TEXT_EMBEDS] = (batch, self._topo.pooled_dim)
            expected[names.TIME_IDS] = (batch, 6)
        for name, shape in expected.items():
            if name in bound and tuple(bound[name].shape) != shape:
                raise InputError(f"{name} has shape {tuple(bound[name].shape)}; expected {shape} for a "
                                 f"{names.SAMPLE} of shape {tuple(sample.shape)}; feed the tensor the matching "
                                 "write graph emitted for this batch and resolution")
        if names.CONTEXT in bound:
            context = bound[names.CONTEXT]
            if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != self._topo.context_dim:
                raise InputError(f"{names.CONTEXT} has shape {tuple(context.shape)}; expected "
                                 f"({batch}, length, {self._topo.context_dim})")
        return bound

    # -- forward -----------------------------------------------------------------------------

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        _check_no_freeu(self.unet)
        bound = self._bind(inputs)
        plan = self.plan
        taps: dict[str, torch.Tensor] = {}
        if plan.xattn == "write":
            processors: dict[str, Any] = {name: _Tap(self.unet.get_submodule(name).processor, name, taps)
                                          for name in self.xattn_names}
        elif plan.xattn == "read":
            processors = {name: _Replay(bound[xattn_tensor_name(name)]) for name in self.xattn_names}
        else:
            processors = {}
        with attn2_processors(self.unet, processors):
            noise_pred, feature = self._run(bound[names.SAMPLE], bound[names.TIMESTEP],
                                            bound.get(names.CONTEXT), bound.get(names.DEEP_FEATURE),
                                            timestep_cond=bound.get(names.TIMESTEP_COND),
                                            text_embeds=bound.get(names.TEXT_EMBEDS),
                                            time_ids=bound.get(names.TIME_IDS))
        outputs = [noise_pred]
        if plan.deep == "write":
            outputs.append(feature)
        if plan.xattn == "write":
            missing = [name for name in self.xattn_names if name not in taps]
            if missing:  # a diffusers change that skips attn2 calls; not a user error
                raise RuntimeError(f"cross-attention modules {missing} were not called during the forward")
            outputs += [taps[name] for name in self.xattn_names]
        return tuple(outputs)

    def _run(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor | None,
             cached: torch.Tensor | None, timestep_cond: torch.Tensor | None = None,
             text_embeds: torch.Tensor | None = None,
             time_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The UNet in diffusers' op order; returns (noise_pred, DeepCache feature or None)."""
        unet, topo, plan = self.unet, self._topo, self.plan

        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        # Time embedding: sinusoidal/Fourier projection (float32) cast to the model dtype, then the MLP
        # (which first adds the projected guidance embedding, for LCM-distilled UNets).
        emb = unet.time_embedding(unet.time_proj(timestep).to(dtype=sample.dtype), timestep_cond)
        if topo.pooled_dim:
            # SDXL "text_time": emb += MLP(cat[text_embeds, sinusoid(each of the 6 size ids)]).
            sizes = unet.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)
            emb = emb + unet.add_embedding(torch.concat([text_embeds, sizes], dim=-1).to(emb.dtype))
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)

        h = unet.conv_in(sample)
        skips = [h]
        if plan.deep == "read":
            down, up = topo.shallow(plan.branch)
        else:
            down, up = topo.down, topo.up
        for layer in down:
            block = unet.down_blocks[layer.block]
            if layer.kind == "downsample":
                for downsampler in block.downsamplers:
                    h = downsampler(h)
            else:
                h = block.resnets[layer.index](h, emb)
                if layer.attention:
                    h = block.attentions[layer.index](h, encoder_hidden_states=context, return_dict=False)[0]
            skips.append(h)

        feature = None
        if plan.deep == "read":
            h = cached  # the state that entered up layer `branch` on the last refresh step
        else:
            h = unet.mid_block(h, emb, encoder_hidden_states=context)

        for layer in up:
            if plan.deep == "write" and layer.skip == plan.branch:
                feature = h
            block = unet.up_blocks[layer.block]
            h = torch.cat([h, skips[layer.skip]], dim=1)
            h = block.resnets[layer.index](h, emb)
            if layer.attention:
                h = block.attentions[layer.index](h, encoder_hidden_states=context, return_dict=False)[0]
            if layer.upsample:
                for upsampler in block.upsamplers:
                    h = upsampler(h)

        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        return unet.conv_out(h), feature
