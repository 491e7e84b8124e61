"""`postdiff bench`: diffusers vs the runtime and baseline vs schedules, each row in its own process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from postdiff.cli import main
from postdiff.errors import InputError, ScheduleError
from postdiff.profiles.device import dump_device_profile
from postdiff.tools.bench import BenchOptions, bench, format_report
from postdiff.tools.profiler import profile_bundle


@pytest.fixture(scope="module")
def report(tiny_postdiff_bundle: Path) -> dict:
    return bench(BenchOptions(bundle=tiny_postdiff_bundle, schedules=("postdiff-sd15", "fewer-steps"), repeats=2),
                 progress=False)


def test_rows_compare_diffusers_baseline_and_schedule(report: dict) -> None:
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == ["diffusers:baseline", "runtime:baseline", "runtime:postdiff-sd15", "runtime:fewer-steps"]
    base, fast, theirs = rows["runtime:baseline"], rows["runtime:postdiff-sd15"], rows["diffusers:baseline"]
    # the speed figure comes with the parity figure: same latents in, same latents out
    assert base["max_abs_diff_vs_diffusers"] <= 1e-4
    # fewer-steps calls the baseline's one UNet graph 8 times instead of 20: a MAC ratio of exactly 20/8
    assert rows["runtime:fewer-steps"]["mac_predicted_speedup"] == 2.5
    assert fast["mac_predicted_speedup"] > 2  # the preset's MAC saving on the tiny model
    for row in (base, fast):
        assert len(row["walls_s"]) == 2  # --repeats timed runs
        assert 0 < row["graph_s"] <= row["wall_s"]  # time inside graphs is part of the wall time
        # cold start: interpreter + imports < first UNet call, which comes after the stamp check
        assert 0 < row["import_s"] < row["load_s"] and row["verify_s"] < row["load_s"] and row["sessions_s"] > 0
    # peak memory is each child's own: the torch row is heavier than the torch-free ones, and none
    # inherits this (torch-laden) test process's size
    assert max(base["peak_rss_mb"], fast["peak_rss_mb"]) < theirs["peak_rss_mb"]


def test_an_lcm_is_measured_against_its_own_baseline(tmp_path: Path) -> None:
    """An LCM runs no classifier-free guidance: --baseline lcm-4 makes its 4 steps the reference row,
    and diffusers' LCM pipeline runs the same 4 steps (its final latents compared with ours)."""
    report = bench(BenchOptions(model="random:tiny-lcm", bundle=tmp_path / "lcm", baseline="lcm-4",
                                schedules=("postdiff-lcm",), repeats=1), progress=False)
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == ["diffusers:lcm-4", "runtime:lcm-4", "runtime:postdiff-lcm"] and report["baseline"] == "lcm-4"
    assert rows["runtime:lcm-4"]["max_abs_diff_vs_diffusers"] <= 1e-4
    assert rows["runtime:postdiff-lcm"]["rel_l2_vs_baseline"] > 0  # another schedule, another image


def test_report_table_names_every_row(report: dict) -> None:
    table = format_report(report)
    for row in report["rows"]:
        assert row["row"] in table
    assert "max abs diff" in table


def _slowed(value, factor: float):
    """A device profile's JSON with every timing (``*_ms``) multiplied by ``factor``."""
    if isinstance(value, dict):
        return {k: v * factor if k.endswith("_ms") else _slowed(v, factor) for k, v in value.items()}
    return value


def test_cli_without_diffusers_with_device_profile(capsys, tiny_bundle: Path, tmp_path: Path) -> None:
    """A profile of this bundle, but claiming every graph call and step takes 1000x what it took: the
    reported prediction error must say so (predicted / measured - 1 far above 0, in one unit)."""
    measured = profile_bundle(tiny_bundle, repeats=1, warmup=0, progress=False)
    device = tmp_path / "device.json"
    device.write_text(json.dumps(_slowed(json.loads(dump_device_profile(measured)), 1000.0)))
    out = tmp_path / "bench.json"
    code = main(["bench", "--bundle", str(tiny_bundle), "--schedule", "fewer-steps", "--no-diffusers",
                        "--repeats", "1", "--device", str(device), "--json", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["runtime:baseline", "runtime:fewer-steps"]
    assert rows["runtime:fewer-steps"]["predicted_ms"] < rows["runtime:baseline"]["predicted_ms"]
    assert "speedup_vs_diffusers" not in rows["runtime:baseline"]
    for row in rows.values():  # ~1000x the honest prediction, which is within 10x of a run even under load
        assert 50 < row["prediction_error"] < 1e5, row
    assert "pred. err" in captured.out


@pytest.mark.parametrize("options, error, words", [
    (BenchOptions(), InputError, "nothing to benchmark"),
    (BenchOptions(model="random:tiny-sd", repeats=0), InputError, "--repeats 0"),
    (BenchOptions(model="random:tiny-sd", weights="both"), InputError, "--weights 'both'"),
    (BenchOptions(model="random:tiny-sd", schedules=("no-such-preset",)), ScheduleError, "no-such-preset"),
])
def test_bad_options_fail_before_any_work(options: BenchOptions, error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        bench(options, progress=False)


def test_bundle_problems_are_named(tiny_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(ScheduleError, match="lacks"):  # the plain bundle has no postdiff graphs
        bench(BenchOptions(bundle=tiny_bundle, schedules=("postdiff-sd15",), diffusers=False), progress=False)
    with pytest.raises(InputError, match="not the model the bundle was exported from"):
        bench(BenchOptions(model="digits", bundle=tiny_bundle, schedules=()), progress=False)
    with pytest.raises(InputError, match="does not exist; pass --model"):
        bench(BenchOptions(bundle=tmp_path / "absent"), progress=False)
    (tmp_path / "junk").mkdir()
    with pytest.raises(InputError, match="not a bundle"):
        bench(BenchOptions(bundle=tmp_path / "junk"), progress=False)


def test_memory_budget_rows_and_a_budget_too_small(tiny_postdiff_bundle: Path) -> None:
    with pytest.raises(InputError, match="--memory-budget 1 MB cannot fit"):  # before any row runs
        bench(BenchOptions(bundle=tiny_postdiff_bundle, schedules=(), diffusers=False, memory_budget_mb=1),
              progress=False)
    report = bench(BenchOptions(bundle=tiny_postdiff_bundle, schedules=("postdiff-sd15",), diffusers=False,
                                repeats=1, memory_budget_mb=2048), progress=False)
    assert {r["memory_budget_mb"] for r in report["rows"]} == {2048}
    assert all(r["peak_rss_mb"] > 0 and r["load_s"] > 0 for r in report["rows"])
