"""ONNX Runtime through IOBinding (the `--provider cuda` path): caches stay on the provider's device
between steps. Run here on the CPU device, where it must equal the plain `session.run` path bit for
bit; the CUDA device itself is not tested (no GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from postdiff.profiles.presets import resolve_schedule
from postdiff.runtime.executor import ScheduleExecutor
from postdiff.runtime.manifest import UNetVariant, load_manifest
from postdiff.runtime.names import DEEP_FEATURE, NOISE_PRED, is_cache
from postdiff.runtime.pipeline import GenerateOptions, Pipeline
from postdiff.runtime.runners.base import DeviceArray
from postdiff.runtime.runners.ort import OrtDeviceArray, OrtRunner

SCHEDULERS = ("ddim", "dpm-solver", "euler")


def _spy_feeds(executor: ScheduleExecutor) -> list[dict[str, type]]:
    """Record, per UNet call, the type of every cache input the executor feeds."""
    calls: list[dict[str, type]] = []
    original = executor._graph

    def graph(variant):  # wraps each graph's runner once, when the executor opens it
        found = original(variant)
        inner = found.runner
        if not getattr(inner, "_spied", False):
            infer = inner.infer

            def spied(feed):
                calls.append({name: type(value) for name, value in feed.items() if is_cache(name)})
                return infer(feed)

            inner.infer = spied  # type: ignore[method-assign]
            inner._spied = True  # type: ignore[attr-defined]
        return found

    executor._graph = graph  # type: ignore[method-assign]
    return calls


@pytest.mark.parametrize("unet", ["variants", "merged"])
def test_iobinding_equals_plain_run_bit_for_bit(request: pytest.FixtureRequest, unet: str) -> None:
    bundle = request.getfixturevalue("tiny_merged_bundle" if unet == "merged" else "tiny_postdiff_bundle")
    schedule = resolve_schedule("postdiff-sd15")
    plain = Pipeline(bundle, unet=unet)
    bound = Pipeline(bundle, unet=unet, iobinding=True)
    calls = _spy_feeds(bound.executor(schedule))
    for scheduler in SCHEDULERS:
        options = GenerateOptions(prompt="a red cube", steps=len(schedule.steps), scheduler=scheduler)
        expected = plain.generate(options, schedule=schedule).latents
        got = bound.generate(options, schedule=schedule).latents
        np.testing.assert_array_equal(got, expected, err_msg=scheduler)
    # The caches went from step to step as device values, never through the host.
    fed = [kind for call in calls for kind in call.values()]
    assert fed and set(fed) == {OrtDeviceArray}
    assert any(DEEP_FEATURE in call for call in calls) and any(len(call) > 1 for call in calls)


def test_iobinding_runner_keeps_caches_on_the_device_and_never_overwrites_them(tiny_postdiff_bundle: Path) -> None:
    manifest = load_manifest(tiny_postdiff_bundle)
    name = manifest.unet_graph(UNetVariant(latent=(16, 16), batch=1, deep="write", branch=1, xattn="write"))
    spec = manifest.graph(name)
    runner = OrtRunner(spec, tiny_postdiff_bundle, iobinding=True)
    reference = OrtRunner(spec, tiny_postdiff_bundle)
    rng = np.random.default_rng(0)

    def feed() -> dict[str, np.ndarray]:
        return {t.name: rng.standard_normal(t.shape).astype(t.dtype) for t in spec.inputs}

    first_feed = feed()
    first = runner.infer(first_feed)
    assert isinstance(first[NOISE_PRED], np.ndarray)
    caches = {n: v for n, v in first.items() if is_cache(n)}
    assert caches and all(isinstance(v, OrtDeviceArray) and isinstance(v, DeviceArray) for v in caches.values())
    kept = {n: np.asarray(v) for n, v in caches.items()}
    runner.infer(feed())  # ONNX Runtime would reuse outputs bound before; ours are bound anew
    for n, value in caches.items():
        np.testing.assert_array_equal(np.asarray(value), kept[n])
        assert value.copy() is value
    expected = reference.infer(first_feed)
    for n, value in first.items():
        np.testing.assert_array_equal(np.asarray(value), expected[n])


def test_device_array_row_views() -> None:
    """``value[1:]`` (the conditional half the executor keeps) is a device view of the same rows."""
    import onnxruntime as ort

    host = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    value = OrtDeviceArray(ort.OrtValue.ortvalue_from_numpy(host, "cpu", 0))
    assert value.shape == (2, 3, 4) and value.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(value[1:]), host[1:])
    np.testing.assert_array_equal(np.asarray(value[:1]), host[:1])
    assert value[1:].shape == (1, 3, 4)
    with pytest.raises(TypeError):
        value[::2]
