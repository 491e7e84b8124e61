"""`postdiff bench`: latency, MAC-predicted speed-up and memory of schedules, in one run.

Each ``--run BUNDLE:SCHEDULE[:WEIGHTS]`` is measured in its own process (so resident memory is
that run's alone): open every UNet session the schedule needs and run each once, then record the
resident-set growth (weights resident, activation memory allocated); open and warm up the rest,
then time one generation (prompt encoding, denoising and decoding separately). The first run is the reference for speed-ups. Figures are
ratios from one machine in one invocation; absolute times carry the machine's name.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from postdiff.runtime.errors import InputError


@dataclass(frozen=True)
class BenchRun:
    """One bundle, the schedule to time on it, and how its UNet sessions hold the weights."""

    bundle: Path
    schedule: str
    weights: str = "auto"  # auto | shared | per-session


WEIGHT_MODES = {"auto": None, "shared": True, "per-session": False}


def parse_run(text: str) -> BenchRun:
    """``BUNDLE:SCHEDULE[:WEIGHTS]`` -> BenchRun (schedule: preset or JSON file; weights: auto,
    shared or per-session)."""
    parts = text.split(":")
    weights = parts.pop() if len(parts) >= 3 and parts[-1] in WEIGHT_MODES else "auto"
    if len(parts) < 2 or not parts[0] or not parts[-1]:
        raise InputError(f"--run '{text}' is not BUNDLE:SCHEDULE[:WEIGHTS], e.g. sd15.bundle:postdiff-sd15 or "
                         "sd15.bundle:baseline:shared")
    return BenchRun(Path(":".join(parts[:-1])), parts[-1], weights)


def rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def measure(run: BenchRun, scheduler: str, seed: int) -> dict:
    """Measure one run in this process (called in a child process by :func:`bench`)."""
    import numpy as np

    from postdiff.runtime.executor import ScheduleExecutor
    from postdiff.runtime.explain import step_costs
    from postdiff.runtime.pipeline import GenerateOptions, Pipeline
    from postdiff.runtime.schedule import resolve_schedule
    from postdiff.runtime.schedulers import make_scheduler

    schedule = resolve_schedule(run.schedule)
    before = rss_mb()
    pipeline = Pipeline(run.bundle, verify=False, shared_weights=WEIGHT_MODES[run.weights])
    executor = ScheduleExecutor(pipeline.manifest, schedule, pipeline.runner)
    for name in executor.graph_names:  # every UNet session the schedule needs, each run once, so that
        runner = pipeline.runner(name)  # weights are resident and activation arenas allocated
        runner.infer({t.name: np.zeros(t.shape, dtype=t.dtype) for t in runner.spec.inputs})
    sessions_mb = rss_mb() - before
    pipeline.load_all()
    for name in sorted(set(pipeline.manifest.graphs) - set(executor.graph_names)):  # warm the others up
        runner = pipeline.runner(name)
        runner.infer({t.name: np.zeros(t.shape, dtype=t.dtype) for t in runner.spec.inputs})
    options = GenerateOptions(prompt="a photograph of an astronaut riding a horse", seed=seed,
                              steps=len(schedule.steps), scheduler=scheduler,
                              guidance=pipeline.manifest.model.default_guidance)
    started = time.perf_counter()
    context = pipeline.encode_pair(options)
    encode_s = time.perf_counter() - started
    latents = pipeline.initial_latents(seed, executor.first_latent_shape())
    started = time.perf_counter()
    final = executor.run(make_scheduler(scheduler, pipeline.manifest.scheduler), latents, context,
                         options.guidance, seed)
    denoise_s = time.perf_counter() - started
    started = time.perf_counter()
    pipeline.decode(final)
    decode_s = time.perf_counter() - started
    macs = sum(row.macs or 0 for row in step_costs(schedule, pipeline.manifest))
    size = sum(p.stat().st_size for p in run.bundle.iterdir() if p.is_file())
    return {"bundle": str(run.bundle), "schedule": schedule.name, "steps": len(schedule.steps),
            "weights": "shared" if pipeline._pool is not None else "per-session",
            "unet_graphs": len(executor.graph_names), "denoise_s": round(denoise_s, 3),
            "end_to_end_s": round(encode_s + denoise_s + decode_s, 3), "unet_gmacs": round(macs / 1e9, 2),
            "sessions_rss_mb": round(sessions_mb, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
            "bundle_mb": round(size / 2**20, 1)}


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(runs: list[BenchRun], scheduler: str = "ddim", seed: int = 0) -> dict:
    """Measure every run in a child process; speed-ups are relative to the first run."""
    results = []
    for run in runs:
        if not (run.bundle / "manifest.json").is_file():
            raise InputError(f"--run {run.bundle}: not a bundle (no manifest.json); export one first")
        code = ("import json, sys; from pathlib import Path; from postdiff.tools.bench import BenchRun, measure; "
                f"print(json.dumps(measure(BenchRun(Path({str(run.bundle)!r}), {run.schedule!r}, {run.weights!r}), "
                f"{scheduler!r}, {seed})))")
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if child.returncode != 0:
            last = child.stderr.strip().splitlines()[-1:] or [f"killed by signal {-child.returncode} (out of memory?)"
                                                              if child.returncode < 0 else f"exit {child.returncode}"]
            raise InputError(f"benchmark of {run.bundle}:{run.schedule} failed: {last[0]}")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    reference = results[0]
    for result in results:
        measured = reference["denoise_s"] / result["denoise_s"]
        predicted = reference["unet_gmacs"] / result["unet_gmacs"]
        result.update(measured_speedup=round(measured, 3), predicted_speedup=round(predicted, 3),
                      measured_over_predicted=round(measured / predicted, 3),
                      rss_vs_reference=round(result["sessions_rss_mb"] / max(reference["sessions_rss_mb"], 1e-9), 3),
                      size_vs_reference=round(result["bundle_mb"] / reference["bundle_mb"], 3))
    return {"machine": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores), "
                       f"onnxruntime CPU", "scheduler": scheduler, "runs": results}


def format_results(report: dict) -> str:
    """The results as a fixed-width table."""
    header = (f"{'bundle:schedule:weights':<42} {'graphs':>6} {'denoise s':>10} {'total s':>8} {'GMACs':>8} "
              f"{'speed-up':>9} {'MAC pred.':>9} {'meas/pred':>9} {'RSS MB':>8} {'size MB':>8}")
    lines = [f"machine: {report['machine']}; scheduler {report['scheduler']}", header]
    for r in report["runs"]:
        label = f"{Path(r['bundle']).name}:{r['schedule']}:{r['weights']}"
        lines.append(f"{label:<42} {r['unet_graphs']:>6} {r['denoise_s']:>10.2f} {r['end_to_end_s']:>8.2f} "
                     f"{r['unet_gmacs']:>8.1f} {r['measured_speedup']:>8.2f}x {r['predicted_speedup']:>8.2f}x "
                     f"{r['measured_over_predicted']:>9.2f} {r['sessions_rss_mb']:>8.0f} {r['bundle_mb']:>8.0f}")
    return "\n".join(lines)
