"""PostDiff compiled: the runtime's schedule executor against the torch reference, and the graph
variants against each other."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import PRESETS
from postdiff.exporter.torch_reference import TorchReferenceExecutor
from postdiff.errors import ScheduleError
from postdiff.runtime.manifest import UNetVariant
from postdiff.runtime.names import DEEP_FEATURE, NOISE_PRED, TIMESTEP
from postdiff.runtime.pipeline import GenerateOptions, Pipeline
from postdiff.profiles.presets import resolve_schedule
from postdiff.runtime.schedulers import SCHEDULERS
from tolerances import latent_tolerance


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("preset", PRESETS)
def test_runtime_matches_torch_reference(tiny_postdiff_bundle: Path, tiny_model, preset: str, scheduler: str) -> None:
    schedule = resolve_schedule(preset)
    pipeline = Pipeline(tiny_postdiff_bundle)
    options = GenerateOptions(prompt="a blue sphere", negative_prompt="low quality", seed=5,
                              steps=len(schedule.steps), guidance=6.0, scheduler=scheduler)
    reference = TorchReferenceExecutor(tiny_model, schedule, pipeline.manifest.model.latent)
    ours = pipeline.generate(options, schedule=schedule)
    latents = pipeline.initial_latents(options.seed, ours_first_shape(pipeline, schedule))
    context = reference.encode(options.prompt, options.negative_prompt, options.guidance)
    theirs = reference.run(scheduler, latents, context, options.guidance, options.seed)
    diff = float(np.max(np.abs(ours.latents - theirs)))
    print(f"{preset} / {scheduler}: runtime vs torch reference max abs diff {diff:.2e}")
    assert diff <= latent_tolerance(theirs)


def ours_first_shape(pipeline: Pipeline, schedule) -> tuple[int, ...]:
    return pipeline.executor(schedule).first_latent_shape()


def test_a_scheduler_that_drops_timesteps_is_refused(tiny_bundle: Path) -> None:
    """DPM-Solver++ with trailing spacing and lambda_min_clipped gives 18 timesteps for 20 (as diffusers
    does); the executor must not silently run only the first 18 steps of a 20-step schedule."""
    from postdiff.runtime.schedulers import make_scheduler

    pipeline = Pipeline(tiny_bundle)
    config = {**pipeline.manifest.scheduler, "timestep_spacing": "trailing", "lambda_min_clipped": -2.0}
    scheduler = make_scheduler("dpm-solver", config)
    executor = pipeline.executor(resolve_schedule("baseline"))
    latents = pipeline.initial_latents(0)
    context = pipeline.encode_pair(GenerateOptions(prompt="a cat"))
    with pytest.raises(ScheduleError, match="gives 18 timesteps for the 20 steps"):
        executor.run(scheduler, latents, context, 7.5, 0)


def _variant_feed(pipeline: Pipeline, variant: UNetVariant, rng: np.random.Generator) -> dict[str, np.ndarray]:
    spec = pipeline.manifest.graph(pipeline.manifest.unet_graph(variant))
    return {t.name: (rng.standard_normal(t.shape).astype(t.dtype) if t.name != TIMESTEP
                     else np.full(t.shape, 401.0, dtype=t.dtype)) for t in spec.inputs}


@pytest.mark.parametrize("branch", [0, 1, 3])
def test_refresh_equals_full_and_shallow_reproduces_it(tmp_path: Path, branch: int) -> None:
    from postdiff.exporter.export import ExportOptions, export_bundle
    from postdiff.runtime.jsonio import dumps
    from postdiff.profiles.schedule_builder import ScheduleKnobs, build_schedule

    deepcache = tmp_path / "deepcache.json"
    deepcache.write_text(dumps(build_schedule(ScheduleKnobs(steps=4, deepcache_interval=2, deepcache_branch=branch),
                                              "deepcache")))
    bundle = tmp_path / "bundle"
    export_bundle(ExportOptions(source="random:tiny-sd", out=bundle, schedules=("baseline", str(deepcache))),
                  progress=False)
    pipeline = Pipeline(bundle)
    manifest = pipeline.manifest
    full = UNetVariant(latent=(16, 16), batch=2, deep="none", branch=0, xattn="none")
    refresh = UNetVariant(latent=(16, 16), batch=2, deep="write", branch=branch, xattn="none")
    reuse = UNetVariant(latent=(16, 16), batch=2, deep="read", branch=branch, xattn="none")
    feed = _variant_feed(pipeline, full, np.random.default_rng(0))
    plain = pipeline.runner(manifest.unet_graph(full)).infer(feed)[NOISE_PRED]
    written = pipeline.runner(manifest.unet_graph(refresh)).infer(feed)
    assert float(np.max(np.abs(written[NOISE_PRED] - plain))) <= 1e-6
    shallow = pipeline.runner(manifest.unet_graph(reuse)).infer({**feed, DEEP_FEATURE: written[DEEP_FEATURE]})
    assert float(np.max(np.abs(shallow[NOISE_PRED] - plain))) <= 1e-5
    assert manifest.graph(manifest.unet_graph(reuse)).macs < manifest.graph(manifest.unet_graph(full)).macs


def test_variants_share_one_weights_file(tiny_bundle: Path, tiny_postdiff_bundle: Path) -> None:
    baseline = (tiny_bundle / "unet.weights").stat().st_size
    postdiff = (tiny_postdiff_bundle / "unet.weights").stat().st_size
    manifest = Pipeline(tiny_postdiff_bundle, verify=False).manifest
    unets = [g for g in manifest.graphs.values() if g.variant is not None]
    assert len(unets) >= 8
    assert postdiff <= 1.15 * baseline
    for graph in unets:
        assert graph.macs > 0 and graph.parity.max_abs_diff <= 1e-4 * max(1.0, graph.parity.reference_max_abs)


def test_shallow_steps_cost_fewer_macs(tiny_postdiff_bundle: Path) -> None:
    manifest = Pipeline(tiny_postdiff_bundle, verify=False).manifest
    by_variant = {g.variant: g.macs for g in manifest.graphs.values() if g.variant is not None}
    full = by_variant[UNetVariant(latent=(16, 16), batch=2, deep="none", branch=0, xattn="none")]
    shallow = by_variant[UNetVariant(latent=(16, 16), batch=1, deep="read", branch=1, xattn="read")]
    low = by_variant[UNetVariant(latent=(8, 8), batch=2, deep="write", branch=1, xattn="none")]
    assert shallow < full / 2 / 1.5  # batch 1 and only the shallow layers
    assert low < full / 2  # a quarter of the cells


def test_schedule_needing_missing_graphs_fails_before_compute(tiny_bundle: Path) -> None:
    pipeline = Pipeline(tiny_bundle)
    with pytest.raises(ScheduleError, match=r"needs the .* \(unet-8x8-b2-deep1-write.onnx\) and \d+ more, which this "
                                            "bundle lacks; re-export with `postdiff export random:tiny-sd --schedule"):
        pipeline.generate(GenerateOptions(prompt="x"), schedule=resolve_schedule("postdiff-sd15"))
