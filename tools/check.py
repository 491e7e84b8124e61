"""`postdiff check BUNDLE --provider tensorrt|cuda`: a GPU provider against ONNX Runtime CPU.

Every graph the provider runs (each UNet variant, through the merged engine where that is how the
provider runs it) is fed the same seeded inputs on both sides: max abs and max relative difference
per graph, with the tolerance of the graph's precision (fp32 1e-3, fp16 3e-2 relative to
max(1, |reference|): GPU kernels, TF32 and fp16 accumulation differ from CPU more than torch and ORT
CPU do); then the bundle's schedules end to end (final latents); per-graph latency (median of 5
after a warm-up) and the peak device memory seen. Torch-free. Without a GPU it stops at once.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from postdiff.errors import InputError, ParityError
from postdiff.runtime.pipeline import GenerateOptions, Pipeline
from postdiff.runtime.runners.base import Runner
from postdiff.profiles.presets import resolve_schedule

TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}
PROVIDERS = ("tensorrt", "cuda")


@dataclass(frozen=True)
class GraphCheck:
    """One graph on the provider against CPU."""

    graph: str
    max_abs: float
    max_rel: float
    tolerance: float
    ms: float

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tolerance


@dataclass(frozen=True)
class CheckReport:
    """What `postdiff check` measured."""

    provider: str
    graphs: tuple[GraphCheck, ...]
    schedules: dict[str, float]  # schedule -> max abs difference of the final latents
    peak_device_mb: float | None


def require_gpu(provider: str) -> None:
    """Stop with one clear line (NoGpu, exit 2) when this machine has no CUDA GPU."""
    from postdiff.runtime.engines import gpu_compute_capability

    if provider not in PROVIDERS:
        raise InputError(f"--provider '{provider}' is not one of {list(PROVIDERS)}")
    gpu_compute_capability()


def _feed(runner: Runner, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feed = {}
    for tensor in runner.spec.inputs:
        if np.dtype(tensor.dtype).kind in "iu":
            feed[tensor.name] = rng.integers(0, 10, tensor.shape).astype(tensor.dtype)
        elif tensor.name == "timestep":
            feed[tensor.name] = np.full(tensor.shape, 500, tensor.dtype)
        else:
            feed[tensor.name] = rng.standard_normal(tensor.shape).astype(tensor.dtype)
    return feed


def _device_used_mb() -> float | None:
    try:
        from cuda import cudart

        err, free, total = cudart.cudaMemGetInfo()
        return (total - free) / 2**20 if int(err) == 0 else None
    except Exception:  # no cuda-python: the figure is left out, the check goes on
        return None


def check_bundle(bundle: Path, provider: str, progress: bool = True) -> CheckReport:
    """Run the comparison (module docstring).

    Raises:
        NoGpu, BackendMissing, BundleError: before any work, with the fix in the message.
        ParityError: after the report is complete, if any graph or schedule is out of tolerance.
    """
    require_gpu(provider)
    gpu, cpu = Pipeline(bundle, provider=provider), Pipeline(bundle, provider="cpu", verify=False, unet="variants")
    schedules = list(gpu.manifest.schedules) or ["baseline"]
    rng = np.random.default_rng(0)
    peak = _device_used_mb()
    rows = []
    for schedule in schedules:
        mine, reference = gpu.executor(resolve_schedule(schedule)), cpu.executor(resolve_schedule(schedule))
        for variant in mine.variants:  # the graphs as each side runs them (the GPU: the merged engine)
            ours, theirs = mine.runner_for(variant), reference.runner_for(variant)
            name = theirs.spec.file[:-len(".onnx")]
            if any(r.graph == name for r in rows):
                continue
            rows.append(_compare(name, ours, theirs, _feed(theirs, rng), gpu.manifest.graph(name).precision))
            peak = max(filter(None, [peak, _device_used_mb()]), default=None)
    for name in ("text_encoder", "vae_decoder"):
        if name in gpu.manifest.graphs:
            rows.append(_compare(name, gpu.runner(name), cpu.runner(name), _feed(cpu.runner(name), rng),
                                 gpu.manifest.graph(name).precision))
    ends = {}
    for schedule in schedules:
        plan = resolve_schedule(schedule)
        options = GenerateOptions(prompt="a photo of a cat" if gpu.manifest.tokenizer.kind == "bpe" else
                                  gpu.manifest.tokenizer.labels[0], steps=len(plan.steps))
        a = gpu.generate(options, schedule=plan).latents
        b = cpu.generate(options, schedule=plan).latents
        ends[schedule] = float(np.max(np.abs(a - b)))
    report = CheckReport(provider=provider, graphs=tuple(rows), schedules=ends, peak_device_mb=peak)
    bad = [r.graph for r in rows if not r.ok]
    if bad:
        print(format_report(report))
        raise ParityError(f"{len(bad)} graph(s) differ from ONNX Runtime CPU past tolerance on {provider}: {bad}")
    return report


def _compare(name: str, ours: Runner, theirs: Runner, feed: dict[str, np.ndarray], precision: str) -> GraphCheck:
    expected = theirs.infer(feed)
    got = {k: np.asarray(v) for k, v in ours.infer(feed).items()}
    times = []
    for _ in range(6):
        started = time.perf_counter()
        ours.infer(feed)
        times.append(time.perf_counter() - started)
    worst_abs = worst_rel = 0.0
    for key, reference in expected.items():
        diff = float(np.max(np.abs(got[key].astype(np.float32) - reference.astype(np.float32))))
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / max(1.0, float(np.max(np.abs(reference)))))
    return GraphCheck(name, worst_abs, worst_rel, TOLERANCE[precision], 1e3 * statistics.median(times[1:]))


def format_report(report: CheckReport) -> str:
    lines = [f"{'graph':40} {'max abs':>10} {'max rel':>10} {'tol':>7} {'ms':>9}"]
    lines += [f"{r.graph:40} {r.max_abs:10.2e} {r.max_rel:10.2e} {r.tolerance:7.0e} {r.ms:9.2f}"
              + ("" if r.ok else "  FAIL") for r in report.graphs]
    lines += [f"schedule {name}: final latents max abs diff {d:.2e}" for name, d in report.schedules.items()]
    lines.append(f"total {sum(r.ms for r in report.graphs):.1f} ms over {len(report.graphs)} graphs; peak device "
                 f"memory {'n/a' if report.peak_device_mb is None else f'{report.peak_device_mb:.0f} MB'}")
    return "\n".join(lines)
