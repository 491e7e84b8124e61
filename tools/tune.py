"""`postdiff tune`: the schedule with the best images within a latency budget on one device.

The tuner answers PostDiff's question -- fewer denoising steps, or cheaper steps? -- for one bundle
on one device, empirically:

1. **Candidates.** The space of :mod:`postdiff.profiles.tuning` (two families: *fewer steps* and
   *cheaper steps*). Candidates whose UNet graphs the bundle lacks are dropped and counted (export
   with ``--tuning-space`` to have them all); the plain 20-step baseline must be there.
2. **Prediction.** Every remaining candidate's latency is predicted from the device profile
   (:func:`postdiff.tools.profiler.predict_ms`) -- on the device, not on this machine. The budget is
   ``--budget-ms``, or the baseline's predicted latency divided by ``--speedup``. Cheaper-steps
   candidates that an extra lever does not make faster are dropped
   (:func:`postdiff.profiles.tuning.prune_dominated`).
3. **Selection of what to measure.** The whole fewer-steps family (the reference curve of the
   chart, and cheap), and every surviving cheaper-steps candidate predicted within
   ``budget * (1 + slack)`` (default slack 0.5): the candidates that can win, plus a margin above
   the budget so that the frontier has context and a misprediction does not hide a winner.
4. **Fidelity** on a calibration set of ``--calib`` requests (seeds 0..N-1; label models cycle
   through their labels) against the baseline's images of the same requests: PSNR and SSIM for
   every model, plus digit-FID and class adherence for the digit model. The decisive metric is
   digit-FID (lower is better) for the digit model, PSNR vs the baseline (higher is better)
   otherwise. Candidates are spread over ``--workers`` processes, each with its own pipeline and a
   share of the cores; workers get the baseline's images once and return numbers, never images.
   With ``--ray`` the same scoring runs on Ray workers instead, here or on a cluster
   (:mod:`postdiff.tools.tune_ray`).
5. **Latency** of every measured candidate, *sequentially* in this process after the workers are
   done (so uncontended), with ONNX Runtime's default threads as in the device profile: the median
   over ``timing_runs`` generations after one warm-up generation. This is ``measured_ms``; it is a
   check of the prediction when the tuner runs on the device itself, and only informative when it
   runs elsewhere. (Each worker also records the median wall time of its calibration generations,
   ``calib_ms``; with several workers sharing the cores it is contended and not a latency figure.)
6. **Choice.** The best fidelity among measured candidates *predicted* within the budget (the
   device profile is the authority on the device's latency), ties going to the faster one. The
   Pareto frontier is over (predicted latency, fidelity).

Precision. With a device profile measured with ``--provider openvino`` the tuner generates on
OpenVINO, at fp32 for the baseline and for every step that does not pin its precision, so that the
baseline stays the fp32 reference; ``--precision-space`` adds the precision lever
(:mod:`postdiff.profiles.tuning`): candidates with bf16 steps, predicted from the profile's bf16
timings and scored on OpenVINO bf16 like any other candidate. Without the flag the same command gives
the frontier without precision on the same device, so the two frontiers are comparable.

Resumability: every finished fidelity or latency result is appended at once, as one JSON line,
flushed and fsynced, to a cache file (default ``tune-cache.jsonl`` in ``--out``'s folder). Records
are keyed by a hash of the schedule's steps and cross-attention mode with the calibration size,
the scheduler and the sha256 of the bundle's manifest (latency: the number of timing runs instead
of the calibration size), so a re-run -- after a kill, or for another budget -- recomputes nothing
it already has, and one cache can serve several budgets, bundles and calibration sizes.

Outputs, beside ``--out``: ``frontier.json`` and ``frontier.png``; ``--out`` itself is the chosen
schedule, ready for ``postdiff generate --schedule``.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from postdiff.profiles.device import load_device_profile
from postdiff.profiles.tuning import (CHEAPER, FEWER, LCM_STEPS_FULL, MIN_GAIN, REFERENCE_STEPS, Candidate, build,
                                     candidates, prune_dominated)
from postdiff.errors import BundleError, InputError, ScheduleError
from postdiff.files import atomic_path, check_new_path
from postdiff.runtime.executor import required_graphs
from postdiff.runtime.jsonio import to_dict, write_json_atomic
from postdiff.runtime.manifest import Manifest, load_manifest
from postdiff.runtime.pipeline import Pipeline
from postdiff.runtime.schedule import Schedule
from postdiff.runtime.schedulers import SCHEDULERS, default_scheduler
from postdiff.tools.evaluate import (DigitJudge, Request, SampleSet, fidelity, generate_set, is_digit_model,
                                     requests_for)
from postdiff.tools.profiler import manifest_digest, predict_ms
from postdiff.tools.tune_ray import TRANSPORTS, RayOptions, ray_fidelity  # imports ray only when called

CACHE_NAME = "tune-cache.jsonl"
FRONTIER_JSON = "frontier.json"
FRONTIER_PNG = "frontier.png"
PREDICTION_TOLERANCE = 0.10  # the profile should predict a frontier point within 10% of its measured latency
METRICS = {"digit_fid": "digit-FID (lower is better)", "psnr_db": "PSNR vs baseline, dB (higher is better)"}


@dataclass(frozen=True)
class TuneOptions:
    """`postdiff tune` arguments (exactly one of ``budget_ms`` and ``speedup``)."""

    bundle: Path
    device: Path  # device profile JSON written by `postdiff profile` on this bundle
    out: Path  # chosen schedule JSON; frontier.json and frontier.png go beside it
    budget_ms: float | None = None
    speedup: float | None = None  # budget = predicted baseline latency / speedup
    calib: int = 128  # calibration requests per candidate
    workers: int | None = None  # processes measuring fidelity; None: os.cpu_count()
    scheduler: str | None = None  # a key of SCHEDULERS; None: the sampler the bundle's model ships
    timing_runs: int = 5  # timed generations per candidate for measured_ms (after one warm-up)
    slack: float = 0.5  # measure cheaper-steps candidates predicted within budget * (1 + slack)
    min_gain: float = MIN_GAIN  # see profiles.tuning.prune_dominated
    cache: Path | None = None  # default: tune-cache.jsonl in out's folder
    steps_full: int | None = None  # the baseline's step count (None: 20, or LCM_STEPS_FULL for an LCM)
    space: tuple[Candidate, ...] | None = None  # candidates to consider; None: profiles.tuning.candidates()
    ray: RayOptions | None = None  # score fidelity on Ray workers (``workers`` then counts them); None: locally
    # Precision as a lever (profiles.tuning, ``--precision-space``). With an OpenVINO device profile the
    # tuner generates on OpenVINO at fp32 (the baseline and every step that pins none; bf16 where a
    # candidate pins it) with or without the lever; the lever needs such a profile with bf16 timings.
    precision_space: bool = False


@dataclass
class TuneReport:
    """What a tune run found and wrote."""

    frontier: dict  # the content of frontier.json
    chosen: str
    schedule_path: Path
    frontier_path: Path
    plot_path: Path
    cache_path: Path
    missing: list[str] = field(default_factory=list)  # candidates the bundle lacks graphs for (all the
    # skipped candidates, with the dominated and the unmeasured, are in frontier["skipped"])
    fidelity_computed: int = 0  # candidates evaluated in this run (the rest came from the cache)
    latency_computed: int = 0
    fidelity_s: float = 0.0  # wall time of the fidelity phase (with --ray: connecting and starting workers too)
    latency_s: float = 0.0  # wall time of the latency phase
    notes: list[str] = field(default_factory=list)


# --- Cache -------------------------------------------------------------------------------------

def schedule_digest(schedule: Schedule) -> str:
    """sha256 of what a schedule does (its steps and cross-attention mode; not its name)."""
    text = json.dumps({"steps": to_dict(schedule.steps), "xattn_mode": schedule.xattn_mode}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _key(kind: str, **fields: object) -> str:
    return hashlib.sha256(json.dumps({"kind": kind, **fields}, sort_keys=True).encode()).hexdigest()


#: How the tuner runs generations: (provider, run precision). ONNX Runtime by default; with the precision
#: lever, OpenVINO at fp32 (steps that pin bf16 run at bf16).
ORT_RUN = ("cpu", "auto")
OPENVINO_RUN = ("openvino", "fp32")


def _run_fields(run: tuple[str, str]) -> dict[str, str]:
    """The key fields of how results were generated: none for ONNX Runtime (the keys of caches written
    before the precision lever stay valid), provider and precision otherwise."""
    return {} if run == ORT_RUN else {"provider": run[0], "precision": run[1]}


def fidelity_key(schedule: Schedule, calib: int, scheduler: str, manifest_sha: str,
                 run: tuple[str, str] = ORT_RUN) -> str:
    """Cache key of a candidate's fidelity on ``calib`` requests."""
    return _key("fidelity", schedule=schedule_digest(schedule), calib=calib, scheduler=scheduler,
                manifest=manifest_sha, **_run_fields(run))


def latency_key(schedule: Schedule, runs: int, scheduler: str, manifest_sha: str,
                run: tuple[str, str] = ORT_RUN) -> str:
    """Cache key of a candidate's measured latency: the median of ``runs`` timed generations."""
    return _key("latency", schedule=schedule_digest(schedule), runs=runs, scheduler=scheduler,
                manifest=manifest_sha, statistic="median", **_run_fields(run))


class TuneCache:
    """An append-only JSON-lines file of finished results, read back by key.

    Each record is written with one ``write`` of one line, then flushed and fsynced, so a killed
    run loses at most the record being written; a torn last line is skipped on reading (counted in
    ``torn``). Only one tune process should append to a cache at a time.
    """

    def __init__(self, path: Path | None) -> None:
        """Read ``path`` if it exists; None keeps the records in memory only."""
        self.path = None if path is None else Path(path)
        self.records: dict[str, dict] = {}
        self.torn = 0
        if self.path is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    self.torn += 1
                    continue
                if isinstance(record, dict) and isinstance(record.get("key"), str):
                    self.records[record["key"]] = record

    def get(self, key: str) -> dict | None:
        """The record stored under ``key``, or None."""
        return self.records.get(key)

    def add(self, record: dict) -> None:
        """Append ``record`` (which has a ``key``) durably."""
        self.records[record["key"]] = record
        if self.path is None:
            return
        line = json.dumps(record, sort_keys=True, allow_nan=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


# --- Fidelity, in worker processes ----------------------------------------------------------------

class Evaluator:
    """Scores schedules against the baseline's images of the same calibration requests."""

    def __init__(self, pipeline: Pipeline, requests: list[Request], reference: list, scheduler: str,
                 judged: bool) -> None:
        self.pipeline = pipeline
        self.requests = requests
        self.reference = SampleSet("baseline", list(reference), 0.0)
        self.scheduler = scheduler
        self.judge = DigitJudge() if judged else None

    def evaluate(self, schedule: Schedule) -> dict:
        """{"psnr_db" (None when identical to the baseline), "ssim", "adherence", "digit_fid",
        "calib_ms": median wall time of one calibration generation in this process}."""
        images = generate_set(self.pipeline, schedule, self.requests, self.scheduler, progress=False)
        scores = fidelity(images, self.reference, self.requests, self.judge)
        return {**scores, "calib_ms": images.latency_s * 1000.0}


_WORKER: Evaluator | None = None
_WORKER_ERROR: Exception | None = None


def _init_worker(bundle: str, requests: list[Request], reference: list, scheduler: str, judged: bool,
                 threads: int | None, run: tuple[str, str] = ORT_RUN) -> None:
    global _WORKER, _WORKER_ERROR
    try:
        pipeline = Pipeline(Path(bundle), verify=False, threads=threads, provider=run[0],
                            precision=run[1])  # the parent verified the files
        _WORKER = Evaluator(pipeline, requests, reference, scheduler, judged)
    except Exception as exc:  # raised from _work instead: a Pool respawns failing initializers forever
        _WORKER_ERROR = exc


def _work(schedule: Schedule) -> tuple[str, dict]:
    if _WORKER_ERROR is not None:
        raise _WORKER_ERROR
    if _WORKER is None:
        raise RuntimeError("tune worker used before its initializer ran (a postdiff bug)")
    return schedule.name, _WORKER.evaluate(schedule)


def _local_fidelity(pipeline: Pipeline, todo: Sequence[Schedule], requests: list[Request], reference_images: list,
                    scheduler: str, judged: bool, workers: int,
                    run: tuple[str, str] = ORT_RUN) -> Iterator[tuple[Schedule, dict]]:
    """(schedule, scores) as each finishes: inline with one worker, else on a pool of processes."""
    if workers == 1:
        evaluator = Evaluator(pipeline, requests, reference_images, scheduler, judged)
        for schedule in todo:
            yield schedule, evaluator.evaluate(schedule)
        return
    # Spawned, not forked: ONNX Runtime's thread pools do not survive a fork. Each worker takes an
    # equal share of the cores so that the workers do not oversubscribe them.
    threads = max(1, (os.cpu_count() or 1) // workers)
    by_name = {s.name: s for s in todo}
    context = multiprocessing.get_context("spawn")
    pool = context.Pool(workers, initializer=_init_worker,
                        initargs=(str(pipeline.bundle), requests, reference_images, scheduler, judged, threads, run))
    try:
        for name, scores in pool.imap_unordered(_work, todo):
            yield by_name[name], scores
    except BaseException:  # errors, interrupts and an abandoned stream (GeneratorExit)
        pool.terminate()
        raise
    else:
        pool.close()  # a clean shutdown
    finally:
        pool.join()


def evaluate_fidelity(bundle: Path, schedules: Sequence[Schedule], reference: Schedule, calib: int,
                      scheduler: str = "ddim", workers: int = 1, cache: TuneCache | None = None,
                      progress: bool = True, ray: RayOptions | None = None,
                      run: tuple[str, str] = ORT_RUN) -> tuple[dict[str, dict], int]:
    """Fidelity of every schedule on ``calib`` requests against ``reference``'s images.

    Cached results are reused; new ones are appended to ``cache`` as they finish, by this process
    only (workers return numbers), so an interrupted run leaves whole records of finished candidates.
    The reference images are generated only when something has to be computed: in this process, or
    with ``ray`` on a Ray worker, which then also scores every candidate
    (:mod:`postdiff.tools.tune_ray`; ``workers`` is ignored there, see :class:`RayOptions`). Either
    way a candidate is scored by :meth:`Evaluator.evaluate`. The caller has checked the bundle's
    files (sha256). ``run`` is (provider, precision) of every generation (:data:`ORT_RUN` or
    :data:`OPENVINO_RUN`; Ray workers run ONNX Runtime only).

    Returns:
        ({schedule name: record with psnr_db, ssim, adherence, digit_fid, calib_ms}, number computed).
    """
    manifest = load_manifest(Path(bundle), verify=False)
    digest = manifest_digest(manifest)
    cache = cache if cache is not None else TuneCache(None)
    results: dict[str, dict] = {}
    todo: list[Schedule] = []
    for schedule in schedules:
        record = cache.get(fidelity_key(schedule, calib, scheduler, digest, run))
        if record is not None:
            results[schedule.name] = record
        else:
            todo.append(schedule)
    if not todo:
        return results, 0
    requests = requests_for(manifest, calib)
    judged = is_digit_model(manifest)
    if ray is not None and run != ORT_RUN:
        raise InputError("--ray scores fidelity with ONNX Runtime only; the precision lever needs OpenVINO: "
                         "drop --ray or --precision-space")
    if ray is not None:
        stream = ray_fidelity(Path(bundle), digest, todo, reference, requests, scheduler, judged, ray)
        backend, count = "ray", None  # the worker count is known once connected; records name the backend
    else:
        pipeline = Pipeline(Path(bundle), verify=False, provider=run[0], precision=run[1])  # files verified
        reference_images = generate_set(pipeline, reference, requests, scheduler, progress=progress).images
        count = max(1, min(workers, len(todo)))
        stream = _local_fidelity(pipeline, todo, requests, reference_images, scheduler, judged, count, run)
        backend = "inline" if count == 1 else "pool"
    bar = tqdm(total=len(schedules), initial=len(results), desc=f"fidelity (calib {calib})", unit="cand",
               disable=not progress)
    try:
        for schedule, scores in stream:
            if schedule.name in results:  # a backend bug; never count a candidate twice
                raise RuntimeError(f"candidate {schedule.name} was scored twice (a postdiff bug)")
            record = {"kind": "fidelity", "key": fidelity_key(schedule, calib, scheduler, digest, run),
                      "name": schedule.name, "schedule_sha256": schedule_digest(schedule), "calib": calib,
                      "scheduler": scheduler, "manifest_sha256": digest, "backend": backend,
                      **({} if count is None else {"workers": count}), **_run_fields(run), **scores}
            cache.add(record)  # at once: a kill or Ctrl-C loses only the candidates in flight
            results[schedule.name] = record
            bar.set_postfix_str(schedule.name)
            bar.update()
    finally:
        stream.close()  # stops the workers when this loop is left early (an error, Ctrl-C)
        bar.close()
    return results, len(todo)


# --- Latency, sequentially in this process -----------------------------------------------------

def measure_latency(bundle: Path, schedules: Sequence[Schedule], runs: int, scheduler: str = "ddim",
                    cache: TuneCache | None = None, progress: bool = True,
                    run: tuple[str, str] = ORT_RUN) -> tuple[dict[str, float], int]:
    """Median wall latency (ms) of one generation of each schedule, uncontended, cached.

    One warm-up generation (opens the sessions), then ``runs`` timed ones (seeds 0..runs-1).

    Returns:
        ({schedule name: measured ms}, number measured in this call).
    """
    manifest = load_manifest(Path(bundle), verify=False)
    digest = manifest_digest(manifest)
    cache = cache if cache is not None else TuneCache(None)
    results: dict[str, float] = {}
    todo = []
    for schedule in schedules:
        record = cache.get(latency_key(schedule, runs, scheduler, digest, run))
        if record is not None:
            results[schedule.name] = record["measured_ms"]
        else:
            todo.append(schedule)
    if not todo:
        return results, 0
    pipeline = Pipeline(Path(bundle), verify=False, provider=run[0], precision=run[1])
    requests = requests_for(pipeline, runs)
    bar = tqdm(total=len(schedules), initial=len(results), desc="latency", unit="cand", disable=not progress)
    for schedule in todo:
        bar.set_postfix_str(schedule.name)
        generate_set(pipeline, schedule, requests[:1], scheduler, progress=False)  # warm-up
        timed = generate_set(pipeline, schedule, requests, scheduler, progress=False)
        measured = timed.latency_s * 1000.0
        cache.add({"kind": "latency", "key": latency_key(schedule, runs, scheduler, digest, run), "name": schedule.name,
                   "schedule_sha256": schedule_digest(schedule), "runs": runs, "scheduler": scheduler,
                   "manifest_sha256": digest, "measured_ms": measured, **_run_fields(run)})
        results[schedule.name] = measured
        bar.update()
    bar.close()
    return results, len(todo)


# --- Frontier and choice -----------------------------------------------------------------------

def goodness(point: dict, metric: str) -> float:
    """The fidelity of a point as "higher is better": -digit-FID, or PSNR (+inf when identical to
    the baseline, whose PSNR against itself is recorded as None)."""
    value = point.get(metric)
    if metric == "digit_fid":
        return -math.inf if value is None else -float(value)
    return math.inf if value is None else float(value)


def pareto_names(points: Sequence[dict], metric: str, latency: str = "predicted_ms") -> set[str]:
    """Names of the points no other point beats: none is at most as slow and at least as faithful,
    and strictly better in one of the two."""
    frontier = set()
    for p in points:
        dominated = any(q is not p and q[latency] <= p[latency] and goodness(q, metric) >= goodness(p, metric)
                        and (q[latency] < p[latency] or goodness(q, metric) > goodness(p, metric))
                        for q in points)
        if not dominated:
            frontier.add(p["name"])
    return frontier


def choose(points: Sequence[dict], metric: str, budget_ms: float) -> dict | None:
    """The most faithful point predicted within the budget (ties: the faster), or None."""
    fitting = [p for p in points if p["predicted_ms"] <= budget_ms]
    if not fitting:
        return None
    return max(fitting, key=lambda p: (goodness(p, metric), -p["predicted_ms"]))


# --- The run -----------------------------------------------------------------------------------

def _check_options(options: TuneOptions) -> None:
    if (options.budget_ms is None) == (options.speedup is None):
        raise InputError("give exactly one of --budget-ms X (milliseconds per image on the device) or "
                         "--speedup Y (budget = the 20-step baseline's predicted latency / Y)")
    for flag, value in (("--budget-ms", options.budget_ms), ("--speedup", options.speedup)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise InputError(f"{flag} {value} is not a positive number; e.g. {flag} 2.5")
    if options.calib < 2:
        raise InputError(f"--calib {options.calib} is too few calibration samples; use at least 2 "
                         "(digit-FID needs a spread; 32 or more for a stable ranking)")
    if options.workers is not None and options.workers < 1:
        raise InputError(f"--workers {options.workers} must be at least 1 (default: the number of CPUs)")
    if options.ray is not None and options.ray.cpus is not None and options.ray.cpus < 1:
        raise InputError(f"--ray-cpus {options.ray.cpus} must be at least 1")
    if options.ray is not None and options.ray.bundle not in TRANSPORTS:
        raise InputError(f"--ray-bundle '{options.ray.bundle}' is not one of {list(TRANSPORTS)}")
    if options.timing_runs < 1:
        raise InputError(f"--timing-runs {options.timing_runs} must be at least 1")
    if not (math.isfinite(options.slack) and options.slack >= 0):
        raise InputError(f"--slack {options.slack} must be 0 or more (e.g. 0.5: measure up to 1.5x the budget)")
    if options.scheduler is not None and options.scheduler not in SCHEDULERS:
        raise InputError(f"--scheduler '{options.scheduler}' is not one of {list(SCHEDULERS)}")
    check_new_path(options.out, replace=True)


def has_graphs(manifest: Manifest, schedule: Schedule) -> bool:
    """Whether the bundle of ``manifest`` holds every UNet graph ``schedule`` runs."""
    try:
        required_graphs(manifest, schedule)
    except ScheduleError:
        return False
    return True


def tune(options: TuneOptions, progress: bool = True) -> TuneReport:
    """Run the tuner (see the module docstring) and write the schedule, frontier.json and frontier.png.

    Raises:
        InputError: bad options, a device profile of another bundle, or a budget nothing fits
            (naming the fastest candidate's predicted latency).
        BundleError: the bundle lacks the baseline's graph.
    """
    _check_options(options)
    bundle, out = Path(options.bundle), Path(options.out)
    manifest = load_manifest(bundle, verify=True)  # every file's sha256, once; the rest skip it
    if options.scheduler is None:
        options = replace(options, scheduler=default_scheduler(manifest.scheduler_class))
    cfg = not manifest.model.guidance_embedding  # LCM: no classifier-free guidance, a 2-8 step space
    if options.steps_full is None:
        options = replace(options, steps_full=REFERENCE_STEPS if cfg else LCM_STEPS_FULL)
    profile = load_device_profile(Path(options.device))
    run, run_precision = ORT_RUN, None
    if profile.machine.provider == "openvino":
        # An OpenVINO device: generate there too, at fp32 unless a step pins bf16, and predict likewise
        # (the profile's main timings are at OpenVINO's default, bf16 on CPUs that have it).
        run, run_precision = OPENVINO_RUN, "fp32"
        if profile.tables("fp32") is None:
            raise InputError(f"{options.device} has no fp32 timings (main precision {profile.machine.precision}); "
                             "re-run `postdiff profile BUNDLE --provider openvino` with this postdiff, which times "
                             "every precision the CPU runs")
    if options.precision_space and (run != OPENVINO_RUN or profile.tables("bf16") is None):
        raise InputError(f"--precision-space needs a device profile measured with --provider openvino on a CPU with "
                         f"native bfloat16, with timings at fp32 and bf16; {options.device} is "
                         f"{profile.machine.provider} at {[profile.machine.precision, *profile.precisions]}")
    if options.space is not None:
        space = list(options.space)
    else:
        space = (candidates(options.steps_full, cfg, precision=True) if options.precision_space
                 else candidates(options.steps_full, cfg))
    baseline = next((c for c in candidates(options.steps_full, cfg)
                     if c.family == FEWER and c.steps == options.steps_full), None)
    if baseline is None:
        raise InputError(f"the candidate space has no plain {options.steps_full}-step baseline; "
                         "use a steps_full that the fewer-steps family contains (e.g. 20)")
    if baseline.name not in {c.name for c in space}:
        space.insert(0, baseline)
    built = {c.name: build(c) for c in space}
    if not has_graphs(manifest, built[baseline.name]):
        raise BundleError(
            f"bundle {bundle} lacks the graph of the {options.steps_full}-step baseline (full resolution, "
            "guidance on) that every fidelity figure is measured against; re-export it with "
            "`postdiff export MODEL --out BUNDLE --tuning-space` (or add `--schedule baseline`)")
    missing = [c.name for c in space if not has_graphs(manifest, built[c.name])]
    available = [c for c in space if c.name not in missing]
    predicted = {c.name: predict_ms(profile, manifest, built[c.name], options.scheduler, run_precision)
                 for c in available}
    baseline_ms = predicted[baseline.name]
    budget = options.budget_ms if options.budget_ms is not None else baseline_ms / options.speedup
    fastest = min(available, key=lambda c: predicted[c.name])
    if predicted[fastest.name] > budget:
        asked = (f"--budget-ms {budget:.1f}" if options.budget_ms is not None
                 else f"--speedup {options.speedup:g} (budget {budget:.1f} ms)")
        raise InputError(
            f"{asked}: no candidate fits; the fastest, {fastest.name}, is predicted at "
            f"{predicted[fastest.name]:.1f} ms on this device (the baseline at {baseline_ms:.1f} ms); raise "
            f"the budget to at least {predicted[fastest.name]:.1f} ms or --speedup at most "
            f"{baseline_ms / predicted[fastest.name]:.2f}"
            + ("" if not missing else f" ({len(missing)} candidates were skipped for lack of graphs: "
                                      "export with --tuning-space)"))
    kept, dominated = prune_dominated([c for c in available if c.family == CHEAPER], predicted, options.min_gain)
    # A dominated candidate within the budget whose dominator is over it stays: it may be the only fit.
    for name, by in list(dominated.items()):
        if predicted[name] <= budget < predicted[by]:
            del dominated[name]
            kept.append(next(c for c in available if c.name == name))
    limit = budget * (1.0 + options.slack)
    measured = [c for c in available if c.family == FEWER]
    measured += [c for c in kept if predicted[c.name] <= limit]
    unmeasured = [c.name for c in kept if predicted[c.name] > limit]

    cache_path = Path(options.cache) if options.cache is not None else out.parent / CACHE_NAME
    cache = TuneCache(cache_path)
    schedules = [built[c.name] for c in measured]
    workers = options.workers or os.cpu_count() or 1
    ray = None if options.ray is None else replace(options.ray, workers=options.workers)
    started = time.perf_counter()
    scores, fidelity_computed = evaluate_fidelity(bundle, schedules, built[baseline.name], options.calib,
                                                  options.scheduler, workers, cache, progress, ray, run)
    fidelity_s, started = time.perf_counter() - started, time.perf_counter()
    latencies, latency_computed = measure_latency(bundle, schedules, options.timing_runs, options.scheduler, cache,
                                                  progress, run)
    latency_s = time.perf_counter() - started

    metric = decisive_metric(manifest)
    points = []
    for c in sorted(measured, key=lambda c: predicted[c.name]):
        s = scores[c.name]
        points.append({"name": c.name, "family": c.family, "steps": c.steps, "levers": dict(c.levers),
                       "schedule": to_dict(built[c.name]), "predicted_ms": predicted[c.name],
                       "measured_ms": latencies[c.name], "calib_ms": s.get("calib_ms"), "psnr_db": s["psnr_db"],
                       "ssim": s["ssim"], "digit_fid": s["digit_fid"], "adherence": s["adherence"],
                       "baseline": c.name == baseline.name})
    front = pareto_names(points, metric)
    chosen = choose(points, metric, budget)
    if chosen is None:  # cannot happen: the fastest fitting candidate is always measured
        raise RuntimeError(f"no measured candidate fits {budget:.1f} ms (a postdiff bug)")
    for p in points:
        p["on_frontier"] = p["name"] in front
        p["chosen"] = p["name"] == chosen["name"]
        p["prediction_error"] = p["predicted_ms"] / p["measured_ms"] - 1.0
    accuracy = prediction_accuracy(points)

    notes = []
    if missing:
        notes.append(f"{len(missing)} of {len(space)} candidates skipped: bundle {bundle} lacks their graphs; "
                     "re-export with `postdiff export MODEL --tuning-space` to include them")
    if dominated:
        notes.append(f"{len(dominated)} cheaper-steps candidates dropped as dominated: an extra lever that does "
                     f"not cut the predicted latency by {options.min_gain:.0%}")
    if unmeasured:
        notes.append(f"{len(unmeasured)} candidates not measured: predicted above {limit:.1f} ms "
                     f"(budget x {1 + options.slack:g})")
    if cache.torn:
        notes.append(f"{cache.torn} unreadable line(s) in {cache_path} skipped (a run killed mid-write)")
    if accuracy["frontier_worst"] > PREDICTION_TOLERANCE:
        notes.append(f"the device profile mispredicts a frontier point by {accuracy['frontier_worst']:.0%} (more "
                     f"than {PREDICTION_TOLERANCE:.0%}): re-run `postdiff profile` on this device under the load it "
                     "will generate under")
    if ray is not None and fidelity_computed:
        notes.append("fidelity was scored on Ray workers (calib_ms is their time, not this device's); measured_ms "
                     "was measured here afterwards, one candidate at a time")
    elif workers > 1 and fidelity_computed:
        notes.append("calib_ms was measured while workers shared the cores (contended); measured_ms was "
                     "measured afterwards, one candidate at a time")

    frontier = {
        "budget_ms": budget, "metric": metric, "metric_label": METRICS[metric],
        "bundle": {"source": manifest.model.source, "manifest_sha256": manifest_digest(manifest)},
        "device": {"profile": str(options.device), "cpu": profile.machine.cpu, "gpu": profile.machine.gpu,
                   "provider": profile.machine.provider},
        "run": {"provider": run[0], "precision": run[1]}, "precision_space": options.precision_space,
        "scheduler": options.scheduler, "calib": options.calib, "timing_runs": options.timing_runs,
        "baseline": baseline.name, "baseline_predicted_ms": baseline_ms, "chosen": chosen["name"],
        "prediction_accuracy": accuracy, "points": points,
        "skipped": {"missing_graphs": missing, "dominated": dominated, "not_measured": unmeasured},
    }
    schedule = replace(built[chosen["name"]], description=(
        f"chosen by postdiff tune for {manifest.model.source} on {profile.machine.cpu or 'the profiled device'} "
        f"({profile.machine.provider}) within {budget:.1f} ms: {chosen['name']}, predicted "
        f"{chosen['predicted_ms']:.1f} ms, {metric} {_fmt(chosen[metric], '.3g')} on {options.calib} "
        f"calibration samples ({options.scheduler})"))
    write_json_atomic(out, schedule)
    frontier_path, plot_path = out.parent / FRONTIER_JSON, out.parent / FRONTIER_PNG
    write_json_atomic(frontier_path, frontier)
    plot_frontier(frontier, plot_path)
    return TuneReport(frontier=frontier, chosen=chosen["name"], schedule_path=out, frontier_path=frontier_path,
                      plot_path=plot_path, cache_path=cache_path, missing=missing,
                      fidelity_computed=fidelity_computed, latency_computed=latency_computed,
                      fidelity_s=fidelity_s, latency_s=latency_s, notes=notes)


def decisive_metric(manifest: Manifest) -> str:
    """The fidelity metric candidates are ranked by: digit-FID for the digit model, PSNR otherwise."""
    return "digit_fid" if is_digit_model(manifest) else "psnr_db"


def prediction_accuracy(points: list[dict]) -> dict[str, float]:
    """Largest and mean |predicted / measured - 1| over the frontier points and over all measured points."""
    def summary(errors: list[float]) -> tuple[float, float]:
        magnitudes = [abs(e) for e in errors]
        return (max(magnitudes), sum(magnitudes) / len(magnitudes)) if magnitudes else (0.0, 0.0)

    frontier_worst, frontier_mean = summary([p["prediction_error"] for p in points if p["on_frontier"]])
    all_worst, all_mean = summary([p["prediction_error"] for p in points])
    return {"frontier_worst": frontier_worst, "frontier_mean_abs": frontier_mean, "all_worst": all_worst,
            "all_mean_abs": all_mean}


# --- Output ------------------------------------------------------------------------------------

def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_summary(report: TuneReport) -> str:
    """The tune table (one row per measured candidate, fastest first) and what was written."""
    f = report.frontier
    lines = [f"{f['bundle']['source']} on {f['device']['cpu'] or f['device']['profile']}: budget "
             f"{f['budget_ms']:.1f} ms (baseline {f['baseline']} predicted {f['baseline_predicted_ms']:.1f} ms), "
             f"{f['calib']} calibration samples, {f['scheduler']}; fidelity = {f['metric_label']}",
             f"{'candidate':<36} {'family':<13} {'pred ms':>8} {'meas ms':>8} {'error':>6} {'digit-FID':>9} {'adher.':>6} "
             f"{'PSNR dB':>7} {'SSIM':>6}  mark"]
    for p in f["points"]:
        mark = ("chosen " if p["chosen"] else "") + ("frontier" if p["on_frontier"] else "")
        mark += " (baseline)" if p["baseline"] else ""
        lines.append(f"{p['name']:<36} {p['family']:<13} {p['predicted_ms']:>8.1f} {p['measured_ms']:>8.1f} {p['prediction_error']:>+6.0%} "
                     f"{_fmt(p['digit_fid'], '.2f'):>9} {_fmt(p['adherence'], '.0%'):>6} "
                     f"{_fmt(p['psnr_db'], '.1f'):>7} {_fmt(p['ssim'], '.3f'):>6}  {mark.strip()}")
    a = f["prediction_accuracy"]
    lines.append(f"predicted vs measured latency: frontier worst {a['frontier_worst']:.1%}, mean "
                 f"{a['frontier_mean_abs']:.1%}; all {len(f['points'])} measured: worst {a['all_worst']:.1%}, mean "
                 f"{a['all_mean_abs']:.1%}")
    lines += report.notes
    lines.append(f"computed {report.fidelity_computed} fidelity and {report.latency_computed} latency results "
                 f"(the rest from {report.cache_path}) in {report.fidelity_s:.1f} s and {report.latency_s:.1f} s")
    lines.append(f"chose {report.chosen}; wrote {report.schedule_path}, {report.frontier_path} and "
                 f"{report.plot_path}")
    return "\n".join(lines)


def plot_frontier(frontier: dict, path: Path) -> None:
    """Fidelity vs predicted latency: the fewer-steps curve, the cheaper-steps points and their
    frontier, the baseline, the chosen point and the budget line (matplotlib, Agg backend)."""
    try:
        import matplotlib
    except ImportError:
        raise InputError("the frontier plot needs matplotlib, which is not installed; "
                         "pip install 'postdiff[tools]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = frontier["metric"]
    points = [p for p in frontier["points"] if p[metric] is not None]
    baseline = next(p for p in frontier["points"] if p["baseline"])

    def xy(ps: Sequence[dict]) -> tuple[list[float], list[float]]:
        ps = sorted(ps, key=lambda p: p["predicted_ms"])
        return [p["predicted_ms"] for p in ps], [p[metric] for p in ps]

    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    fewer = [p for p in points if p["family"] == FEWER]
    ax.plot(*xy(fewer), "o-", color="tab:blue", lw=2, ms=6, label="fewer steps (plain, T steps)", zorder=3)
    for p in fewer:
        ax.annotate(f"T={p['steps']}", (p["predicted_ms"], p[metric]), textcoords="offset points", xytext=(4, 5),
                    fontsize=8, color="tab:blue")
    cheaper = [p for p in points if p["family"] == CHEAPER]
    if cheaper:
        ax.scatter(*xy(cheaper), color="tab:orange", alpha=0.45, s=22, label="cheaper steps (all measured)",
                   zorder=2)
        # The cheaper-steps curve: that family's own Pareto frontier, anchored at the baseline.
        anchor = [baseline] if baseline[metric] is not None else []
        best = pareto_names(cheaper + anchor, metric)
        ax.plot(*xy([p for p in cheaper + anchor if p["name"] in best]), "s-", color="tab:orange", lw=2, ms=6,
                label="cheaper steps: frontier", zorder=3)
    if baseline[metric] is not None:
        ax.scatter([baseline["predicted_ms"]], [baseline[metric]], marker="*", s=260, color="black", zorder=5,
                   label=f"baseline ({baseline['name']})")
    else:
        ax.axvline(baseline["predicted_ms"], color="black", ls=":", lw=1.2,
                   label=f"baseline ({baseline['name']}, the reference: PSNR = inf)")
    chosen = next(p for p in frontier["points"] if p["chosen"])
    if chosen[metric] is not None:
        ax.scatter([chosen["predicted_ms"]], [chosen[metric]], s=320, facecolors="none", edgecolors="red",
                   linewidths=2.2, zorder=6, label=f"chosen: {chosen['name']}")
    ax.axvline(frontier["budget_ms"], color="red", ls="--", lw=1.2, label=f"budget {frontier['budget_ms']:.1f} ms")
    values = [p[metric] for p in points]
    if metric == "digit_fid" and values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xlabel(f"predicted latency per image, ms ({frontier['device']['provider']}: "
                  f"{frontier['device']['cpu'] or frontier['device']['profile']})")
    ax.set_ylabel(frontier["metric_label"])
    ax.set_title(f"{frontier['bundle']['source']}: fewer steps or cheaper steps? "
                 f"({frontier['calib']} calibration samples, {frontier['scheduler']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
