"""`postdiff tune`: the candidate space, dominance pruning, the tuner end to end on the tiny model,
resumability through the cache, and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from postdiff.cli import build_parser, main
from postdiff.profiles.tuning import (CHEAPER, FEWER, PAPER, build, candidates, prune_dominated,
                                      tuning_schedules)
from postdiff.errors import BundleError, InputError
from postdiff.profiles.presets import resolve_schedule
from postdiff.runtime.schedule import graph_variants, load_schedule, validate
from postdiff.profiles.schedule_builder import ScheduleKnobs
from postdiff.tools import tune as tune_module
from postdiff.tools.calib_rank import average_ranks, spearman
from postdiff.tools.tune import TuneCache, TuneOptions, choose, pareto_names, tune

# Candidates the tiny preset bundle (conftest.PRESETS) has graphs for, plus two it lacks.
PRESET_LIKE = ("t20", "t8", "t4", "t20-lr0.5:10-dck2b1-g5cond", "t20-lr0.75:10-dck2b1-g5cond")
LACKING = ("t20-lr0.5:10", "t20-dck2b1-g5cond")


def family(knobs: ScheduleKnobs) -> str:
    """The family rule, stated independently of profiles.tuning: cheaper when any per-step lever is on."""
    cheap = bool(knobs.low_res) or knobs.deepcache_interval > 1 or knobs.xattn_gate is not None
    return CHEAPER if cheap else FEWER


def space(*names: str):
    by_name = {c.name: c for c in candidates()}
    return tuple(by_name[n] for n in names)


# --- the space -----------------------------------------------------------------------------------

def test_candidate_space_builds_and_validates() -> None:
    pool = candidates()
    names = [c.name for c in pool]
    assert 30 <= len(pool) <= 60 and len(set(names)) == len(names)
    assert pool[0].name == "t20" and pool[0].knobs == ScheduleKnobs(steps=20)
    assert {c.steps for c in pool if c.family == FEWER} == {4, 6, 8, 10, 12, 15, 20}
    assert {c.steps for c in pool if c.family == CHEAPER} == {20, 15}
    for c in pool:
        assert family(c.knobs) == c.family
        schedule = build(c)
        validate(schedule)
        assert schedule.name == c.name and len(schedule.steps) == c.steps
    # The paper's preset is in the space, step for step.
    paper = next(c for c in pool if dict(c.levers) == PAPER and c.steps == 20)
    assert build(paper).steps == resolve_schedule("postdiff-sd15").steps
    # Off-grid scales are left out of an export instead of failing it (0.75 x 16 = 12 is not a multiple of 8).
    everything = tuning_schedules()
    assert len(everything) == len(pool)
    on_grid = tuning_schedules(latent=(16, 16), multiple=8)
    assert 0 < len(on_grid) < len(everything) and all(0.75 not in s.scales for s in on_grid)


def test_export_flag_covers_every_candidate_variant() -> None:
    from postdiff.exporter.export import ExportOptions, unet_variants

    args = build_parser().parse_args(["export", "random:tiny-sd", "--out", "x", "--tuning-space"])
    assert args.tuning_space and not ExportOptions(source="s", out=Path("x")).tuning_space
    exported = set(unet_variants(tuning_schedules(latent=(16, 16), multiple=2), (16, 16), 2))
    for schedule in tuning_schedules():
        for v in graph_variants(schedule):
            assert any(e.batch == v.batch and e.deep == v.deep and e.xattn == v.xattn and e.branch == v.branch
                       and e.latent == (int(16 * v.scale), int(16 * v.scale)) for e in exported)


def test_pruning_drops_nested_slower_candidates_and_keeps_both_families() -> None:
    pool = candidates()
    # A MAC-like model: every lever makes a step cheaper ...
    factor = {"low_res": 0.7, "deepcache": 0.8, "xattn": 0.85}
    predicted = {}
    for c in pool:
        cost = c.steps * 10.0
        for lever, _ in c.levers:
            cost *= factor[lever]
        predicted[c.name] = cost
    kept, dropped = prune_dominated(pool, predicted)
    assert not dropped and len(kept) == len(pool)
    # ... except DeepCache on top of low resolution, which a device may make slower.
    slow = "t20-lr0.5:10-dck2b1"
    predicted[slow] = predicted["t20-lr0.5:10"] * 1.05
    kept, dropped = prune_dominated(pool, predicted)
    assert dropped == {slow: "t20-lr0.5:10"}
    assert {c.family for c in kept} == {FEWER, CHEAPER}
    # Not nested, not compared: the gate alone vs low-res alone (their fidelities are not ordered).
    predicted["t20-g5cond"] = predicted["t20-lr0.5:10"] * 2
    assert "t20-g5cond" not in prune_dominated(pool, predicted)[1]
    # The fewer-steps family is never pruned, however the predictions fall.
    flat = {c.name: 1.0 for c in pool}
    kept, dropped = prune_dominated(pool, flat)
    assert {c.name for c in kept if c.family == FEWER} == {c.name for c in pool if c.family == FEWER}
    assert {c.family for c in kept} == {FEWER, CHEAPER}  # single levers nest over no cheaper candidate


def test_frontier_and_choice() -> None:
    points = [{"name": "a", "predicted_ms": 10.0, "digit_fid": 9.0, "psnr_db": 20.0},
              {"name": "b", "predicted_ms": 20.0, "digit_fid": 5.0, "psnr_db": 25.0},
              {"name": "c", "predicted_ms": 25.0, "digit_fid": 6.0, "psnr_db": 24.0},  # dominated by b
              {"name": "base", "predicted_ms": 40.0, "digit_fid": 4.0, "psnr_db": None}]  # None: the reference
    assert pareto_names(points, "digit_fid") == {"a", "b", "base"}
    assert pareto_names(points, "psnr_db") == {"a", "b", "base"}
    assert choose(points, "digit_fid", 30.0)["name"] == "b"
    assert choose(points, "psnr_db", 100.0)["name"] == "base"
    assert choose(points, "digit_fid", 5.0) is None


def test_spearman() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert list(average_ranks([3.0, 1.0, 3.0])) == [2.5, 1.0, 2.5]
    with pytest.raises(InputError, match="constant"):
        spearman([1, 1, 1], [1, 2, 3])


def test_cache_skips_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "cache.jsonl"
    cache = TuneCache(path)
    cache.add({"key": "k1", "measured_ms": 1.0})
    with open(path, "a") as handle:
        handle.write('{"key": "k2", "meas')  # a run killed mid-write
    again = TuneCache(path)
    assert again.get("k1") == {"key": "k1", "measured_ms": 1.0} and again.get("k2") is None and again.torn == 1


# --- the tuner -----------------------------------------------------------------------------------

def oracle_psnr(bundle: Path, pool, name: str, calib: int) -> float:
    """Mean PSNR (dB, 8-bit) of candidate ``name``'s images against the 20-step baseline's, generated
    here request by request with the shipped sampler (the tuner's default) and scored with the textbook
    formula 10 log10(255^2 / MSE)."""
    import numpy as np

    from postdiff.runtime.pipeline import GenerateOptions, Pipeline
    from postdiff.tools.evaluate import SD_PROMPTS

    pipeline = Pipeline(bundle, verify=False)
    by_name = {c.name: build(c) for c in pool}
    values = []
    for seed in range(calib):
        images = []
        for schedule in (by_name[name], by_name["t20"]):
            options = GenerateOptions(prompt=SD_PROMPTS[seed % len(SD_PROMPTS)], seed=seed, steps=len(schedule.steps),
                                      guidance=pipeline.manifest.model.default_guidance)
            images.append(pipeline.generate(options, schedule=schedule).image.astype(np.float64))
        values.append(10 * np.log10(255.0 ** 2 / np.mean((images[0] - images[1]) ** 2)))
    return float(np.mean(values))


def tune_args(bundle: Path, device: Path, out: Path, *extra: str) -> list[str]:
    return ["tune", str(bundle), "--device", str(device), "--calib", "2", "--workers", "1", "--timing-runs", "1",
            "--out", str(out), "--quiet", *extra]


def test_tune_end_to_end_then_resume(tiny_postdiff_bundle: Path, device: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tuned.json"
    pool = space(*PRESET_LIKE, *LACKING)
    options = TuneOptions(bundle=tiny_postdiff_bundle, device=device, out=out, speedup=1.2, calib=2, workers=1,
                          timing_runs=1, space=pool)
    report = tune(options, progress=False)
    schedule = load_schedule(out)  # ready for `postdiff generate --schedule`
    assert schedule.name == report.chosen
    frontier = json.loads((tmp_path / "frontier.json").read_text())
    assert frontier["metric"] == "psnr_db"  # a text model: PSNR against the baseline
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(report.missing) == sorted(LACKING)
    assert any("--tuning-space" in note for note in report.notes)
    points = {p["name"]: p for p in frontier["points"]}
    assert {"t20", "t8", "t4"} <= set(points)  # the fewer-steps family is always measured
    for p in points.values():
        assert {"name", "family", "schedule", "predicted_ms", "measured_ms", "prediction_error", "psnr_db", "ssim",
                "digit_fid", "adherence", "on_frontier", "chosen"} <= set(p)
        assert p["digit_fid"] is None and p["adherence"] is None  # no digit classifier for a text model
    assert {"all_worst", "frontier_worst", "frontier_mean_abs"} <= set(frontier["prediction_accuracy"])
    # the same graph called 4, 8 and 20 times: predictions ordered as the step counts
    assert points["t4"]["predicted_ms"] < points["t8"]["predicted_ms"] < points["t20"]["predicted_ms"]
    # fidelity is measured on the calibration requests (seeds 0..N-1, the SD prompts in turn) against the
    # 20-step baseline's images: an independent PSNR of those images
    for name in ("t4", "t8"):
        assert points[name]["psnr_db"] == pytest.approx(oracle_psnr(tiny_postdiff_bundle, pool, name, 2), rel=1e-3)
    chosen = [p for p in points.values() if p["chosen"]]
    assert len(chosen) == 1 and chosen[0]["name"] == report.chosen and chosen[0]["on_frontier"]
    assert chosen[0]["predicted_ms"] <= frontier["budget_ms"] == pytest.approx(points["t20"]["predicted_ms"] / 1.2)
    assert report.fidelity_computed == len(points) and report.latency_computed == len(points)
    lines = (tmp_path / "tune-cache.jsonl").read_text().splitlines()
    assert len(lines) == 2 * len(points)

    # A second run, for a smaller budget (so measuring a subset), through the command line: everything
    # comes from the cache.
    def no_generation(*args, **kwargs):
        raise AssertionError("a cached candidate was generated again")

    monkeypatch.setattr(tune_module, "generate_set", no_generation)
    monkeypatch.setattr(tune_module, "candidates", lambda steps_full=20, cfg=True: list(pool))  # the CLI's space
    code = main(tune_args(tiny_postdiff_bundle, device, tmp_path / "again.json", "--budget-ms",
                          str(frontier["budget_ms"] * 0.9)))
    printed = capsys.readouterr().out
    assert code == 0 and "computed 0 fidelity and 0 latency results" in printed
    assert "chose " in printed and "t20" in printed and "predicted vs measured latency: frontier worst" in printed
    assert (tmp_path / "tune-cache.jsonl").read_text().splitlines() == lines


def test_budget_nothing_fits(tiny_postdiff_bundle: Path, device: Path, tmp_path: Path) -> None:
    options = TuneOptions(bundle=tiny_postdiff_bundle, device=device, out=tmp_path / "s.json", budget_ms=0.01,
                          calib=2, workers=1, space=space(*PRESET_LIKE))
    with pytest.raises(InputError, match=r"--budget-ms 0\.0: no candidate fits; the fastest, t4, is predicted at"):
        tune(options, progress=False)
    assert not (tmp_path / "s.json").exists()


def test_missing_baseline_graph(tiny_postdiff_bundle: Path, device: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_postdiff_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    plain = [name for name, g in manifest["graphs"].items()
             if g.get("variant") and g["variant"]["batch"] == 2 and g["variant"]["latent"] == [16, 16]
             and g["variant"]["deep"] == "none" and g["variant"]["xattn"] == "none"]
    assert len(plain) == 1
    del manifest["graphs"][plain[0]]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    options = TuneOptions(bundle=bundle, device=device, out=tmp_path / "s.json", speedup=2.0, space=space("t8"))
    with pytest.raises(BundleError, match="baseline.*--tuning-space"):
        tune(options, progress=False)


def test_profile_of_another_bundle(tiny_postdiff_bundle: Path, device: Path, tmp_path: Path) -> None:
    data = json.loads(device.read_text())
    data["bundle"]["manifest_sha256"] = "0" * 64
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    options = TuneOptions(bundle=tiny_postdiff_bundle, device=other, out=tmp_path / "s.json", speedup=2.0,
                          space=space("t8"))
    with pytest.raises(InputError, match="another bundle"):
        tune(options, progress=False)


@pytest.mark.parametrize("extra, message", [
    ((), "one of the arguments --budget-ms --speedup is required"),
    (("--speedup", "0"), "--speedup 0.0 is not a positive number"),
    (("--speedup", "2", "--calib", "1"), "--calib 1 is too few"),
    (("--speedup", "2", "--workers", "0"), "--workers 0 must be at least 1"),
    (("--speedup", "2", "--ray-cpus", "2"), "--ray-bundle and --ray-cpus only apply with --ray"),
    (("--speedup", "2", "--ray-cpus", "0", "--ray"), "--ray-cpus 0 must be at least 1"),
])
def test_cli_errors(tiny_postdiff_bundle: Path, device: Path, tmp_path: Path, capsys, extra, message: str) -> None:
    args = tune_args(tiny_postdiff_bundle, device, tmp_path / "s.json")
    for flag in ("--calib", "--workers"):
        if flag in extra:  # the case's value replaces the test default
            i = args.index(flag)
            del args[i:i + 2]
    try:
        code = main([*args, *extra])
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "s.json").exists()


def test_worker_processes_score_like_the_main_process(tiny_postdiff_bundle: Path) -> None:
    from postdiff.tools.tune import evaluate_fidelity

    schedules = [build(c) for c in space("t4", "t8", "t20-lr0.5:10-dck2b1-g5cond")]
    reference = build(space("t20")[0])
    inline, computed = evaluate_fidelity(tiny_postdiff_bundle, schedules, reference, 2, workers=1, progress=False)
    pooled, _ = evaluate_fidelity(tiny_postdiff_bundle, schedules, reference, 2, workers=2, progress=False)
    assert computed == 3 and set(inline) == set(pooled) == {s.name for s in schedules}
    for name in inline:  # workers run one intra-op thread each: sums may round differently
        assert pooled[name]["psnr_db"] == pytest.approx(inline[name]["psnr_db"], rel=1e-3)
        assert pooled[name]["ssim"] == pytest.approx(inline[name]["ssim"], rel=1e-3, abs=1e-6)


class FakeCluster:
    """What tune_ray.plan reads of a Ray cluster: its nodes' CPUs."""

    def __init__(self, *cpus: int) -> None:
        self._nodes = [{"Alive": True, "Resources": {"CPU": float(c)}} for c in cpus]
        self._nodes.append({"Alive": False, "Resources": {"CPU": 64.0}})  # a dead node does not count

    def nodes(self) -> list[dict]:
        return self._nodes


def test_ray_plan_fits_the_workers_to_the_nodes() -> None:
    from postdiff.errors import ClusterError
    from postdiff.tools.tune_ray import RayOptions, plan

    assert plan(FakeCluster(2), RayOptions(), 10) == (2, 1)  # one worker per CPU
    assert plan(FakeCluster(2), RayOptions(workers=1), 10) == (1, 2)  # the CPUs shared out, as the local pool does
    assert plan(FakeCluster(8), RayOptions(), 3) == (3, 1)  # no more workers than candidates
    assert plan(FakeCluster(2), RayOptions(workers=5), 10) == (2, 1)  # no more than the nodes hold
    assert plan(FakeCluster(4, 4), RayOptions(cpus=3), 10) == (2, 3)  # one per node
    assert plan(FakeCluster(4, 4), RayOptions(workers=1), 10) == (1, 4)  # a worker is at most one node
    with pytest.raises(InputError, match="--ray-cpus 5: no node of the Ray cluster has that many CPUs"):
        plan(FakeCluster(4, 4), RayOptions(cpus=5), 10)
    with pytest.raises(ClusterError, match="no CPUs"):
        plan(FakeCluster(), RayOptions(), 10)
