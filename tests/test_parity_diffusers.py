"""Whole generations through the torch-free runtime match diffusers' StableDiffusionPipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

from postdiff.runtime.pipeline import GenerateOptions, Pipeline

DIFFUSERS_SCHEDULERS = {
    "ddim": DDIMScheduler,
    "dpmpp-2m": DPMSolverMultistepScheduler,  # defaults: dpmsolver++, order 2
    "euler": EulerDiscreteScheduler,
}


def diffusers_generation(model, scheduler: str, options: GenerateOptions, latents: np.ndarray,
                         height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Final latents and uint8 image from diffusers for the same inputs."""
    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=DIFFUSERS_SCHEDULERS[scheduler].from_config(model.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        final = pipe(options.prompt, negative_prompt=options.negative_prompt, height=height, width=width,
                     num_inference_steps=options.steps, guidance_scale=options.guidance,
                     latents=torch.from_numpy(latents), output_type="latent").images
        decoded = model.vae.decode(final / model.vae.config.scaling_factor, return_dict=False)[0]
        image = pipe.image_processor.postprocess(decoded, output_type="np")[0]
    return final.numpy(), np.round(image * 255).astype(np.uint8)


@pytest.mark.parametrize("scheduler", sorted(DIFFUSERS_SCHEDULERS))
def test_generation_matches_diffusers(tiny_bundle: Path, tiny_model, scheduler: str) -> None:
    pipeline = Pipeline(tiny_bundle)
    options = GenerateOptions(prompt="a red cube on a table", negative_prompt="blurry", seed=3, steps=12,
                              guidance=7.5, scheduler=scheduler)
    latents = pipeline.initial_latents(options.seed)
    ours = pipeline.generate(options, latents=latents)
    manifest = pipeline.manifest
    theirs_latents, theirs_image = diffusers_generation(tiny_model, scheduler, options, latents,
                                                        manifest.model.height, manifest.model.width)
    latent_diff = float(np.max(np.abs(ours.latents - theirs_latents)))
    image_diff = int(np.max(np.abs(ours.image.astype(int) - theirs_image.astype(int))))
    print(f"{scheduler}: final latents max abs diff {latent_diff:.2e}, image max diff {image_diff}/255")
    assert latent_diff <= 1e-4
    assert image_diff <= 1


def test_guidance_off_uses_the_conditional_prediction(tiny_bundle: Path, tiny_model) -> None:
    pipeline = Pipeline(tiny_bundle)
    options = GenerateOptions(prompt="a red cube", seed=1, steps=6, guidance=1.0, scheduler="ddim")
    latents = pipeline.initial_latents(options.seed)
    ours = pipeline.generate(options, latents=latents)
    theirs, _ = diffusers_generation(tiny_model, "ddim", options, latents, 32, 32)
    assert float(np.max(np.abs(ours.latents - theirs))) <= 1e-4


def test_seeded_noise_is_reproducible(tiny_bundle: Path) -> None:
    pipeline = Pipeline(tiny_bundle)
    options = GenerateOptions(prompt="x", seed=7, steps=3)
    first, second = pipeline.generate(options), pipeline.generate(options)
    assert np.array_equal(first.latents, second.latents)
    assert not np.array_equal(first.latents, pipeline.generate(GenerateOptions(prompt="x", seed=8, steps=3)).latents)
