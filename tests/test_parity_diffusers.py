"""Whole generations through the torch-free runtime match diffusers' StableDiffusionPipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from postdiff.exporter.torch_reference import DIFFUSERS_SCHEDULERS, diffusers_generate
from postdiff.runtime.pipeline import GenerateOptions, Pipeline


def diffusers_generation(model, scheduler: str, options: GenerateOptions, latents: np.ndarray,
                         height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Final latents and uint8 image from diffusers for the same inputs."""
    return diffusers_generate(model, scheduler, options.prompt, options.negative_prompt, options.steps,
                              options.guidance, latents, height, width)


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


@pytest.mark.parametrize("guidance", [1.0, 0.5])
def test_guidance_off_runs_batch_1_like_diffusers(tiny_bundle: Path, tiny_model, guidance: float) -> None:
    """diffusers skips classifier-free guidance for guidance_scale <= 1 (one batch-1 UNet call per step);
    so does the runtime, on the batch-1 graph the export adds beside the batch-2 one."""
    pipeline = Pipeline(tiny_bundle)
    options = GenerateOptions(prompt="a red cube", seed=1, steps=6, guidance=guidance, scheduler="ddim")
    latents = pipeline.initial_latents(options.seed)
    ours = pipeline.generate(options, latents=latents)
    assert "unet-16x16-b1" in pipeline.open_graphs and "unet-16x16-b2" not in pipeline.open_graphs
    theirs, theirs_image = diffusers_generation(tiny_model, "ddim", options, latents, 32, 32)
    assert float(np.max(np.abs(ours.latents - theirs))) <= 1e-4
    assert int(np.max(np.abs(ours.image.astype(int) - theirs_image.astype(int)))) <= 1


def test_seeded_noise_is_reproducible(tiny_bundle: Path) -> None:
    pipeline = Pipeline(tiny_bundle)
    options = GenerateOptions(prompt="x", seed=7, steps=3)
    first, second = pipeline.generate(options), pipeline.generate(options)
    assert np.array_equal(first.latents, second.latents)
    assert not np.array_equal(first.latents, pipeline.generate(GenerateOptions(prompt="x", seed=8, steps=3)).latents)


def test_label_model_matches_the_diffusers_loop(tmp_path: Path) -> None:
    """`digits` (label-conditioned, pixel space) against the same loop on the diffusers UNet and scheduler."""
    from postdiff.exporter.export import ExportOptions, export_bundle
    from postdiff.exporter.models import load_model

    bundle = tmp_path / "digits"
    export_bundle(ExportOptions(source="digits", out=bundle), progress=False)
    pipeline = Pipeline(bundle)
    options = GenerateOptions(prompt="3", seed=5, steps=10, guidance=3.0, scheduler="dpmpp-2m")
    latents = pipeline.initial_latents(options.seed)
    ours = pipeline.generate(options, latents=latents)
    theirs_latents, theirs_image = diffusers_generation(load_model("digits"), "dpmpp-2m", options, latents, 32, 32)
    assert float(np.max(np.abs(ours.latents - theirs_latents))) <= 1e-4
    assert int(np.max(np.abs(ours.image.astype(int) - theirs_image.astype(int)))) <= 1
