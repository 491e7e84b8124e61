"""Schedules are data: the builder, the presets, and validation with clear errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from postdiff.cli import main
from postdiff.errors import ScheduleError
from postdiff.profiles.presets import PRESETS, SCHEDULES_DIR, preset_text, resolve_schedule
from postdiff.profiles.schedule_builder import ScheduleKnobs, build_schedule
from postdiff.runtime.jsonio import dumps
from postdiff.runtime.schedule import Schedule, Step, latent_size, load_schedule, plan_steps, validate


def test_preset_files_match_their_knobs() -> None:
    for name in PRESETS:
        assert (SCHEDULES_DIR / f"{name}.json").read_text() == preset_text(name), f"regenerate {name}.json"


def test_postdiff_sd15_preset_is_the_papers_setting() -> None:
    schedule = resolve_schedule("postdiff-sd15")
    steps = schedule.steps
    assert len(steps) == 20 and schedule.xattn_mode == "cond"
    assert [s.scale for s in steps] == [0.5] * 10 + [1.0] * 10
    assert [s.cfg for s in steps] == [True] * 5 + [False] * 15  # T-GATE's gate_step 5: five guided steps
    assert steps[4].xattn == "write" and steps[10].xattn == "write"  # last guided step, and re-write at the switch
    assert all(s.xattn == "read" for i, s in enumerate(steps) if i > 4 and i != 10)
    assert steps[10].switch and not any(s.switch for i, s in enumerate(steps) if i != 10)
    deep = "".join({"write": "W", "read": "r"}[s.deep] for s in steps)
    assert deep == "WrWrWWrWrWWrWrWrWrWr"  # interval 2; writes forced at the xattn write, when guidance turns off
    # (batch 2 -> 1) and at the switch
    assert resolve_schedule("postdiff-beta34").steps[0].scale == 0.75


def test_switch_step_evaluates_the_old_resolution_first() -> None:
    plans = plan_steps(resolve_schedule("postdiff-sd15"))
    switch = plans[10]
    assert switch.switch_from is not None and switch.switch_from.scale == 0.5 and switch.switch_from.batch == 1
    assert switch.switch_from.xattn == "read"  # guidance is off already: the low-res maps serve the x̂0 evaluation
    assert all(p.switch_from is None for i, p in enumerate(plans) if i != 10)


def test_several_low_resolution_stages() -> None:
    schedule = build_schedule(ScheduleKnobs(steps=12, low_res=((0.5, 4), (0.75, 4)), deepcache_interval=2), "s3")
    assert schedule.scales == (0.5, 0.75, 1.0)
    assert [i for i, s in enumerate(schedule.steps) if s.switch] == [4, 8]
    assert all(schedule.steps[i].deep == "write" for i in (0, 4, 8))


def test_nonuniform_deepcache_crowds_refreshes_around_the_centre() -> None:
    schedule = build_schedule(ScheduleKnobs(steps=20, deepcache_interval=3, deepcache_nonuniform=(10, 1.4)), "nu")
    refreshes = [i for i, s in enumerate(schedule.steps) if s.deep == "write"]
    gaps = [b - a for a, b in zip(refreshes, refreshes[1:])]
    assert refreshes[0] == 0 and min(gaps) < max(gaps)
    near = [i for i in refreshes if 6 <= i <= 14]
    assert len(near) >= len(refreshes) // 2


def test_round_trip_through_json(tmp_path: Path) -> None:
    schedule = resolve_schedule("postdiff-sd15")
    path = tmp_path / "s.json"
    path.write_text(dumps(schedule))
    assert load_schedule(path) == schedule


def _base(**changes) -> Schedule:
    steps = [Step(scale=0.5), Step(scale=0.5, deep="write", branch=1), Step(scale=0.5, deep="read", branch=1),
             Step(scale=1.0, switch=True), Step(scale=1.0), Step(scale=1.0)]
    return Schedule(format_version=2, name="t", steps=tuple(steps), **changes)


@pytest.mark.parametrize("index,change,message", [
    (4, {"deep": "read", "branch": 1}, "read without a valid cached feature"),
    (3, {"deep": "read", "branch": 1}, "read without a valid cached feature"),
    (2, {"branch": 2}, "cached feature is from branch 1"),
    (3, {"switch": False}, "switch is False but the scale changes"),
    (4, {"switch": True}, "switch is True but the scale does not change"),
    (4, {"scale": 0.75}, "scale goes down from 1.0 to 0.75"),
    (4, {"xattn": "read", "cfg": False}, "cross-attention read without written maps"),
    (4, {"xattn": "read"}, "needs guidance off"),
    (2, {"xattn": "write"}, "a cross-attention write must compute every attn2"),
    (0, {"deep": "sometimes"}, "deep 'sometimes' is not one of"),
    (0, {"scale": 1.5}, "outside \\(0, 1\\]"),
])
def test_invalid_schedules_are_rejected(index: int, change: dict, message: str) -> None:
    schedule = _base()
    steps = list(schedule.steps)
    steps[index] = replace(steps[index], **change)
    with pytest.raises(ScheduleError, match=message):
        validate(replace(schedule, steps=tuple(steps)))


def test_reuse_after_guidance_change_is_rejected() -> None:
    steps = (Step(deep="write"), Step(cfg=False, deep="read"))
    with pytest.raises(ScheduleError, match="read without a valid cached feature"):
        validate(Schedule(format_version=2, name="t", steps=steps))


def test_gate_before_switch_needs_recapture() -> None:
    steps = (Step(scale=0.5, xattn="write"), Step(scale=0.5, cfg=False, xattn="read"),
             Step(scale=1.0, cfg=False, xattn="read", switch=True))
    with pytest.raises(ScheduleError, match="a resolution switch after the gate needs a re-write"):
        validate(Schedule(format_version=2, name="t", steps=steps))


def test_schedule_must_end_at_full_resolution() -> None:
    with pytest.raises(ScheduleError, match="must run at full resolution"):
        validate(Schedule(format_version=2, name="t", steps=(Step(scale=0.5),)))


def test_unknown_keys_and_versions_are_rejected(tmp_path: Path) -> None:
    data = json.loads(dumps(resolve_schedule("baseline")))
    data["steps"][0]["cache"] = "yes"
    (tmp_path / "a.json").write_text(json.dumps(data))
    with pytest.raises(ScheduleError, match=r"unknown key\(s\) \['cache'\]"):
        load_schedule(tmp_path / "a.json")
    data["steps"][0].pop("cache")
    data["format_version"] = 7
    (tmp_path / "b.json").write_text(json.dumps(data))
    with pytest.raises(ScheduleError, match="format_version 7 is not supported"):
        load_schedule(tmp_path / "b.json")
    with pytest.raises(ScheduleError, match="neither a schedule file nor a preset"):
        resolve_schedule("postdiff-xl")


def test_version_1_files_are_refused_with_the_gate_change_named(tmp_path: Path) -> None:
    data = json.loads(dumps(resolve_schedule("baseline")))
    data["format_version"] = 1
    (tmp_path / "old.json").write_text(json.dumps(data))
    with pytest.raises(ScheduleError, match="version 1 counted --xattn-gate one step later than T-GATE"):
        load_schedule(tmp_path / "old.json")


def test_scales_off_the_grid_name_the_valid_ones() -> None:
    assert latent_size((64, 64), 0.5, 8) == (32, 32)
    assert latent_size((64, 64), 0.75, 8) == (48, 48)
    with pytest.raises(ScheduleError, match="valid scales: 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1"):
        latent_size((64, 64), 0.3, 8)


@pytest.mark.parametrize("knobs,message", [
    (ScheduleKnobs(steps=10, low_res=((0.5, 10),)), "at least the last step"),
    (ScheduleKnobs(steps=10, low_res=((0.75, 2), (0.5, 2))), "larger than the previous stage"),
    (ScheduleKnobs(steps=10, xattn_gate=10), "--xattn-gate 10 must be in \\[1, 9\\]"),
    (ScheduleKnobs(steps=10, deepcache_interval=0), "--deepcache-interval 0"),
    (ScheduleKnobs(steps=0), "--steps 0 is not positive"),
])
def test_bad_knobs(knobs: ScheduleKnobs, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        build_schedule(knobs, "bad")


def test_schedule_command_writes_and_explains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mine.json"
    code = main(["schedule", "--preset", "postdiff-sd15", "--low-res", "0.5:6", "0.75:4", "--xattn-mode", "ave",
                 "--out", str(out), "--explain"])
    text = capsys.readouterr().out
    assert code == 0 and "x̂0 for switch" in text
    # without a bundle: no latent or MAC column of unknowns, and the line saying what --bundle adds
    assert "GMACs" not in text and " - " not in text
    assert text.splitlines()[-2] == ("MACs and the predicted speed-up need --bundle BUNDLE (a bundle exported with "
                                     "this schedule)")
    schedule = load_schedule(out)
    assert schedule.scales == (0.5, 0.75, 1.0) and schedule.xattn_mode == "ave" and schedule.name == "custom"


def test_schedule_explain_with_a_bundle(tiny_postdiff_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from postdiff.runtime.manifest import load_manifest

    assert main(["schedule", "--preset", "postdiff-sd15", "--explain", "--bundle", str(tiny_postdiff_bundle)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "GMACs" in lines[1] and "latent" in lines[1]
    first = lines[2].split()  # step 0: half resolution, DeepCache write, batch 2
    manifest = load_manifest(tiny_postdiff_bundle, verify=False)
    graph = manifest.graph(f"unet-{first[2]}-b2-deep1-write")
    assert first[:4] == ["0", "0.5", first[2], "2"] and float(first[4]) == round(graph.macs / 1e9, 2)
    assert "predicted compute speed-up" in lines[-1]


def test_schedule_command_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["schedule", "--low-res", "half:3", "--out", str(tmp_path / "x.json")])
    assert code == 2 and "is not SCALE:STEPS" in capsys.readouterr().err
    code = main(["schedule", "--steps", "8", "--xattn-gate", "8", "--out", str(tmp_path / "x.json")])
    assert code == 2 and "--xattn-gate 8" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
