"""LCM: a latent consistency model (guidance as an embedding, LCMScheduler) through the runtime,
against diffusers' StableDiffusionPipeline and the torch reference, plain and with PostDiff."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from postdiff.exporter.torch_reference import TorchReferenceExecutor, diffusers_generate
from postdiff.errors import InputError, ScheduleError
from postdiff.runtime.guidance import guidance_embedding
from postdiff.runtime.pipeline import GenerateOptions, Pipeline
from postdiff.profiles.presets import resolve_schedule

LCM_PRESETS = ("lcm-4", "postdiff-lcm")


def tolerance(theirs: np.ndarray) -> float:
    """1e-4, or 2e-6 of the latents' scale (a random LCM UNet drives them to ~60)."""
    return max(1e-4, 2e-6 * float(np.abs(theirs).max()))


@pytest.fixture(scope="module")
def lcm_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from postdiff.exporter.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-lcm"
    export_bundle(ExportOptions(source="random:tiny-lcm", out=out, schedules=LCM_PRESETS), progress=False)
    return out


@pytest.fixture(scope="module")
def lcm_model():
    from postdiff.exporter.models import load_model

    return load_model("random:tiny-lcm")


def test_guidance_embedding_matches_diffusers() -> None:
    from diffusers import StableDiffusionPipeline

    for dim in (32, 33, 256):
        for scale in (1.0, 2.5, 8.0):
            theirs = StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.tensor([scale - 1.0]),
                                                                          embedding_dim=dim).numpy()
            ours = guidance_embedding(scale, dim)
            assert ours.shape == (1, dim) and ours.dtype == np.float32
            # sin/cos of float32 angles up to 1000 w: an ulp of a frequency (torch's float32 exp is
            # not correctly rounded, numpy's differs) moves the angle by ~6e-5 w (measured: 4.9e-4
            # at w = 7, D = 256); the end-to-end test below holds the UNet's outputs to 1e-4.
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * max(1.0, scale - 1.0))


def test_lcm_generation_matches_diffusers(lcm_bundle: Path, lcm_model) -> None:
    """Plain 4-step generation with the shipped LCMScheduler, one conditional evaluation per step fed
    the guidance embedding, against diffusers' own pipeline on the same latents and noise."""
    pipeline = Pipeline(lcm_bundle)
    manifest = pipeline.manifest
    assert manifest.model.guidance_embedding == 32 and pipeline.default_scheduler == "lcm"
    options = GenerateOptions(prompt="a red cube on a table", seed=3, steps=4, guidance=8.0)
    latents = pipeline.initial_latents(options.seed)
    ours = pipeline.generate(options, latents=latents)
    theirs, image = diffusers_generate(lcm_model, "lcm", options.prompt, "", 4, 8.0, latents,
                                       manifest.model.height, manifest.model.width, seed=options.seed)
    diff = float(np.max(np.abs(ours.latents - theirs)))
    print(f"tiny-lcm 4 steps: final latents max abs diff {diff:.2e} (scale {np.abs(theirs).max():.1f})")
    assert diff <= tolerance(theirs)
    assert int(np.max(np.abs(ours.image.astype(int) - image.astype(int)))) <= 1
    # The guidance scale reaches the UNet: another scale, other latents.
    other = pipeline.generate(GenerateOptions(prompt=options.prompt, seed=3, steps=4, guidance=2.0), latents=latents)
    assert float(np.max(np.abs(other.latents - ours.latents))) > 1e-3


@pytest.mark.parametrize("preset", LCM_PRESETS)
def test_postdiff_on_lcm_matches_torch_reference(lcm_bundle: Path, lcm_model, preset: str) -> None:
    schedule = resolve_schedule(preset)
    pipeline = Pipeline(lcm_bundle)
    options = GenerateOptions(prompt="a blue sphere", seed=5, steps=len(schedule.steps), guidance=8.0)
    ours = pipeline.generate(options, schedule=schedule)
    reference = TorchReferenceExecutor(lcm_model, schedule, pipeline.manifest.model.latent)
    latents = pipeline.initial_latents(options.seed, pipeline.executor(schedule).first_latent_shape())
    theirs = reference.run("lcm", latents, reference.encode(options.prompt, "", 8.0), 8.0, options.seed)
    diff = float(np.max(np.abs(ours.latents - theirs)))
    print(f"{preset} on tiny-lcm: runtime vs torch reference max abs diff {diff:.2e}")
    assert diff <= tolerance(theirs)


def test_guided_schedules_are_refused_on_an_lcm(lcm_bundle: Path, tmp_path: Path) -> None:
    from postdiff.exporter.export import ExportOptions, export_bundle

    pipeline = Pipeline(lcm_bundle)
    with pytest.raises(ScheduleError, match="takes the guidance scale as an embedding"):
        pipeline.generate(GenerateOptions(prompt="x"), schedule=resolve_schedule("baseline"))
    with pytest.raises(InputError, match="schedule 'postdiff-sd15' runs classifier-free guidance"):
        export_bundle(ExportOptions(source="random:tiny-lcm", out=tmp_path / "b", schedules=("postdiff-sd15",)),
                      progress=False)
    assert not (tmp_path / "b").exists()


def test_lcm_tuning_space_spans_two_to_eight_steps_without_guidance() -> None:
    from postdiff.profiles.tuning import CHEAPER, FEWER, LCM_STEPS_FULL, build, candidates

    pool = candidates(LCM_STEPS_FULL, cfg=False)
    assert {c.steps for c in pool if c.family == FEWER} == {2, 3, 4, 5, 6, 8}
    assert {c.steps for c in pool if c.family == CHEAPER} == {8, 6}
    for candidate in pool:
        assert not any(step.cfg for step in build(candidate).steps), candidate.name
    assert any(dict(c.levers).get("low_res") == "0.5:10" and c.knobs.low_res == ((0.5, 4),) for c in pool)
