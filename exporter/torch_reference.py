"""The torch reference executor: any schedule, run on the diffusers model in PyTorch.

It is the yardstick for the runtime's :class:`~postdiff.runtime.executor.ScheduleExecutor` and what
we time on a GPU. It shares only the schedule's meaning (``plan_steps``) and the seeded switch noise
with the runtime; everything numeric is torch and diffusers: diffusers' schedulers (their own
``add_noise`` and x̂0 formulas), ``torch.nn.functional.interpolate`` for the upsample, and the real
UNet modules wrapped by :class:`~postdiff.exporter.layered_unet.LayeredUNet`.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import diffusers
import numpy as np
import torch
import torch.nn.functional as F

from postdiff.exporter.layered_unet import LayeredUNet, LayerPlan
from postdiff.runtime.names import DEEP_FEATURE, xattn_tensor_name
from postdiff.exporter.models import LoadedModel
from postdiff.runtime import names
from postdiff.runtime.executor import switch_noise
from postdiff.runtime.schedule import Schedule, Variant, latent_size, plan_steps
from postdiff.runtime.schedulers import SCHEDULERS, make_scheduler
from postdiff.runtime.schedulers.base import step_noise
from postdiff.exporter.scheduler_config import normalize_config

#: The diffusers class of every sampler the runtime ports, by registry name.
DIFFUSERS_SCHEDULERS = {name: getattr(diffusers, cls.diffusers_class) for name, cls in SCHEDULERS.items()}


def diffusers_scheduler(name: str, config: dict) -> object:
    """diffusers' own scheduler ``name`` (a key of SCHEDULERS) from a model's scheduler config."""
    return DIFFUSERS_SCHEDULERS[name].from_config(config)


def inference_steps_for(name: str, config: dict, count: int) -> int:
    """The ``num_inference_steps`` that make sampler ``name`` give ``count`` timesteps (PNDM: one fewer)."""
    return make_scheduler(name, normalize_config(config)).num_inference_steps_for(count)


@contextmanager
def seeded_noise(name: str, seed: int, start: int = 0) -> Iterator[None]:
    """While active, the noise diffusers' stochastic sampler ``name`` draws is the runtime's:
    draw k is ``step_noise(seed, start + k)`` (one draw per step, in step order), so that the torch
    reference and diffusers' pipeline reproduce the runtime's seeded Euler Ancestral / LCM runs."""
    if not SCHEDULERS[name].stochastic:
        yield
        return
    module = inspect.getmodule(DIFFUSERS_SCHEDULERS[name])
    original = module.randn_tensor
    drawn = itertools.count(start)
    module.randn_tensor = lambda shape, **kwargs: torch.from_numpy(step_noise(seed, next(drawn), tuple(shape)))
    try:
        yield
    finally:
        module.randn_tensor = original


@dataclass(frozen=True)
class TorchSdxlConditioning:
    """SDXL conditioning as diffusers' pipeline computes it: [negative; positive] rows."""

    context: torch.Tensor  # (2, L, D1 + D2)
    text_embeds: torch.Tensor  # (2, P)
    pipe: object  # the StableDiffusionXLPipeline that made them (for its _get_add_time_ids)


@dataclass(frozen=True)
class TorchPixArtConditioning:
    """PixArt-alpha conditioning as diffusers' ``PixArtAlphaPipeline.encode_prompt`` computes it."""

    context: torch.Tensor  # (2, 120, D) [negative; positive]
    mask: torch.Tensor  # (2, 120) int64


def pixart_pipeline(model: LoadedModel, scheduler=None):
    """diffusers' ``PixArtAlphaPipeline`` over the model's modules."""
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline(tokenizer=model.tokenizer, text_encoder=model.text_encoder, vae=model.vae,
                               transformer=model.unet,
                               scheduler=scheduler or diffusers.DDIMScheduler.from_config(model.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def pixart_encode_pair(model: LoadedModel, prompt: str, negative_prompt: str, guidance: float) -> TorchPixArtConditioning:
    """[negative; positive] T5 states and masks from diffusers' own ``encode_prompt`` (clean_caption off)."""
    guided = guidance > 1.0
    embeds, mask, negative, negative_mask = pixart_pipeline(model).encode_prompt(
        prompt, do_classifier_free_guidance=guided, negative_prompt=negative_prompt, clean_caption=False)
    if not guided:
        negative, negative_mask = embeds, mask
    return TorchPixArtConditioning(torch.cat([negative, embeds]), torch.cat([negative_mask, mask]))


class TorchReferenceExecutor:
    """Runs a schedule with torch modules; the same call signature as the runtime's pipeline."""

    def __init__(self, model: LoadedModel, schedule: Schedule, latent: tuple[int, int]) -> None:
        self.model = model
        self.schedule = schedule
        self.latent = latent
        self._modules: dict[LayerPlan, LayeredUNet] = {}
        self._feature: torch.Tensor | None = None
        self._xattn: dict[str, torch.Tensor] = {}

    def encode(self, prompt: str, negative_prompt: str, guidance: float) -> torch.Tensor | TorchSdxlConditioning:
        """[negative; positive] hidden states (SDXL: and pooled embeddings), as diffusers' pipeline
        computes them."""
        if self.model.is_sdxl:
            return sdxl_encode_pair(self.model, prompt, negative_prompt, guidance)
        if self.model.is_pixart:
            return pixart_encode_pair(self.model, prompt, negative_prompt, guidance)
        return encode_pair(self.model, prompt, negative_prompt, guidance)

    @torch.no_grad()
    def run(self, scheduler_name: str, latents: np.ndarray, context: torch.Tensor | TorchSdxlConditioning,
            guidance: float, seed: int) -> np.ndarray:
        """Final latents for initial noise ``latents`` (numpy, at the first step's size)."""
        config = self.model.scheduler_config
        scheduler = diffusers_scheduler(scheduler_name, config)
        scheduler.set_timesteps(inference_steps_for(scheduler_name, config, len(self.schedule.steps)))
        self._feature, self._xattn = None, {}
        from postdiff.exporter.pixart_reference import PixArtCaches

        self._pixart = PixArtCaches()
        x = torch.from_numpy(latents) * scheduler.init_noise_sigma
        no_warm_up = False
        with seeded_noise(scheduler_name, seed):
            for plan, t in zip(plan_steps(self.schedule), scheduler.timesteps):
                if plan.switch_from is not None:
                    eps = self._evaluate(plan.switch_from, scheduler, x, t, context, guidance)
                    x0 = _predict_x0(scheduler, eps, t, x)
                    size = self._size(plan.variant)
                    up = F.interpolate(x0, size=size, mode="bilinear", align_corners=False)
                    noise = torch.from_numpy(switch_noise(seed, plan.index, tuple(up.shape)))
                    x = scheduler.add_noise(up, noise, t.reshape(1))
                    no_warm_up = _reset_history(scheduler) or no_warm_up
                    self._feature = None
                    self._pixart.residual = None
                eps = self._evaluate(plan.variant, scheduler, x, t, context, guidance)
                x = scheduler.step(eps, t, x, return_dict=False)[0]
                if no_warm_up and scheduler.counter == 1:
                    scheduler.counter = 2  # PNDM after a reset: Adams-Bashforth, no second warm-up
        return x.numpy()

    def _size(self, variant: Variant) -> tuple[int, int]:
        return latent_size(self.latent, variant.scale, self.model.downsample_factor)

    def _time_ids(self, context: TorchSdxlConditioning, variant: Variant) -> torch.Tensor:
        """diffusers' add_time_ids for a stage: original size = the full image, no crop, target size =
        the stage's own pixel size (the rule docs/sdxl.md argues for)."""
        scale = self.model.vae_scale_factor
        full = (self.latent[0] * scale, self.latent[1] * scale)
        stage_h, stage_w = self._size(variant)
        return context.pipe._get_add_time_ids(full, (0, 0), (stage_h * scale, stage_w * scale), torch.float32,
                                              int(self.model.text_encoder_2.config.projection_dim))

    def _module(self, variant: Variant) -> LayeredUNet:
        plan = LayerPlan(deep=variant.deep, branch=variant.branch, xattn=variant.xattn)
        if plan not in self._modules:
            self._modules[plan] = LayeredUNet(self.model.unet, plan)
        return self._modules[plan]

    def _evaluate_pixart(self, variant: Variant, scheduler, x: torch.Tensor, t: torch.Tensor,
                         context: TorchPixArtConditioning, guidance: float) -> torch.Tensor:
        """One PixArt-alpha evaluation on diffusers' own forward (exporter/pixart_reference.py), guided,
        then the epsilon half of a learned-sigma output (as PixArtAlphaPipeline)."""
        from postdiff.exporter.pixart_reference import reference_eps

        batch = torch.cat([x, x]) if variant.batch == 2 else x
        rows = slice(None) if variant.batch == 2 else slice(1, None)
        scale = self.model.vae_scale_factor
        h, w = self._size(variant)

        def keep(value: torch.Tensor) -> torch.Tensor:
            if value.shape[0] == 1:
                return value
            return (value[:1] + value[1:]) / 2 if self.schedule.xattn_mode == "ave" else value[1:]

        out = reference_eps(self.model.unet, scheduler.scale_model_input(batch, t), t.reshape(1).to(torch.float32),
                            context.context[rows], context.mask[rows], (h * scale, w * scale), variant.deep,
                            variant.branch, variant.xattn, self._pixart, keep)
        if variant.batch == 2:
            uncond, cond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        channels = self.model.unet.config.in_channels
        return out[:, :channels] if out.shape[1] == 2 * channels else out

    def _evaluate(self, variant: Variant, scheduler, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                  guidance: float) -> torch.Tensor:
        if self.model.is_pixart:
            return self._evaluate_pixart(variant, scheduler, x, t, context, guidance)
        module = self._module(variant)
        batch = torch.cat([x, x]) if variant.batch == 2 else x
        rows = slice(None) if variant.batch == 2 else slice(1, None)
        values = {
            names.SAMPLE: scheduler.scale_model_input(batch, t),
            names.TIMESTEP: t.to(torch.float32).expand(variant.batch),
            DEEP_FEATURE: self._feature,
        }
        if module.time_cond_dim is not None:
            values[names.TIMESTEP_COND] = torch_guidance_embedding(guidance, module.time_cond_dim).expand(
                variant.batch, -1)
        if isinstance(context, TorchSdxlConditioning):
            values[names.CONTEXT] = context.context[rows]
            values[names.TEXT_EMBEDS] = context.text_embeds[rows]
            values[names.TIME_IDS] = self._time_ids(context, variant).expand(variant.batch, 6)
        else:
            values[names.CONTEXT] = context[rows]
        values.update(self._xattn)
        outputs = dict(zip(module.output_names, module(*(values[n] for n in module.input_names))))
        if variant.deep == "write":
            self._feature = outputs[DEEP_FEATURE]
        if variant.xattn == "write":
            self._xattn = {}
            for name in module.xattn_names:
                value = outputs[xattn_tensor_name(name)]
                if value.shape[0] == 2:
                    value = (value[:1] + value[1:]) / 2 if self.schedule.xattn_mode == "ave" else value[1:]
                self._xattn[xattn_tensor_name(name)] = value
        eps = outputs[names.NOISE_PRED]
        if variant.batch == 1:
            return eps
        uncond, cond = eps.chunk(2)
        return uncond + guidance * (cond - uncond)


def torch_guidance_embedding(guidance: float, dim: int) -> torch.Tensor:
    """diffusers' own guidance-scale embedding of w = guidance - 1 (what its pipelines feed an LCM UNet)."""
    from diffusers import StableDiffusionPipeline

    w = torch.tensor([guidance - 1.0])
    return StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)


@torch.no_grad()
def encode_pair(model: LoadedModel, prompt: str, negative_prompt: str, guidance: float) -> torch.Tensor:
    """[negative; positive] conditioning states (2, L', D); both rows are the prompt's when guidance is off."""
    def hidden(text: str) -> torch.Tensor:
        return model.encode_ids(model.token_ids(text))

    positive = hidden(prompt)
    return torch.cat([hidden(negative_prompt) if guidance > 1.0 else positive, positive])


def sdxl_pipeline(model: LoadedModel, scheduler=None):
    """diffusers' ``StableDiffusionXLPipeline`` over the model's modules (no watermarker)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2, tokenizer=model.tokenizer,
        tokenizer_2=model.tokenizer_2, unet=model.unet,
        scheduler=scheduler or diffusers.DDIMScheduler.from_config(model.scheduler_config),
        force_zeros_for_empty_prompt=model.force_zeros_for_empty_prompt, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sdxl_encode_pair(model: LoadedModel, prompt: str, negative_prompt: str, guidance: float) -> TorchSdxlConditioning:
    """[negative; positive] SDXL conditioning from diffusers' own ``encode_prompt``; an empty negative
    prompt is passed as none (diffusers then zeroes it when force_zeros_for_empty_prompt)."""
    pipe = sdxl_pipeline(model)
    guided = guidance > 1.0
    positive, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt, do_classifier_free_guidance=guided, negative_prompt=negative_prompt or None)
    if not guided:
        negative, negative_pooled = positive, pooled
    return TorchSdxlConditioning(torch.cat([negative, positive]), torch.cat([negative_pooled, pooled]), pipe)


def _predict_x0(scheduler, eps: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """diffusers' own x̂0 for the sample ``x`` at ``t`` (without advancing the scheduler): each class's
    conversion where it has one, else the formula its step uses."""
    if isinstance(scheduler, diffusers.DDIMScheduler):
        return scheduler.step(eps, t, x, return_dict=True).pred_original_sample  # stateless
    abar = scheduler.alphas_cumprod[int(t)]
    if isinstance(scheduler, (diffusers.PNDMScheduler, diffusers.LCMScheduler)):
        if scheduler.config.prediction_type == "epsilon":
            x0 = (x - (1 - abar) ** 0.5 * eps) / abar**0.5
        elif scheduler.config.prediction_type == "v_prediction":
            x0 = abar**0.5 * x - (1 - abar) ** 0.5 * eps
        else:
            x0 = eps
        if isinstance(scheduler, diffusers.PNDMScheduler):
            return x0
        # LCM: the consistency function's output (what its step re-noises)
        if scheduler.config.clip_sample:
            x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        return c_out * x0 + c_skip * x
    if scheduler.step_index is None:
        scheduler._init_step_index(t)
    if isinstance(scheduler, diffusers.DPMSolverMultistepScheduler):
        if scheduler.config.algorithm_type == "dpmsolver++":
            return scheduler.convert_model_output(eps, sample=x)
    if isinstance(scheduler, diffusers.UniPCMultistepScheduler) and scheduler.predict_x0:
        return scheduler.convert_model_output(eps, sample=x)
    sigma = scheduler.sigmas[scheduler.step_index]
    if isinstance(scheduler, (diffusers.DPMSolverMultistepScheduler, diffusers.UniPCMultistepScheduler)):
        alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(sigma)
        if scheduler.config.prediction_type == "epsilon":
            return (x - sigma_t * eps) / alpha_t
        if scheduler.config.prediction_type == "v_prediction":
            return alpha_t * x - sigma_t * eps
        return eps
    # Euler / Euler Ancestral, in sigma space
    if scheduler.config.prediction_type == "epsilon":
        return x - sigma * eps
    if scheduler.config.prediction_type == "v_prediction":
        # v-prediction in sigma space: x0 = -sigma/(sigma^2+1)^0.5 * v + x/(sigma^2+1)
        return eps * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    return eps


def _reset_history(scheduler) -> bool:
    """Forget multistep history so the next step is first order, keep the position (the runtime's
    ``Scheduler.reset``). Returns True for PNDM, whose warm-up must not run again: the caller then
    moves its step counter past the warm-up's special step."""
    if isinstance(scheduler, (diffusers.DPMSolverMultistepScheduler, diffusers.UniPCMultistepScheduler)):
        scheduler.model_outputs = [None] * scheduler.config.solver_order
        scheduler.lower_order_nums = 0
    if isinstance(scheduler, diffusers.UniPCMultistepScheduler):
        scheduler.last_sample = None
    if isinstance(scheduler, diffusers.PNDMScheduler):
        scheduler.ets, scheduler.counter, scheduler.cur_sample = [], 0, None
        return True
    return False


@torch.no_grad()
def diffusers_generate(model: LoadedModel, scheduler_name: str, prompt: str, negative_prompt: str, steps: int,
                       guidance: float, latents: np.ndarray, height: int, width: int,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Plain generation in PyTorch, the way diffusers does it: final latents and uint8 image (H, W, C).

    Text-conditioned models run diffusers' own ``StableDiffusionPipeline`` (SDXL models its
    ``StableDiffusionXLPipeline``), then its VAE decode. Label-conditioned pixel-space models (``digits``) have no diffusers pipeline; they
    run the same loop on the diffusers UNet and scheduler: scale the duplicated sample, one batch-2
    UNet call, classifier-free guidance, scheduler step. ``steps`` is diffusers' num_inference_steps;
    ``seed`` seeds the noise of the stochastic samplers as the runtime does (:func:`seeded_noise`).
    The image is diffusers' own post-processing of the decoded pixels
    (``VaeImageProcessor.postprocess``), never the runtime's.
    """
    scheduler = diffusers_scheduler(scheduler_name, model.scheduler_config)
    with seeded_noise(scheduler_name, seed):
        return _diffusers_generate(model, scheduler, prompt, negative_prompt, steps, guidance, latents, height, width)


def _diffusers_generate(model: LoadedModel, scheduler, prompt: str, negative_prompt: str, steps: int, guidance: float,
                        latents: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    from diffusers import StableDiffusionPipeline
    from diffusers.image_processor import VaeImageProcessor

    if model.labels:
        context = encode_pair(model, prompt, negative_prompt, guidance)
        scheduler.set_timesteps(steps)
        x = torch.from_numpy(latents) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            batch = scheduler.scale_model_input(torch.cat([x, x]), t)
            uncond, cond = model.unet(batch, t, encoder_hidden_states=context, return_dict=False)[0].chunk(2)
            eps = uncond + guidance * (cond - uncond) if guidance > 1.0 else cond
            x = scheduler.step(eps, t, x, return_dict=False)[0]
        return x.numpy(), _postprocessed(VaeImageProcessor(), x)
    if model.is_pixart:
        pipe = pixart_pipeline(model, scheduler)
        final = pipe(prompt, negative_prompt=negative_prompt, height=height, width=width, num_inference_steps=steps,
                     guidance_scale=guidance, latents=torch.from_numpy(latents), output_type="latent",
                     clean_caption=False, use_resolution_binning=False).images
        return final.numpy(), _postprocessed(pipe.image_processor, decode_latents(model, final))
    if model.is_sdxl:
        pipe = sdxl_pipeline(model, scheduler)
        final = pipe(prompt, negative_prompt=negative_prompt or None, height=height, width=width,
                     num_inference_steps=steps, guidance_scale=guidance, latents=torch.from_numpy(latents),
                     output_type="latent").images
        return final.numpy(), _postprocessed(pipe.image_processor, decode_latents(model, final))
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    final = pipe(prompt, negative_prompt=negative_prompt, height=height, width=width, num_inference_steps=steps,
                 guidance_scale=guidance, latents=torch.from_numpy(latents), output_type="latent").images
    decoded = model.vae.decode(final / model.vae.config.scaling_factor, return_dict=False)[0]
    return final.numpy(), _postprocessed(pipe.image_processor, decoded)


def _postprocessed(processor, decoded: torch.Tensor) -> np.ndarray:
    """The first image of ``decoded`` (N, C, H, W) in [-1, 1] as diffusers' pipelines return it
    (``postprocess(..., output_type="pil")``), as uint8 (H, W, C)."""
    pixels = np.asarray(processor.postprocess(decoded, output_type="pil")[0])
    return pixels[..., None] if pixels.ndim == 2 else pixels


@torch.no_grad()
def decode_latents(model: LoadedModel, latents: torch.Tensor) -> torch.Tensor:
    """The VAE decode diffusers' pipelines do after denoising: unscale (SDXL-style latents mean/std
    when the VAE config has them), then decode."""
    config = model.vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, config.latent_channels, 1, 1)
        latents = latents * torch.tensor(std).view(shape) / config.scaling_factor + torch.tensor(mean).view(shape)
    else:
        latents = latents / config.scaling_factor
    return model.vae.decode(latents, return_dict=False)[0]
