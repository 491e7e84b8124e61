"""`postdiff profile`: device profiles, their schema, and latency prediction from them."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from postdiff.profiles.device import DeviceProfile, dump_device_profile, load_device_profile
from postdiff.errors import InputError, ScheduleError
from postdiff.runtime.jsonio import write_json_atomic
from postdiff.runtime.manifest import load_manifest
from postdiff.profiles.presets import resolve_schedule
from postdiff.runtime.schedulers import SCHEDULERS
from postdiff.tools.profiler import graph_calls, predict_ms, profile_bundle

DEVICES = Path(__file__).resolve().parents[1] / "profiles" / "devices"


@pytest.fixture(scope="module")
def profile(tiny_postdiff_bundle: Path) -> DeviceProfile:
    return profile_bundle(tiny_postdiff_bundle, repeats=3, warmup=1, progress=False)


def test_profile_times_every_graph_size_and_switch(profile: DeviceProfile, tiny_postdiff_bundle: Path) -> None:
    manifest = load_manifest(tiny_postdiff_bundle, verify=False)
    assert set(profile.graphs) == set(manifest.graphs)
    assert {"text_encoder", "vae_decoder"} <= set(profile.graphs)
    assert set(profile.interleaved) == set(manifest.graphs)
    # The presets run the tiny model's 16x16 latent at scales 1/2 and 3/4.
    assert set(profile.scheduler_step) == set(SCHEDULERS)
    for sizes in profile.scheduler_step.values():
        assert set(sizes) == {"8x8", "12x12", "16x16"}
    assert set(profile.switch) == {"8x8->12x12", "8x8->16x16", "12x12->16x16"}
    assert set(profile.step_after_graph) == {"8x8", "12x12", "16x16"}
    # every UNet graph of a size is followed by one timed step per round: 3 rounds x its graphs
    unets = [g.variant for g in manifest.graphs.values() if g.variant is not None]
    for size, timing in profile.step_after_graph.items():
        assert timing.repeats == 3 * sum(1 for v in unets if "x".join(map(str, v.latent)) == size)
    for timing in [*profile.graphs.values(), *profile.interleaved.values(), *profile.switch.values()]:
        assert timing.repeats == 3
        assert 0 < timing.min_ms <= timing.p10_ms <= timing.median_ms <= timing.p90_ms
    assert profile.bundle.source == "random:tiny-sd"
    assert profile.weights == "shared"  # several UNet graphs: generation shares one weight copy
    assert profile.machine.provider == "cpu" and profile.machine.cores >= 1 and profile.machine.cpu
    assert profile.peak_rss_mb > 0 and profile.peak_gpu_mb is None


def test_schema_round_trip(profile: DeviceProfile, tmp_path: Path) -> None:
    path = tmp_path / "device.json"
    write_json_atomic(path, profile)
    assert load_device_profile(path) == profile
    assert path.read_text() == dump_device_profile(profile)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(extra=1), "unknown key"),
    (lambda d: d["graphs"]["text_encoder"].update(mean_ms=1.0), "unknown key"),
    (lambda d: d["machine"].pop("cpu"), "missing required key 'cpu'"),
    (lambda d: d.update(format_version=2), "format_version 2"),
    (lambda d: d.update(weights="mmap"), "weights 'mmap'"),
    (lambda d: d["graphs"]["text_encoder"].update(repeats=0), "repeats 0"),
    (lambda d: d["interleaved"].pop("vae_decoder"), "the same graphs"),
    (lambda d: d["step_after_graph"].update({"16": d["step_after_graph"]["16x16"]}), "key '16' is not HxW"),
])
def test_malformed_profiles_are_rejected(profile: DeviceProfile, tmp_path: Path, edit, message: str) -> None:
    data = json.loads(dump_device_profile(profile))
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=message) as info:
        load_device_profile(path)
    assert str(path) in str(info.value)


def test_prediction_adds_the_cold_step_cost(profile: DeviceProfile, tiny_postdiff_bundle: Path) -> None:
    """A step right after a graph call costs its ``step_after_graph`` time, not the tight-loop one."""
    manifest = load_manifest(tiny_postdiff_bundle, verify=False)
    schedule = resolve_schedule("baseline")
    warm = profile.scheduler_step["ddim"]["16x16"].median_ms
    slower = dataclasses.replace(profile.step_after_graph["16x16"], median_ms=warm + 1.0, p90_ms=warm + 2.0)
    cold = dataclasses.replace(profile, step_after_graph={**profile.step_after_graph, "16x16": slower})
    old = dataclasses.replace(profile, step_after_graph={})  # a profile from before the field existed
    assert predict_ms(cold, manifest, schedule) - predict_ms(old, manifest, schedule) == pytest.approx(20 * 1.0)


def test_graph_calls_follow_the_schedule(tiny_postdiff_bundle: Path) -> None:
    manifest = load_manifest(tiny_postdiff_bundle, verify=False)
    baseline = graph_calls(manifest, resolve_schedule("baseline"))
    assert baseline == ["text_encoder"] * 2 + ["unet-16x16-b2"] * 20 + ["vae_decoder"]
    postdiff = graph_calls(manifest, resolve_schedule("postdiff-sd15"))
    assert len(postdiff) == 2 + 20 + 1 + 1  # one extra x̂0 evaluation at the resolution switch


def test_prediction_refuses_another_bundle(profile: DeviceProfile, tiny_postdiff_bundle: Path) -> None:
    manifest = load_manifest(tiny_postdiff_bundle, verify=False)
    other = dataclasses.replace(manifest, schedules=("baseline",))
    with pytest.raises(InputError, match="another bundle"):
        predict_ms(profile, other, resolve_schedule("baseline"))
    lacking = dataclasses.replace(profile, interleaved={k: v for k, v in profile.interleaved.items()
                                                      if k != "unet-16x16-b2"})
    with pytest.raises(InputError, match="unet-16x16-b2"):
        predict_ms(lacking, manifest, resolve_schedule("baseline"))
    with pytest.raises(InputError, match="scheduler 'lms'"):
        predict_ms(profile, manifest, resolve_schedule("baseline"), scheduler="lms")


def test_prediction_refuses_a_schedule_the_bundle_cannot_run(profile: DeviceProfile,
                                                             tiny_postdiff_bundle: Path, tmp_path: Path) -> None:
    from postdiff.profiles.schedule_builder import ScheduleKnobs, build_schedule

    manifest = load_manifest(tiny_postdiff_bundle, verify=False)
    schedule = build_schedule(ScheduleKnobs(steps=4, deepcache_interval=2, deepcache_branch=0), "branch0", "")
    with pytest.raises(ScheduleError, match="branch0"):
        predict_ms(profile, manifest, schedule)


def test_bad_arguments(tiny_postdiff_bundle: Path) -> None:
    with pytest.raises(InputError, match="--repeats 0"):
        profile_bundle(tiny_postdiff_bundle, repeats=0)
    with pytest.raises(InputError, match="--warmup -1"):
        profile_bundle(tiny_postdiff_bundle, warmup=-1)


CLI = """
import sys
from postdiff.cli import main
code = main(sys.argv[1:])
print("LEAKED", sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules))
sys.exit(code)
"""


def test_cli_writes_a_profile_without_torch(tiny_postdiff_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "device.json"
    args = [sys.executable, "-c", CLI, "profile", str(tiny_postdiff_bundle), "--out", str(out), "--repeats", "1",
            "--warmup", "0", "--quiet"]
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "LEAKED []" in result.stdout and "unet-16x16-b2" in result.stdout
    assert load_device_profile(out).bundle.source == "random:tiny-sd"
    again = subprocess.run(args, capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr


# Committed profiles measured on bundles whose graph names predate format 2's cache-role names; each
# must be re-measured on its bundle (README) and then leave this set (the xfail is strict).
STALE = {"cpu-2core-sd15-256.json", "cpu-2core-tiny-sd.json"}
UNET_NAME = re.compile(r"unet-(\d+)x(\d+)-b([12])(?:-deep(\d+)-(write|read))?(?:-xattn-(write|read))?")


@pytest.mark.parametrize("path", [pytest.param(p, id=p.name, marks=pytest.mark.xfail(
    strict=True, reason="stale: re-measure on its bundle")) if p.name in STALE else pytest.param(p, id=p.name)
    for p in sorted(DEVICES.glob("*.json"))])
def test_committed_example_profiles_load(path: Path) -> None:
    from postdiff.runtime.names import unet_graph_name

    device = load_device_profile(path)
    assert device.bundle.source and device.bundle.manifest_sha256
    # no machine's absolute paths: no JSON string starts with a slash (or a Windows drive)
    assert not re.search(r'"(/|[A-Za-z]:\\)', path.read_text()), path
    # every graph is one today's exporter writes (a profile of older graph names fits no bundle)
    for name in device.graphs:
        if name in ("text_encoder", "vae_decoder"):
            continue
        match = UNET_NAME.fullmatch(name)
        assert match, f"{path.name}: graph {name} is not a current UNet graph name"
        h, w, batch, branch, deep, xattn = match.groups()
        assert name == unet_graph_name((int(h), int(w)), int(batch), deep or "none", int(branch or 0),
                                       xattn or "none")


def test_profile_under_a_memory_budget(tiny_bundle: Path) -> None:
    with pytest.raises(InputError, match="--memory-budget 1 MB cannot fit phase 'UNet graphs'"):
        profile_bundle(tiny_bundle, repeats=1, warmup=0, progress=False, memory_budget_mb=1)
    profile = profile_bundle(tiny_bundle, repeats=1, warmup=0, progress=False, memory_budget_mb=2048)
    assert set(profile.interleaved) == set(profile.graphs) == set(load_manifest(tiny_bundle, verify=False).graphs)
