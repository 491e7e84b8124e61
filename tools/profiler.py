"""`postdiff profile`: measure what every graph and runtime operation of a bundle costs on this device.

Run on the device itself. Every graph of the bundle is timed at its (static) manifest shapes through
the same :class:`~postdiff.runtime.pipeline.Pipeline` runners generation uses (so with the same
shared-weight sessions and the same feed checks), after ``warmup`` untimed calls. The numpy work the
executor does between graph calls is timed too: one scheduler step (model-input scaling, guidance
combine, step) per scheduler and latent size, and the resolution switch (x̂0, bilinear upsample,
fresh noise, re-noise) for every increasing pair of latent sizes. :func:`predict_ms` adds these up
along a schedule to predict the latency of one generation without running it.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from postdiff.profiles.device import (FORMAT_VERSION, BundleRef, DeviceProfile, Machine, PrecisionTimings, Timing,
                                      size_key, switch_key)
from postdiff.errors import InputError
from postdiff.runtime.executor import concrete, required_graphs, switch_noise
from postdiff.runtime.manifest import Manifest, TensorSpec, dump_manifest
from postdiff.runtime.memory import Phase, check_budget, estimate
from postdiff.runtime.names import TEXT_ENCODERS, TIMESTEP, VAE_DECODER
from postdiff.runtime.pipeline import Pipeline
from postdiff.runtime.runners.openvino import openvino_module
from postdiff.runtime.runners.providers import AUTO_PRECISION, get_provider
from postdiff.runtime.resize import resize_bilinear
from postdiff.runtime.schedule import Schedule, plan_steps
from postdiff.runtime.schedulers import available_schedulers, make_scheduler

#: Timestep fed to UNet graphs while timing them (any valid value: graph cost does not depend on it).
PROFILE_TIMESTEP = 500
#: Guidance scale used when timing the guidance combine (its value does not change the cost).
_GUIDANCE = np.float32(7.5)
#: The scheduler the resolution switch and the step after a graph call are timed with (their numpy
#: work costs about the same in all three).
SWITCH_SCHEDULER = "ddim"


def manifest_digest(manifest: Manifest) -> str:
    """sha256 of the manifest's canonical text: the bytes of ``manifest.json`` as the exporter writes
    them. A device profile records it so that it is never applied to another bundle."""
    return hashlib.sha256(dump_manifest(manifest).encode("utf-8")).hexdigest()


def summarize(samples_s: list[float]) -> Timing:
    """Median, 10th/90th percentile and minimum of timed calls (seconds in, milliseconds out)."""
    if not samples_s:
        raise InputError("no timed calls to summarize; expected --repeats of at least 1")
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    p10, median, p90 = np.percentile(ms, [10, 50, 90])
    return Timing(median_ms=round(float(median), 4), p10_ms=round(float(p10), 4), p90_ms=round(float(p90), 4),
                  min_ms=round(float(ms.min()), 4), repeats=len(samples_s))


def time_calls(call: Callable[[int], object], repeats: int, warmup: int) -> Timing:
    """Call ``call(i)`` ``warmup`` times untimed, then ``repeats`` times timed (``i`` counts all calls)."""
    for i in range(warmup):
        call(i)
    samples = []
    for i in range(warmup, warmup + repeats):
        started = time.perf_counter()
        call(i)
        samples.append(time.perf_counter() - started)
    return summarize(samples)


def random_feed(inputs: tuple[TensorSpec, ...], rng: np.random.Generator, timestep: int) -> dict[str, np.ndarray]:
    """A feed matching the manifest inputs: standard-normal floats, ``timestep`` for the timestep
    input, zeros for integer inputs (token ids 0 are valid for every tokenizer)."""
    feed = {}
    for spec in inputs:
        dtype = np.dtype(spec.dtype)
        if spec.name == TIMESTEP:
            feed[spec.name] = np.full(spec.shape, timestep, dtype=dtype)
        elif np.issubdtype(dtype, np.floating):
            feed[spec.name] = rng.standard_normal(spec.shape, dtype=np.float32).astype(dtype)
        else:
            feed[spec.name] = np.zeros(spec.shape, dtype=dtype)
    return feed


def unet_latent_sizes(manifest: Manifest) -> list[tuple[int, int]]:
    """Every latent size (h, w) some UNet graph of the bundle runs at, smallest first."""
    sizes = {tuple(spec.variant.latent) for spec in manifest.graphs.values() if spec.variant is not None}
    return sorted(sizes, key=lambda s: (s[0] * s[1], s))  # type: ignore[return-value]


def switch_pairs(sizes: list[tuple[int, int]]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Every (low, high) pair of latent sizes a resolution switch could go between (both sides grow)."""
    return [(low, high) for i, low in enumerate(sizes) for high in sizes[i + 1:]
            if low[0] <= high[0] and low[1] <= high[1]]


def _time_interleaved(pipeline: Pipeline, names: list[str], feeds: dict[str, dict[str, np.ndarray]], repeats: int,
                      warmup: int, after: dict[str, Callable[[int], None]], singles: Sequence[str] = ()
                      ) -> tuple[dict[str, Timing], dict[str, list[float]]]:
    """Time every graph in round-robin order: ``warmup`` untimed rounds, then ``repeats`` timed ones.
    Each call follows another graph's call, as when a schedule alternates graphs (with one graph,
    this is the back-to-back timing again). Right after each call of a graph named in ``after``, its
    operation is timed too; those samples come back by graph name. Graphs in ``singles`` are
    released after each call (opened again, untimed, on their next turn)."""
    samples: dict[str, list[float]] = {name: [] for name in names}
    after_samples: dict[str, list[float]] = {name: [] for name in after}
    call = 0
    for round_index in range(warmup + repeats):
        for name in names:
            runner = pipeline.runner(name)
            started = time.perf_counter()
            runner.infer(feeds[name])
            elapsed = time.perf_counter() - started
            if name in after:
                started = time.perf_counter()
                after[name](call)
                call += 1
                if round_index >= warmup:
                    after_samples[name].append(time.perf_counter() - started)
            if round_index >= warmup:
                samples[name].append(elapsed)
            if name in singles:
                pipeline.release(name)
    return {name: summarize(values) for name, values in samples.items()}, after_samples


def _max_or_none(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def _scheduler_step(name: str, manifest: Manifest, size: tuple[int, int], calls: int,
                    rng: np.random.Generator) -> Callable[[int], None]:
    """One executor step at latent ``size`` as a call ``step(i)``: duplicate the latent for guidance,
    scale the model input, combine the guided prediction, step (batch 2 in, one latent out, as with
    guidance on); ``i`` walks the timesteps of a ``calls``-step schedule."""
    scheduler = make_scheduler(name, manifest.scheduler)
    scheduler.set_timesteps(min(max(calls, 1), scheduler.max_inference_steps))
    timesteps = scheduler.timesteps
    shape = (1, manifest.model.latent_channels, *size)
    x = rng.standard_normal(shape, dtype=np.float32)
    prediction = rng.standard_normal((2, *shape[1:]), dtype=np.float32)

    def step(i: int) -> None:
        if i % len(timesteps) == 0:
            scheduler.reset()
        t = timesteps[i % len(timesteps)]
        scheduler.scale_model_input(np.concatenate([x, x]), t)
        uncond, cond = prediction[:1], prediction[1:]
        scheduler.step(uncond + _GUIDANCE * (cond - uncond), t, x)

    return step


def _time_switch(manifest: Manifest, low: tuple[int, int], high: tuple[int, int], repeats: int, warmup: int,
                 rng: np.random.Generator) -> Timing:
    """The executor's resolution switch without its model call: x̂0, upsample, fresh noise, re-noise."""
    scheduler = make_scheduler(SWITCH_SCHEDULER, manifest.scheduler)
    scheduler.set_timesteps(2)
    t = scheduler.timesteps[-1]
    shape = (1, manifest.model.latent_channels, *low)
    x = rng.standard_normal(shape, dtype=np.float32)
    noise = rng.standard_normal(shape, dtype=np.float32)

    def switch(i: int) -> None:
        x0 = scheduler.predict_x0(noise, t, x)
        up = resize_bilinear(x0, *high)
        scheduler.reset()
        scheduler.add_noise(up, switch_noise(0, i, up.shape), t)

    return time_calls(switch, repeats, warmup)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else platform.processor(), else the machine)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def gpu_name(providers: list[str]) -> str:
    """The GPU's name: nvidia-smi, else a Jetson's device-tree model; "" when none is found."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20)
            names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
            if out.returncode == 0 and names:
                return ", ".join(names)
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        model = Path("/proc/device-tree/model").read_text(errors="replace").strip("\x00\n ")
        if re.search(r"nvidia|jetson", model, re.IGNORECASE):
            return model
    except OSError:
        pass
    gpu_providers = [p for p in providers if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]
    return f"unidentified GPU ({', '.join(gpu_providers)} available)" if gpu_providers else ""


def gpu_memory_mb() -> float | None:
    """GPU memory this process holds now (nvidia-smi), or None where that cannot be measured."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.stdout.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(os.getpid()) and fields[1].replace(".", "", 1).isdigit():
            return float(fields[1])
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux: ``VmHWM`` of /proc/self/status -- unlike ``ru_maxrss``, it does not carry over the
    parent's size into a child started by fork + exec. Elsewhere: ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def machine_info(provider: str, precision: str = "fp32") -> Machine:
    """The machine and library versions a profile is measured with (``precision``: what the UNet
    graphs ran at)."""
    import onnxruntime as ort

    from postdiff import __version__

    openvino = ""
    if get_provider(provider).backend == "openvino":
        openvino = openvino_module().get_version()
    return Machine(cpu=cpu_model(), cores=os.cpu_count() or 1, gpu=gpu_name(ort.get_available_providers()),
                   os=platform.platform(), python=platform.python_version(), numpy=np.__version__,
                   onnxruntime=ort.__version__, postdiff=__version__, provider=provider, precision=precision,
                   openvino=openvino)


def profile_bundle(bundle: Path, provider: str = "cpu", repeats: int = 10, warmup: int = 2, progress: bool = True,
                   shared_weights: bool | None = None, precision: str = AUTO_PRECISION,
                   memory_budget_mb: float | None = None) -> DeviceProfile:
    """Measure every graph of ``bundle`` and the runtime's numpy operations on this machine.

    Args:
        bundle: a bundle folder written by ``postdiff export`` (its files are sha256-checked).
        provider: provider to time (a name from :mod:`postdiff.runtime.runners.providers`).
        repeats: timed calls per graph or operation (median and spread come from these).
        warmup: untimed calls before them (session initialisation, allocator growth, kernel tuning).
        progress: show a progress bar.
        shared_weights: as in :class:`~postdiff.runtime.pipeline.Pipeline` (default: shared when the
            bundle has several UNet graphs, as generation does).
        precision: inference precision, as in :class:`~postdiff.runtime.pipeline.Pipeline`.
        memory_budget_mb: as generation under a budget: the UNet graphs are open together (as in a
            denoising phase), the text encoder and the decoder only for their own calls; InputError
            before any timing if that cannot fit (:mod:`postdiff.runtime.memory`).

    Raises:
        InputError: ``repeats`` below 1, negative ``warmup``, or a provider this machine lacks.
        BundleError: a missing, corrupted or unreadable bundle.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise InputError(f"--repeats {repeats} is below 1; time each graph at least once (default 10)")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise InputError(f"--warmup {warmup} is negative; use 0 or more untimed calls (default 2)")
    pipeline = Pipeline(Path(bundle), provider=provider, shared_weights=shared_weights, precision=precision,
                        memory_budget_mb=memory_budget_mb)
    manifest = pipeline.manifest
    unets = tuple(sorted(name for name, spec in manifest.graphs.items() if spec.variant is not None))
    singles = [name for name in sorted(manifest.graphs) if name not in unets]  # opened per call under a budget
    if memory_budget_mb is None:
        pipeline.load_all()  # every session open while timing, as when a schedule uses them all
        singles = []
    else:
        phases = [Phase("UNet graphs", unets)] + [Phase(name, (name,)) for name in singles]
        check_budget(estimate(manifest, Path(bundle), phases, pipeline.weights_mode == "shared"), memory_budget_mb)
    ran = {pipeline.runner(name).precision for name in unets}
    machine = machine_info(provider, ",".join(sorted(ran)))
    rng = np.random.default_rng(0)
    num_train = int(manifest.scheduler.get("num_train_timesteps", 1000))
    timestep = min(PROFILE_TIMESTEP, num_train - 1)
    sizes = unet_latent_sizes(manifest)
    pairs = switch_pairs(sizes)
    names = sorted(n for n, spec in manifest.graphs.items() if spec.merged is None)  # static shapes only
    samplers = available_schedulers(manifest.scheduler)  # those this bundle's config can configure
    bar = tqdm(total=len(names) + 1 + len(samplers) * len(sizes) + len(pairs), desc="profile", unit="op",
               disable=not progress)
    on_gpu = get_provider(provider).gpu
    peak_gpu = gpu_memory_mb() if on_gpu else None
    feeds = {name: random_feed(manifest.graph(name).inputs, rng, timestep) for name in names}
    graphs: dict[str, Timing] = {}
    for name in names:
        bar.set_postfix_str(name)
        runner = pipeline.runner(name)
        graphs[name] = time_calls(lambda _i: runner.infer(feeds[name]), repeats, warmup)
        if name in singles:
            pipeline.release(name)
        peak_gpu = _max_or_none(peak_gpu, gpu_memory_mb() if on_gpu else None)
        bar.update()
    bar.set_postfix_str("all graphs, round-robin")
    unet_size = {name: tuple(spec.variant.latent) for name, spec in manifest.graphs.items() if spec.variant}
    cold_steps = {size: _scheduler_step(SWITCH_SCHEDULER, manifest, size, len(names) * (warmup + repeats), rng)
                  for size in sizes}
    interleaved, after = _time_interleaved(pipeline, names, feeds, repeats, warmup,
                                           {name: cold_steps[size] for name, size in unet_size.items()}, singles)
    step_after_graph = {size_key(size): summarize([s for name, values in after.items() if unet_size[name] == size
                                                   for s in values]) for size in sizes}
    bar.update()
    scheduler_step: dict[str, dict[str, Timing]] = {}
    for scheduler in samplers:
        for size in sizes:
            bar.set_postfix_str(f"{scheduler} step {size_key(size)}")
            step = _scheduler_step(scheduler, manifest, size, warmup + repeats, rng)
            scheduler_step.setdefault(scheduler, {})[size_key(size)] = time_calls(step, repeats, warmup)
            bar.update()
    switch: dict[str, Timing] = {}
    for low, high in pairs:
        bar.set_postfix_str(f"switch {switch_key(low, high)}")
        switch[switch_key(low, high)] = _time_switch(manifest, low, high, repeats, warmup, rng)
        bar.update()
    bar.close()
    main_precision = machine.precision
    threads, weights_mode = pipeline._threads, pipeline.weights_mode
    del pipeline, runner  # the main precision's compiled models go before the next precision's are compiled
    precisions = {other: _time_precision(Path(bundle), provider, other, weights_mode == "shared", threads, unets, feeds, repeats, warmup)
                  for other in further_precisions(provider, main_precision, memory_budget_mb)}
    return DeviceProfile(
        format_version=FORMAT_VERSION,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=machine,
        bundle=BundleRef(source=manifest.model.source, manifest_sha256=manifest_digest(manifest),
                         schedules=tuple(manifest.schedules)),
        weights=weights_mode,
        warmup=warmup,
        graphs=graphs,
        interleaved=interleaved,
        scheduler_step=scheduler_step,
        switch=switch,
        step_after_graph=step_after_graph,
        peak_rss_mb=round(peak_rss_mb(), 1),
        peak_gpu_mb=None if peak_gpu is None else round(peak_gpu, 1),
        precisions=precisions,
    )


def further_precisions(provider: str, main: str, memory_budget_mb: float | None = None) -> list[str]:
    """The precisions besides ``main`` that ``postdiff profile`` also times the UNet graphs at: every
    float precision OpenVINO runs natively on this CPU (none under a memory budget, nor for the other
    backends, which run the graphs at their exported precision)."""
    if get_provider(provider).backend != "openvino" or memory_budget_mb is not None:
        return []
    from postdiff.runtime.runners.openvino import cpu_precisions

    return [name for name in cpu_precisions() if name != main]


def _time_precision(bundle: Path, provider: str, precision: str, shared: bool, threads: int | None,
                    unets: Sequence[str], feeds: dict[str, dict[str, np.ndarray]], repeats: int,
                    warmup: int) -> PrecisionTimings:
    """The UNet graphs at ``precision``: back to back, then round-robin among themselves."""
    pipeline = Pipeline(bundle, provider=provider, shared_weights=shared, precision=precision, threads=threads,
                        verify=False)  # the main pass checked the files
    graphs = {}
    for name in unets:
        runner = pipeline.runner(name)
        graphs[name] = time_calls(lambda _i: runner.infer(feeds[name]), repeats, warmup)
    interleaved, _ = _time_interleaved(pipeline, list(unets), feeds, repeats, warmup, {})
    return PrecisionTimings(graphs=graphs, interleaved=interleaved)


def graph_calls(manifest: Manifest, schedule: Schedule) -> list[str]:
    """The graphs one ``Pipeline.generate`` of ``schedule`` calls, in order: the text encoder(s) twice
    (SDXL with an empty negative prompt that is zeros: once each),
    every UNet evaluation (a switch's x̂0 evaluation before its step's own), the VAE decoder.

    Raises:
        ScheduleError: the schedule needs graphs the bundle was not exported with.
    """
    return [name for name, _ in _calls(manifest, schedule)]


def _calls(manifest: Manifest, schedule: Schedule) -> list[tuple[str, str | None]]:
    """:func:`graph_calls` with each UNet call's step precision (``Variant.precision``; None for the
    other graphs)."""
    required_graphs(manifest, schedule)  # ScheduleError naming what the bundle lacks
    # Each text encoder (SDXL has two) twice: prompt and negative prompt; once for an SDXL model whose
    # empty negative prompt (the default) is zeros (force_zeros_for_empty_prompt).
    encodes = 1 if manifest.sdxl is not None and manifest.sdxl.force_zeros_for_empty_prompt else 2
    calls: list[tuple[str, str | None]] = [(name, None) for name in TEXT_ENCODERS if name in manifest.graphs
                                           for _ in range(encodes)]
    for plan in plan_steps(schedule):
        for variant in filter(None, (plan.switch_from, plan.variant)):
            calls.append((manifest.unet_graph(concrete(manifest, variant)), variant.precision))
    if VAE_DECODER in manifest.graphs:
        calls.append((VAE_DECODER, None))
    return calls


def call_ms(profile: DeviceProfile, name: str, precision: str | None, previous: str | None,
            run_precision: str | None = None) -> float:
    """Median ms of one call of graph ``name`` at a step's ``precision`` (``auto``/None: the run's
    ``run_precision``, itself None or ``auto`` for the profile's main precision): back to back when it
    repeats ``previous``, else round-robin.

    Raises:
        InputError: the profile has no timing of that graph at that precision.
    """
    wanted = precision if precision not in (None, AUTO_PRECISION) else run_precision
    wanted = None if wanted == AUTO_PRECISION else wanted
    tables = profile.tables(wanted)
    if tables is None:
        raise InputError(f"the device profile has no timings at precision {wanted} (its main timings ran at "
                         f"{profile.machine.precision}, further ones at {sorted(profile.precisions) or 'none'}); "
                         f"re-run `postdiff profile` with --provider openvino on a CPU that runs {wanted}")
    table, what = (tables[0], "graph") if name == previous else (tables[1], "interleaved graph")
    if name not in table:
        raise InputError(f"the device profile has no {what} timing for '{name}' at precision "
                         f"{wanted or profile.machine.precision} (it has {sorted(table)}); "
                         "re-run `postdiff profile` on this bundle")
    return table[name].median_ms


def predict_ms(profile: DeviceProfile, manifest: Manifest, schedule: Schedule, scheduler: str = "ddim",
               precision: str | None = None) -> float:
    """Predicted latency (median milliseconds) of one ``Pipeline.generate`` of ``schedule``.

    The sum over :func:`graph_calls` of each call's median: the back-to-back timing (``graphs``)
    when the call repeats the previous call's graph, the round-robin one (``interleaved``) when it
    follows another graph (the first call follows the previous generation's decoder). The text
    encoder counts twice: the runtime encodes the prompt and the negative prompt whenever guidance
    is on. Plus one scheduler step per step at that step's latent size, with the extra cost of a
    step taken right after a graph call (``step_after_graph`` minus the tight-loop DDIM step, when
    the profile has it), and the numpy part of each resolution switch. Tokenizing, the initial noise
    and image conversion are not counted. A UNet call of a step that pins its precision is looked up
    at that precision (``profile.precisions``); the others at ``precision``, the run's --precision
    (None or ``auto``: the profile's main one).

    Raises:
        InputError: the profile was measured on another bundle, or lacks a graph, scheduler or
            size the schedule needs (re-run ``postdiff profile`` on this bundle).
        ScheduleError: the schedule needs graphs the bundle was not exported with.
    """
    digest = manifest_digest(manifest)
    if profile.bundle.manifest_sha256 != digest:
        raise InputError(
            f"the device profile was measured on another bundle (manifest sha256 "
            f"{profile.bundle.manifest_sha256[:12]}…, source {profile.bundle.source!r}) than this one "
            f"({digest[:12]}…, source {manifest.model.source!r}); run `postdiff profile BUNDLE --out DEVICE.json` "
            "on this bundle"
        )
    if scheduler not in profile.scheduler_step:
        raise InputError(f"the device profile has no scheduler_step timings for scheduler '{scheduler}' (it has "
                         f"{sorted(profile.scheduler_step)}); re-run `postdiff profile` with this postdiff")

    def lookup(table: dict[str, Timing], key: str, what: str) -> float:
        if key not in table:
            raise InputError(f"the device profile has no {what} timing for '{key}' (it has {sorted(table)}); "
                             "re-run `postdiff profile` on this bundle")
        return table[key].median_ms

    total, previous = 0.0, None
    for name, at in _calls(manifest, schedule):
        if at is None:  # text encoders and decoder: the main tables
            table, what = (profile.graphs, "graph") if name == previous else (profile.interleaved, "interleaved graph")
            total += lookup(table, name, what)
        else:
            total += call_ms(profile, name, at, previous, precision)
        previous = name
    steps = profile.scheduler_step[scheduler]
    for plan in plan_steps(schedule):
        target = concrete(manifest, plan.variant)
        if plan.switch_from is not None:
            source = concrete(manifest, plan.switch_from)
            total += lookup(profile.switch, switch_key(source.latent, target.latent), "switch")
        size = size_key(target.latent)
        total += lookup(steps, size, f"{scheduler} scheduler_step") + cold_step_extra(profile, size)
    return total


def cold_step_extra(profile: DeviceProfile, size: str) -> float:
    """How much longer (ms) a step at latent ``size`` takes right after a graph call than in a tight
    loop: ``step_after_graph`` minus the DDIM ``scheduler_step`` (0 for profiles without it)."""
    if size not in profile.step_after_graph:
        return 0.0
    warm = profile.scheduler_step.get(SWITCH_SCHEDULER, {}).get(size)
    return max(0.0, profile.step_after_graph[size].median_ms - (warm.median_ms if warm else 0.0))


def format_profile(profile: DeviceProfile) -> str:
    """A fixed-width summary table of a profile (graphs, scheduler steps and switches)."""
    m = profile.machine
    lines = [f"machine: {m.cpu} ({m.cores} cores){', ' + m.gpu if m.gpu else ''}; provider {m.provider}, "
             f"onnxruntime {m.onnxruntime}; weights {profile.weights}; peak RSS {profile.peak_rss_mb:.0f} MB"
             + (f", GPU {profile.peak_gpu_mb:.0f} MB" if profile.peak_gpu_mb is not None else ""),
             f"{'graph / operation':<48} {'median ms':>10} {'p10-p90 ms':>20}"]

    def row(label: str, t: Timing) -> str:
        return f"{label:<48} {t.median_ms:>10.3f} {f'{t.p10_ms:.3f}-{t.p90_ms:.3f}':>20}"

    lines += [row(name, t) for name, t in sorted(profile.graphs.items())]
    lines += [row(f"{name} (interleaved)", t) for name, t in sorted(profile.interleaved.items())]
    for precision, extra in sorted(profile.precisions.items()):  # the UNets again at the other precisions
        lines += [row(f"{name} @{precision}", t) for name, t in sorted(extra.graphs.items())]
        lines += [row(f"{name} @{precision} (interleaved)", t) for name, t in sorted(extra.interleaved.items())]
    lines += [row(f"step {name} {size}", t) for name, sizes in sorted(profile.scheduler_step.items())
              for size, t in sorted(sizes.items())]
    lines += [row(f"switch {pair}", t) for pair, t in sorted(profile.switch.items())]
    lines += [row(f"step {SWITCH_SCHEDULER} {size}, right after a graph", t)
              for size, t in sorted(profile.step_after_graph.items())]
    return "\n".join(lines)
