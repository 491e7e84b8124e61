"""`postdiff tune --ray` on one machine: one local Ray instance (2 CPUs) for the whole module, the
tiny bundle, a few calibration samples. Ray scores like the local pool, survives a killed worker,
ships the bundle through the object store, and a Ctrl-C leaves a cache that a re-run completes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from postdiff.profiles.tuning import build, candidates
from postdiff.errors import BundleError, InputError
from postdiff.tools import tune_ray
from postdiff.tools.tune import TuneCache, TuneOptions, evaluate_fidelity, tune
from postdiff.tools.tune_ray import BundleSource, RayOptions

ray = pytest.importorskip("ray", reason="needs the [distributed] extra (`make test` installs it)")

PRESET_LIKE = ("t20", "t8", "t4", "t20-lr0.5:10-dck2b1-g5cond", "t20-lr0.75:10-dck2b1-g5cond")
CPUS = 2


def space(*names: str):
    by_name = {c.name: c for c in candidates()}
    return tuple(by_name[n] for n in names)


@pytest.fixture(scope="module")
def cluster() -> str:
    """The address of a local Ray instance shared by this module's tests (started once: it is slow)."""
    if ray.is_initialized():
        ray.shutdown()
    # the loopback node address (Ray may still bind the host's own interface address for its GCS)
    ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def fidelity_lines(cache: Path) -> list[dict]:
    return [r for r in map(json.loads, cache.read_text().splitlines()) if r["kind"] == "fidelity"]


def wait_for_free_cpus(timeout_s: float = 30.0) -> None:
    """Until every actor of an earlier run has released its CPU (Ray frees them asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < CPUS:
        assert time.monotonic() < deadline, f"Ray CPUs still held: {ray.available_resources()}"
        time.sleep(0.2)


def test_ray_gives_the_frontier_and_numbers_of_the_local_pool(tiny_postdiff_bundle: Path, device: Path,
                                                               tmp_path: Path, cluster: str) -> None:
    frontiers = {}
    for backend, options in (("pool", None), ("ray", RayOptions(address=cluster))):
        out = tmp_path / backend / "tuned.json"
        out.parent.mkdir()
        report = tune(TuneOptions(bundle=tiny_postdiff_bundle, device=device, out=out, speedup=1.2, calib=2,
                                  workers=2, timing_runs=1, space=space(*PRESET_LIKE), ray=options), progress=False)
        frontiers[backend] = json.loads(report.frontier_path.read_text())
        records = fidelity_lines(report.cache_path)
        assert sorted(r["name"] for r in records) == sorted(p["name"] for p in frontiers[backend]["points"])
        assert {r["backend"] for r in records} == {backend}
    pool, on_ray = frontiers["pool"], frontiers["ray"]
    assert on_ray["chosen"] == pool["chosen"]
    assert [p["name"] for p in on_ray["points"]] == [p["name"] for p in pool["points"]]
    for p, q in zip(pool["points"], on_ray["points"]):
        assert (q["on_frontier"], q["chosen"], q["predicted_ms"]) == (p["on_frontier"], p["chosen"], p["predicted_ms"])
        if p["psnr_db"] is None:  # the baseline against itself
            assert q["psnr_db"] is None
        else:  # Ray workers run their own thread count: sums may round differently
            assert q["psnr_db"] == pytest.approx(p["psnr_db"], rel=1e-4)
        assert q["ssim"] == pytest.approx(p["ssim"], rel=1e-4, abs=1e-7)
    # The cache a Ray run wrote serves a local run: nothing is computed again.
    again = tune(TuneOptions(bundle=tiny_postdiff_bundle, device=device, out=tmp_path / "again.json", speedup=1.2,
                             calib=2, workers=2, timing_runs=1, space=space(*PRESET_LIKE),
                             cache=tmp_path / "ray" / "tune-cache.jsonl"), progress=False)
    assert again.fidelity_computed == 0 and again.chosen == on_ray["chosen"]
    wait_for_free_cpus()


class DyingWorker(tune_ray.FidelityWorker):
    """Killed (SIGKILL, as by the OOM killer) while scoring ``victim``, the first time only."""

    victim = "t8"
    marker = ""  # a file that records the death across processes; set before Ray pickles the class

    def evaluate(self, schedule):
        if schedule.name == self.victim and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().evaluate(schedule)


def test_a_killed_worker_is_survived_and_the_bundle_travels_by_object_store(
        tiny_postdiff_bundle: Path, tmp_path: Path, cluster: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    monkeypatch.setattr(DyingWorker, "marker", str(tmp_path / "died"))
    monkeypatch.setattr(tune_ray, "FidelityWorker", DyingWorker)
    schedules = [build(c) for c in space("t4", "t8", "t20-lr0.5:10-dck2b1-g5cond")]
    reference = build(space("t20")[0])
    inline, _ = evaluate_fidelity(tiny_postdiff_bundle, schedules, reference, 2, workers=1, progress=False)
    cache_path = tmp_path / "cache.jsonl"
    scores, computed = evaluate_fidelity(tiny_postdiff_bundle, schedules, reference, 2, cache=TuneCache(cache_path),
                                         progress=False, ray=RayOptions(address=cluster, bundle="store", workers=2))
    assert (tmp_path / "died").is_file()  # a worker really died mid-candidate ...
    assert computed == 3 and set(scores) == {s.name for s in schedules}  # ... and its candidate was not lost
    assert sorted(r["name"] for r in fidelity_lines(cache_path)) == sorted(scores)  # nor counted twice
    for name in inline:
        assert scores[name]["psnr_db"] == pytest.approx(inline[name]["psnr_db"], rel=1e-4)
        assert scores[name]["ssim"] == pytest.approx(inline[name]["ssim"], rel=1e-4, abs=1e-7)
    # The workers opened the copy the object store brought them, not the tuner's folder.
    digest = scores["t4"]["manifest_sha256"]
    copy = Path(tempfile.gettempdir()) / tune_ray.STORE_DIR / digest[:32]
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in tiny_postdiff_bundle.iterdir())
    shutil.rmtree(copy)
    wait_for_free_cpus()


def test_ctrl_c_leaves_the_cache_consistent_and_a_rerun_computes_only_the_rest(
        tiny_postdiff_bundle: Path, device: Path, tmp_path: Path, cluster: str) -> None:
    out, cache = tmp_path / "tuned.json", tmp_path / "tune-cache.jsonl"
    # The command line in a child process, on the tests' small candidate space (as test_tune does it).
    # Ctrl-C is a real SIGINT, sent by the child to itself right after the tuner has recorded its first
    # result: mid-run on any machine (sent from outside, it raced a fast quiet run to its end).
    script = "\n".join([
        "import os, signal, sys",
        # A terminal's Ctrl-C reaches Python's own handler; a child of a job started with `&` by a
        # non-interactive shell inherits SIGINT ignored (seen in CI: the run went on to exit 0).
        "signal.signal(signal.SIGINT, signal.default_int_handler)",
        "from postdiff.cli import main",
        "from postdiff.tools import tune",
        "pool = [c for c in tune.candidates() if c.name in sys.argv[1].split(',')]",
        "tune.candidates = lambda *args, **kwargs: pool",
        "add, recorded = tune.TuneCache.add, []",
        "def add_then_interrupt(self, record):",
        "    add(self, record)",
        "    recorded.append(record)",
        "    if len(recorded) == 1:",
        "        os.kill(os.getpid(), signal.SIGINT)",
        "tune.TuneCache.add = add_then_interrupt",
        "sys.exit(main(sys.argv[2:]))"])
    command = [sys.executable, "-c", script, ",".join(PRESET_LIKE),
               "tune", str(tiny_postdiff_bundle), "--device", str(device), "--speedup", "1.2", "--calib", "4",
               "--timing-runs", "1", "--out", str(out), "--quiet", "--workers", "2", f"--ray={cluster}"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = child.communicate(timeout=180)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130 and "interrupted" in err, err
    before = fidelity_lines(cache)  # every line whole (json.loads would raise on a torn one)
    assert len({r["name"] for r in before}) == len(before) >= 1
    assert not out.exists()
    wait_for_free_cpus()  # the interrupted run's workers are gone

    report = tune(TuneOptions(bundle=tiny_postdiff_bundle, device=device, out=out, speedup=1.2, calib=4,
                              timing_runs=1, workers=2, space=space(*PRESET_LIKE), ray=RayOptions(address=cluster)),
                  progress=False)
    after = fidelity_lines(cache)
    points = {p["name"] for p in report.frontier["points"]}
    assert len(before) < len(points), "the run finished before Ctrl-C: nothing was interrupted"
    assert report.fidelity_computed == len(points) - len(before)
    assert sorted(r["name"] for r in after) == sorted(points) and after[:len(before)] == before
    wait_for_free_cpus()


def test_without_ray_installed(tiny_postdiff_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(InputError, match=r"--ray needs Ray.*pip install 'postdiff\[distributed\]'"):
        evaluate_fidelity(tiny_postdiff_bundle, [build(space("t4")[0])], build(space("t20")[0]), 2,
                          progress=False, ray=RayOptions())


def test_a_worker_refuses_another_bundle(tiny_postdiff_bundle: Path) -> None:
    with pytest.raises(BundleError, match="is not the tuner's bundle.*--ray-bundle store"):
        BundleSource(digest="0" * 64, path=str(tiny_postdiff_bundle)).open()
