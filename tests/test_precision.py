"""Precision as a schedule knob (issue 15): the step field, the builder, the runtime on OpenVINO and
ONNX Runtime, per-precision device-profile timings, --explain, and the tuner's precision lever."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from postdiff.errors import InputError, ScheduleError
from postdiff.profiles.device import PrecisionTimings, Timing
from postdiff.profiles.schedule_builder import ScheduleKnobs, build_schedule
from postdiff.profiles.tuning import candidates
from postdiff.runtime.jsonio import dumps
from postdiff.runtime.schedule import Step, load_schedule, plan_steps

# low-res 0.5 for 4 steps, DeepCache k=2 branch 1, gate 3: every cache role, a switch, 8 steps
KNOBS = ScheduleKnobs(steps=8, low_res=((0.5, 4),), deepcache_interval=2, deepcache_branch=1, xattn_gate=3)


def _pinned(schedule, precision: str):
    """``schedule`` with every step pinned to ``precision``."""
    return dataclasses.replace(schedule, steps=tuple(dataclasses.replace(s, precision=precision)
                                                     for s in schedule.steps))


def test_step_precision_is_optional_validated_and_round_trips(tmp_path: Path) -> None:
    plain = build_schedule(KNOBS, "p")
    assert "precision" not in dumps(plain)  # unpinned files are byte for byte what they were
    mixed = build_schedule(dataclasses.replace(KNOBS, bf16="low-res"), "m")
    path = tmp_path / "m.json"
    path.write_text(dumps(mixed))
    assert load_schedule(path) == mixed and '"precision": "bf16"' in path.read_text()
    data = json.loads(path.read_text())
    data["steps"][2]["precision"] = "int4"
    path.write_text(json.dumps(data))
    with pytest.raises(ScheduleError, match="step 2: precision 'int4' is not one of"):
        load_schedule(path)


@pytest.mark.parametrize("policy, expected", [
    ("none", ["auto"] * 8),
    ("all", ["bf16"] * 8),
    ("low-res", ["bf16"] * 4 + ["fp32"] * 4),  # scale 0.5 for steps 0-3
    ("early", ["bf16"] * 6 + ["fp32"] * 2),  # all but the last quarter
])
def test_builder_policies(policy: str, expected: list[str]) -> None:
    schedule = build_schedule(dataclasses.replace(KNOBS, bf16=policy), "s")
    assert [s.precision for s in schedule.steps] == expected


def test_reads_policy_and_the_switch_evaluation_runs_at_the_old_phase_precision() -> None:
    reads = build_schedule(dataclasses.replace(KNOBS, bf16="reads"), "r")
    assert [s.precision for s in reads.steps] == ["bf16" if s.deep == "read" else "fp32" for s in reads.steps]
    assert "bf16" in reads.precisions and "fp32" in reads.precisions
    low = build_schedule(dataclasses.replace(KNOBS, bf16="low-res"), "l")
    switch = next(p for p in plan_steps(low) if p.switch_from is not None)
    assert switch.switch_from.precision == "bf16" and switch.variant.precision == "fp32"


def test_onnxruntime_refuses_a_bf16_step_before_any_compute(tiny_postdiff_bundle: Path) -> None:
    from postdiff.profiles.presets import resolve_schedule
    from postdiff.runtime.pipeline import GenerateOptions, Pipeline

    schedule = resolve_schedule("postdiff-sd15")
    steps = list(schedule.steps)
    steps[3] = dataclasses.replace(steps[3], precision="bf16")
    pipeline = Pipeline(tiny_postdiff_bundle)
    with pytest.raises(InputError, match="precision bf16, which only --provider openvino"):
        pipeline.generate(GenerateOptions(prompt="a cat", steps=20), schedule=dataclasses.replace(schedule,
                                                                                                    steps=tuple(steps)))
    assert pipeline.open_graphs == []  # refused before any session was opened
    # fp32 pinned on an fp32 bundle runs on ONNX Runtime: the same graphs, the same numbers
    ran = pipeline.generate(GenerateOptions(prompt="a cat", steps=20), schedule=_pinned(schedule, "fp32")).latents
    plain = Pipeline(tiny_postdiff_bundle).generate(GenerateOptions(prompt="a cat", steps=20), schedule=schedule).latents
    np.testing.assert_array_equal(ran, plain)


@pytest.fixture(scope="module")
def bf16_openvino():
    pytest.importorskip("openvino")
    from postdiff.runtime.runners.openvino import cpu_precisions

    if "bf16" not in cpu_precisions():
        pytest.skip("this CPU has no native bf16 under OpenVINO")


@pytest.fixture(scope="module")
def mixed_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    from postdiff.exporter.export import ExportOptions, export_bundle

    schedule = build_schedule(dataclasses.replace(KNOBS, bf16="low-res"), "mixed")
    folder = tmp_path_factory.mktemp("precision")
    (folder / "mixed.json").write_text(dumps(schedule))
    export_bundle(ExportOptions(source="random:tiny-sd", out=folder / "b", schedules=(str(folder / "mixed.json"),)),
                  progress=False)
    return folder / "b", schedule


def _denoise(bundle: Path, schedule, provider: str = "openvino", precision: str = "fp32", shared=None):
    """Final latents of ``schedule`` from fixed noise and a fixed context: only the UNet calls differ
    between runs (the text encoder and decoder run at the pipeline's precision too)."""
    from postdiff.runtime.pipeline import GenerateOptions, Pipeline

    pipeline = Pipeline(bundle, provider=provider, precision=precision, threads=1, shared_weights=shared)
    executor = pipeline.executor(schedule)
    rng = np.random.default_rng(5)
    context = rng.standard_normal((2, 77, 32), dtype=np.float32)
    latents = pipeline.initial_latents(2, executor.first_latent_shape())
    scheduler = pipeline.scheduler(GenerateOptions(prompt="", seed=2))
    return executor.run(scheduler, latents, context, 7.5, seed=2), pipeline


@pytest.mark.parametrize("shared", [True, False], ids=["one-compiled-model-per-precision", "one-per-graph"])
def test_openvino_runs_each_step_at_its_precision(bf16_openvino, mixed_bundle, shared: bool) -> None:
    bundle, mixed = mixed_bundle
    auto = _pinned(mixed, "auto")
    onnxruntime, _ = _denoise(bundle, auto, "cpu", "auto")
    fp32, _ = _denoise(bundle, auto, shared=shared)
    all_bf16, _ = _denoise(bundle, auto, precision="bf16", shared=shared)
    # pinning every step equals asking the whole run for that precision (the same compiled models)
    np.testing.assert_array_equal(_denoise(bundle, _pinned(mixed, "bf16"), shared=shared)[0], all_bf16)
    np.testing.assert_array_equal(_denoise(bundle, _pinned(mixed, "fp32"), precision="bf16", shared=shared)[0], fp32)
    np.testing.assert_allclose(fp32, onnxruntime, atol=1e-4, rtol=0)
    got, pipeline = _denoise(bundle, mixed, shared=shared)
    ran = pipeline.precisions
    unets = {n: g.variant.latent for n, g in pipeline.manifest.graphs.items() if g.variant is not None}
    low = {n for n, latent in unets.items() if latent == (8, 8)}
    high = {n for n, latent in unets.items() if latent == (16, 16)}
    assert low and high and {f"{n}@bf16" for n in low} == {k for k in ran if k.endswith("@bf16")}
    assert all(ran[f"{n}@bf16"] == "bf16" for n in low) and all(ran[n] == "fp32" for n in high)
    assert not low & set(ran)  # the low-resolution graphs were not opened at fp32
    drift = lambda a: float(np.linalg.norm(a - fp32) / np.linalg.norm(fp32))  # noqa: E731
    assert 1e-5 < drift(got) < 0.2  # the low-resolution phase really ran at bf16
    assert float(np.abs(got - all_bf16).max()) > 0  # and the full-resolution phase did not


def _timing(ms: float) -> Timing:
    return Timing(median_ms=ms, p10_ms=ms, p90_ms=ms, min_ms=ms, repeats=1)


def test_predictions_and_explain_read_each_step_at_its_precision(tiny_postdiff_bundle: Path) -> None:
    from postdiff.profiles.presets import resolve_schedule
    from postdiff.runtime.manifest import load_manifest
    from postdiff.tools.explain import format_table
    from postdiff.tools.profiler import graph_calls, predict_ms, profile_bundle

    manifest = load_manifest(tiny_postdiff_bundle, verify=False)
    profile = profile_bundle(tiny_postdiff_bundle, repeats=1, warmup=0, progress=False)
    assert profile.precisions == {}  # ONNX Runtime runs the graphs as exported: nothing further to time
    unets = [n for n, g in manifest.graphs.items() if g.variant is not None]
    # a synthetic bf16 table: every UNet call 0.01 ms at bf16, whatever it costs at fp32
    profile = dataclasses.replace(profile, precisions={"bf16": PrecisionTimings(
        graphs={n: _timing(0.01) for n in unets}, interleaved={n: _timing(0.01) for n in unets})})
    schedule = resolve_schedule("postdiff-sd15")
    low = build_schedule(dataclasses.replace(
        ScheduleKnobs(steps=20, low_res=((0.5, 10),), deepcache_interval=2, deepcache_branch=1, xattn_gate=5),
        bf16="low-res"), "low")
    assert [(s.scale, s.cfg, s.deep, s.xattn) for s in low.steps] == [(s.scale, s.cfg, s.deep, s.xattn)
                                                                       for s in schedule.steps]
    calls = graph_calls(manifest, schedule)
    low_calls = [i for i, name in enumerate(calls) if manifest.graphs[name].variant is not None
                 and manifest.graphs[name].variant.latent == (8, 8)]
    # the fp32 cost each low-resolution call had: interleaved unless it repeats the previous call's graph
    saved = sum((profile.graphs if calls[i - 1] == calls[i] else profile.interleaved)[calls[i]].median_ms - 0.01
                for i in low_calls)
    assert predict_ms(profile, manifest, low) == pytest.approx(predict_ms(profile, manifest, schedule) - saved)
    assert predict_ms(profile, manifest, schedule, precision="bf16") < predict_ms(profile, manifest, schedule)
    with pytest.raises(InputError, match="no timings at precision fp16|not one"):
        predict_ms(profile, manifest, schedule, precision="fp16")
    table = format_table(low, manifest, profile)
    assert "precision" in table.splitlines()[1] and " ms " in table.splitlines()[1]
    assert f"{predict_ms(profile, manifest, low):.1f} ms per image" in table
    assert sum(1 for line in table.splitlines() if "    0.01  " in line and "bf16" in line) == len(low_calls)


def test_openvino_profile_times_the_unets_at_every_precision(bf16_openvino, mixed_bundle) -> None:
    from postdiff.tools.profiler import predict_ms, profile_bundle

    bundle, mixed = mixed_bundle
    profile = profile_bundle(bundle, provider="openvino", repeats=1, warmup=0, progress=False)
    assert profile.machine.precision == "bf16" and set(profile.precisions) == {"fp32"}  # OpenVINO's default: bf16
    unets = {n for n in profile.graphs if n.startswith("unet")}
    assert set(profile.precisions["fp32"].graphs) == unets == set(profile.precisions["fp32"].interleaved)
    from postdiff.runtime.manifest import load_manifest

    manifest = load_manifest(bundle, verify=False)
    auto = _pinned(mixed, "auto")
    # a pinned step reads the table of its precision; an unpinned one the run's (None: the main, bf16)
    assert predict_ms(profile, manifest, _pinned(mixed, "fp32")) == predict_ms(profile, manifest, auto, precision="fp32")
    assert predict_ms(profile, manifest, _pinned(mixed, "bf16")) == predict_ms(profile, manifest, auto)
    assert predict_ms(profile, manifest, _pinned(mixed, "fp32")) != predict_ms(profile, manifest, auto)
    assert profile.tables("fp32")[0] is profile.precisions["fp32"].graphs


def test_candidate_space_with_precision() -> None:
    without, with_ = candidates(), candidates(precision=True)
    old = {c.name for c in without}
    assert [c for c in with_ if c.name in old] == without  # the old space, unchanged and in order
    extra = [c for c in with_ if c.name not in old]
    assert extra and all(dict(c.levers).get("precision", "fp32") != "fp32" for c in extra)
    assert all(not any(lever == "precision" for lever, _ in c.levers) for c in without)
    from postdiff.profiles.tuning import build

    for c in extra:
        assert "bf16" in build(c).precisions, c.name
    names = {c.name for c in extra}
    assert {"t20-bf16", "t8-bf16", "t20-lr0.5:10-dck2b1-g5cond-bf16low-res"} <= names
    assert "t20-bf16low-res" not in names  # no low-resolution steps at the baseline anchor: left out


def test_precision_space_needs_an_openvino_profile(tiny_postdiff_bundle: Path, tmp_path: Path) -> None:
    from postdiff.runtime.jsonio import write_json_atomic
    from postdiff.tools.profiler import profile_bundle
    from postdiff.tools.tune import TuneOptions, tune

    device = tmp_path / "device.json"
    write_json_atomic(device, profile_bundle(tiny_postdiff_bundle, repeats=1, warmup=0, progress=False))
    with pytest.raises(InputError, match="--precision-space needs a device profile measured with --provider openvino"):
        tune(TuneOptions(bundle=tiny_postdiff_bundle, device=device, out=tmp_path / "s.json", speedup=2.0, calib=2,
                         precision_space=True), progress=False)


def test_step_dataclass_default_is_auto() -> None:
    assert Step().precision == "auto"


def test_openvino_refuses_the_merged_unet(tiny_merged_bundle: Path) -> None:
    from postdiff.runtime.pipeline import Pipeline

    pytest.importorskip("openvino")
    with pytest.raises(InputError, match="--unet merged is refused with --provider openvino"):
        Pipeline(tiny_merged_bundle, provider="openvino", unet="merged")
    Pipeline(tiny_merged_bundle, provider="openvino")  # the per-variant graphs: fine
