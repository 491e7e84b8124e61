"""Whole generations through the torch-free runtime match diffusers' StableDiffusionPipeline."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from postdiff.exporter.torch_reference import DIFFUSERS_SCHEDULERS, diffusers_generate
from postdiff.errors import InputError
from postdiff.profiles.presets import resolve_schedule
from postdiff.runtime.pipeline import GenerateOptions, Pipeline
from tolerances import latent_tolerance

# stable-diffusion-2-1's scheduler_config.json (v-prediction, DDIM, "leading" spacing).
SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.19.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "rescale_betas_zero_snr": False, "sample_max_value": 1.0,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "thresholding": False,
    "timestep_spacing": "leading", "trained_betas": None,
}


def with_scheduler(bundle: Path, tmp_path: Path, config: dict) -> Path:
    """A copy of ``bundle`` whose manifest records another scheduler config (as an export of the
    same model with that scheduler_config.json would: graphs are unchanged)."""
    import json
    import shutil

    from postdiff.exporter.scheduler_config import normalize_config, scheduler_class

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["scheduler"] = normalize_config(config)
    manifest["scheduler_class"] = scheduler_class(config)
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return copy


def diffusers_generation(model, scheduler: str, options: GenerateOptions, latents: np.ndarray,
                         height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Final latents and uint8 image from diffusers for the same inputs (the image post-processed by
    diffusers' own VaeImageProcessor, so that our to_uint8 is checked, not used on both sides)."""
    return diffusers_generate(model, scheduler, options.prompt, options.negative_prompt, options.steps,
                              options.guidance, latents, height, width, seed=options.seed)


@pytest.mark.parametrize("scheduler", ["ddim", "lcm"])
def test_the_tolerance_catches_a_guidance_off_by_a_thousandth(tiny_bundle: Path, tiny_model, scheduler: str) -> None:
    """The latent tolerance (tests/tolerances.py) is not so loose that a small real error passes: diffusers
    with guidance 7.5 against diffusers with 7.5075 differs by more than it allows (LCM: the largest
    latents, so the loosest absolute tolerance)."""
    pipeline = Pipeline(tiny_bundle)
    options = GenerateOptions(prompt="a red cube on a table", negative_prompt="blurry", seed=3, steps=8,
                              guidance=7.5, scheduler=scheduler)
    latents = pipeline.initial_latents(options.seed)
    right, _ = diffusers_generation(tiny_model, scheduler, options, latents, 32, 32)
    wrong, _ = diffusers_generation(tiny_model, scheduler, replace(options, guidance=7.5 * 1.001), latents, 32, 32)
    diff = float(np.max(np.abs(wrong - right)))
    print(f"{scheduler}: guidance x1.001 moves the final latents by {diff:.2e} (tolerance {latent_tolerance(right):.2e})")
    assert diff > latent_tolerance(right)


@pytest.mark.parametrize("scheduler", sorted(DIFFUSERS_SCHEDULERS))
def test_generation_matches_diffusers(tiny_bundle: Path, tiny_model, scheduler: str) -> None:
    pipeline = Pipeline(tiny_bundle)
    options = GenerateOptions(prompt="a red cube on a table", negative_prompt="blurry", seed=3, steps=8,
                              guidance=7.5, scheduler=scheduler)
    latents = pipeline.initial_latents(options.seed)
    ours = pipeline.generate(options, latents=latents)
    manifest = pipeline.manifest
    theirs_latents, theirs_image = diffusers_generation(tiny_model, scheduler, options, latents,
                                                        manifest.model.height, manifest.model.width)
    latent_diff = float(np.max(np.abs(ours.latents - theirs_latents)))
    image_diff = int(np.max(np.abs(ours.image.astype(int) - theirs_image.astype(int))))
    print(f"{scheduler}: final latents max abs diff {latent_diff:.2e}, image max diff {image_diff}/255")
    assert latent_diff <= latent_tolerance(theirs_latents)
    assert image_diff <= 1


def test_default_is_the_shipped_scheduler(tiny_bundle: Path, tiny_model) -> None:
    """tiny-sd ships SD 1.x's PNDMScheduler: generate without --scheduler runs PNDM (recorded in the
    manifest) and reproduces diffusers' default pipeline, which builds the same class."""
    pipeline = Pipeline(tiny_bundle)
    assert pipeline.manifest.scheduler_class == "PNDMScheduler" and pipeline.default_scheduler == "pndm"
    options = GenerateOptions(prompt="a red cube", seed=4, steps=6, guidance=7.5)
    latents = pipeline.initial_latents(options.seed)
    ours = pipeline.generate(options, latents=latents)
    np.testing.assert_array_equal(ours.latents, pipeline.generate(
        GenerateOptions(prompt="a red cube", seed=4, steps=6, guidance=7.5, scheduler="pndm"), latents=latents).latents)
    theirs, _ = diffusers_generation(tiny_model, "pndm", options, latents, 32, 32)
    assert float(np.max(np.abs(ours.latents - theirs))) <= 1e-4


def test_unported_scheduler_class_is_a_clear_error(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = with_scheduler(tiny_bundle, tmp_path, {"_class_name": "LMSDiscreteScheduler", "beta_schedule": "linear"})
    pipeline = Pipeline(bundle)
    with pytest.raises(InputError, match=r"ships LMSDiscreteScheduler, which postdiff does not port; supported: "
                                         r"DDIMScheduler \(ddim\), PNDMScheduler \(pndm\).*--scheduler NAME"):
        pipeline.generate(GenerateOptions(prompt="x", steps=2))
    assert pipeline.generate(GenerateOptions(prompt="x", steps=2, scheduler="euler")).latents.shape == (1, 4, 16, 16)


@pytest.mark.parametrize("scheduler", [None, *[name for name in DIFFUSERS_SCHEDULERS if name != "ddim"]])
def test_v_prediction_model_matches_diffusers(tiny_bundle: Path, tiny_model, tmp_path: Path,
                                              scheduler: str | None) -> None:
    """An SD-2.1-style folder (v-prediction, DDIM shipped) through the shipped and other samplers."""
    import copy

    pipeline = Pipeline(with_scheduler(tiny_bundle, tmp_path, SD21_SCHEDULER))
    model = copy.copy(tiny_model)
    model.scheduler_config = dict(SD21_SCHEDULER)
    options = GenerateOptions(prompt="a red cube", negative_prompt="blurry", seed=6, steps=8, guidance=7.5,
                              scheduler=scheduler)
    latents = pipeline.initial_latents(options.seed)
    ours = pipeline.generate(options, latents=latents)
    theirs, _ = diffusers_generation(model, scheduler or "ddim", options, latents, 32, 32)
    diff = float(np.max(np.abs(ours.latents - theirs)))
    print(f"v-prediction / {scheduler or 'ddim (shipped)'}: final latents max abs diff {diff:.2e}")
    assert diff <= latent_tolerance(theirs)


@pytest.mark.parametrize("scheduler", sorted(DIFFUSERS_SCHEDULERS))
def test_baseline_preset_matches_diffusers(tiny_bundle: Path, tiny_model, scheduler: str) -> None:
    """The committed `baseline` preset, the reference of every speed-up and fidelity figure, is diffusers'
    StableDiffusionPipeline with 20 model calls (an oracle that shares no schedule code with us)."""
    schedule = resolve_schedule("baseline")
    assert len(schedule.steps) == 20
    pipeline = Pipeline(tiny_bundle)
    options = GenerateOptions(prompt="a cat", negative_prompt="blurry", seed=2, steps=20, guidance=7.5,
                              scheduler=scheduler)
    latents = pipeline.initial_latents(options.seed)
    ours = pipeline.generate(options, latents=latents, schedule=schedule)
    # 20 model calls: PNDM's are 19 inference steps (its warm-up revisits one timestep)
    calls = replace(options, steps=19) if scheduler == "pndm" else options
    theirs, _ = diffusers_generation(tiny_model, scheduler, calls, latents, 32, 32)
    assert float(np.max(np.abs(ours.latents - theirs))) <= latent_tolerance(theirs)


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
    options = GenerateOptions(prompt="3", seed=5, steps=10, guidance=3.0, scheduler="dpm-solver")
    latents = pipeline.initial_latents(options.seed)
    ours = pipeline.generate(options, latents=latents)
    theirs_latents, theirs_image = diffusers_generation(load_model("digits"), "dpm-solver", options, latents, 32, 32)
    assert float(np.max(np.abs(ours.latents - theirs_latents))) <= 1e-4
    assert int(np.max(np.abs(ours.image.astype(int) - theirs_image.astype(int)))) <= 1
