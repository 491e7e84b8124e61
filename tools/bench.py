"""`postdiff bench`: diffusers vs the runtime, and the runtime's baseline vs faster schedules, in one run.

Rows, each measured in a child process of its own (so that its peak resident memory is its own):

* ``runtime:baseline`` -- the 20-step baseline schedule through :class:`~postdiff.runtime.pipeline.Pipeline`
  (``--baseline`` names another reference schedule, and the rows take its name: an LCM model, which
  runs no classifier-free guidance, is measured against ``lcm-4``);
* ``diffusers:baseline`` -- the same generation in PyTorch through diffusers
  (:func:`~postdiff.exporter.torch_reference.diffusers_generate`), from the runtime's initial latents; the
  final latents of the two are compared, so that a speed figure never hides a wrong result;
* ``runtime:SCHEDULE`` -- one row per ``--schedule`` (preset or schedule file);
* ``PROVIDER[-PRECISION]:SCHEDULE`` -- the baseline and every schedule again on each further
  ``--provider`` (e.g. ``openvino:postdiff-sd15``, ``openvino-fp32:baseline``), at each ``--precision``
  that provider runs. Every row's final latents are compared with the fp32 baseline
  (``runtime:baseline``), and each further provider's with the same schedule on ONNX Runtime, so a
  cheaper precision shows its drift beside its speed.

Every row does one untimed warm-up generation (sessions, allocators; its cold-start figures are
reported: ``load_s`` from the child's process start to its first UNet call, ``sessions_s`` the
session creation), then ``repeats`` timed ones: the median wall time of prompt encoding + denoising + decoding. Runtime rows also add up the
time spent inside graph calls; the rest of the wall time is the runtime's own overhead (numpy
scheduler steps, guidance, resolution switches, feed checks, tokenizing, image conversion).
Speed-ups are ratios of medians measured in this one invocation on this one machine. With a device
profile (``--device``), each runtime row also gets the profile's predicted latency and the
prediction error, predicted / measured - 1.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from postdiff.profiles.device import load_device_profile
from postdiff.errors import EXIT_USAGE, InputError, PostdiffError, RunFailure
from postdiff.runtime.clock import process_age_s
from postdiff.runtime.executor import required_graphs
from postdiff.runtime.schedulers import default_scheduler, make_scheduler
from postdiff.tools.explain import total_macs
from postdiff.runtime.manifest import MANIFEST_NAME, Manifest, load_manifest
from postdiff.runtime.memory import check_budget, estimate
from postdiff.runtime.pipeline import GenerateOptions, Pipeline
from postdiff.runtime.runners.base import Runner
from postdiff.profiles.presets import resolve_schedule
from postdiff.runtime.runners.providers import AUTO_PRECISION, DEFAULT_PROVIDER, get_provider
from postdiff.tools.evaluate import SD_PROMPTS
from postdiff.tools.profiler import cpu_model, peak_rss_mb, predict_ms

BASELINE = "baseline"
WEIGHT_MODES = {"auto": None, "shared": True, "per-session": False}


@dataclass(frozen=True)
class BenchOptions:
    """Validated `postdiff bench` arguments.

    ``bundle`` is used as it is when it exists; otherwise ``model`` is exported to it (or to a
    temporary folder when ``bundle`` is None) with ``baseline`` and ``schedules``.
    """

    model: str | None = None  # model source (for the export and the diffusers row)
    bundle: Path | None = None
    schedules: tuple[str, ...] = ("postdiff-sd15",)
    baseline: str = BASELINE  # the reference schedule every row is compared with (LCM models: lcm-4)
    resolution: tuple[int, int] | None = None  # export resolution (pixels); None: the model's
    scheduler: str | None = None  # a key of SCHEDULERS; None: the sampler the bundle's model ships
    seed: int = 0
    repeats: int = 3
    weights: str = "auto"  # how UNet sessions hold weights: auto | shared | per-session
    unet: str = "auto"  # UNet form: auto | variants | merged (executor.resolve_graphs)
    diffusers: bool = True  # also time diffusers (needs torch and the model)
    device: Path | None = None  # device profile: adds each row's predicted latency
    prompt: str | None = None  # default: the first calibration prompt (SD_PROMPTS), or a label model's first label
    providers: tuple[str, ...] = (DEFAULT_PROVIDER,)  # the first is the reference (its baseline is "runtime:")
    precisions: tuple[str, ...] = (AUTO_PRECISION,)  # for providers that choose one (OpenVINO)
    memory_budget_mb: float | None = None  # runtime rows under this memory budget (Pipeline.memory_budget_mb)


# --- child side: one row, in its own process ------------------------------------------------------------


class TimedRunner(Runner):
    """A runner that adds the time spent inside its graph calls to a shared clock."""

    def __init__(self, inner: Runner, clock: list[float]) -> None:
        super().__init__(inner.spec)
        self._inner = inner
        self._clock = clock

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        outputs = self._inner._infer(feed)
        self._clock[0] += time.perf_counter() - started
        return outputs


class TimedPipeline(Pipeline):
    """A pipeline whose graph calls are timed: ``graph_seconds`` is their sum since the last reset."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._clock = [0.0]
        self._timed: dict[str, TimedRunner] = {}

    def runner(self, name: str) -> Runner:
        if name not in self._timed:
            self._timed[name] = TimedRunner(super().runner(name), self._clock)
        return self._timed[name]

    def release(self, name: str) -> None:
        self._timed.pop(name, None)
        super().release(name)

    @property
    def graph_seconds(self) -> float:
        return self._clock[0]

    def reset_clock(self) -> None:
        self._clock[0] = 0.0


def rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def pss_mb() -> tuple[float, float]:
    """(anonymous, file-backed) proportional set size of this process in MiB (Linux; zeros elsewhere).

    Unlike the resident set, PSS counts a page mapped twice (OpenVINO maps the weights file once per
    graph it reads) once, and a page shared with another process by its share.
    """
    sizes = {"Pss_Anon": 0.0, "Pss_File": 0.0}
    try:
        with open("/proc/self/smaps_rollup") as handle:
            for line in handle:
                key = line.split(":")[0]
                if key in sizes:
                    sizes[key] = int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    return sizes["Pss_Anon"], sizes["Pss_File"]


def unet_weights_mb(manifest: Manifest) -> float:
    """MiB of weights one full UNet graph references: the largest UNet graph's share of the weights file."""
    tensors = manifest.weights.tensors
    return max(sum(tensors[key].length for key in set(spec.initializers.values()))
               for spec in manifest.graphs.values() if spec.variant is not None) / 2**20


def measure_runtime(bundle: str, schedule: str, scheduler: str, seed: int, repeats: int, weights: str, prompt: str,
                    save: str, provider: str = DEFAULT_PROVIDER, precision: str = AUTO_PRECISION,
                    memory_budget_mb: float | None = None, unet: str = "auto") -> dict:
    """Time ``repeats`` generations of ``schedule``; save the initial and final latents under ``save``.

    The cold start comes first: ``import_s`` is this process's age when the runtime is imported and
    ready, ``load_s`` its age at the first UNet call of the first (warm-up) generation -- interpreter
    start, imports, manifest + stamp check, the sessions opened until then; ``sessions_s`` is the
    session creation of the whole first generation, ``verify_s`` the manifest and stamp check.
    """
    import_s = process_age_s()
    plan = resolve_schedule(schedule)
    before, (anon_before, file_before) = rss_mb(), pss_mb()
    pipeline = TimedPipeline(Path(bundle), shared_weights=WEIGHT_MODES[weights], provider=provider,
                             precision=precision, memory_budget_mb=memory_budget_mb, unet=unet)
    executor = pipeline.executor(plan)
    options = GenerateOptions(prompt=prompt, seed=seed, steps=len(plan.steps), scheduler=scheduler,
                              guidance=pipeline.manifest.model.default_guidance)
    initial = pipeline.initial_latents(seed, executor.first_latent_shape())
    pipeline.generate(options, latents=initial, schedule=plan)  # warm-up, and the cold start
    cold = dict(pipeline.timings)
    sessions_mb = rss_mb() - before  # sessions, weights and activation memory after one generation
    anon, mapped = pss_mb()
    ran = ",".join(sorted({p for n, p in pipeline.precisions.items()  # "NAME@bf16": a step-pinned precision
                           if n.split("@")[0] in executor.graph_names})) or precision
    walls, graphs = [], []
    for _ in range(repeats):
        pipeline.reset_clock()
        started = time.perf_counter()
        generation = pipeline.generate(options, latents=initial, schedule=plan)
        walls.append(time.perf_counter() - started)
        graphs.append(pipeline.graph_seconds)
    np.save(Path(save) / "initial.npy", initial)
    np.save(Path(save) / "final.npy", generation.latents)
    overheads = [(w - g) / w for w, g in zip(walls, graphs)]
    return {"wall_s": float(np.median(walls)), "graph_s": float(np.median(graphs)),
            "overhead_pct": 100 * float(np.median(overheads)), "walls_s": walls,
            "import_s": import_s, "load_s": cold["load_s"], "verify_s": cold["verify_s"],
            "sessions_s": cold["sessions_s"], "weights": pipeline.weights_mode, "memory_budget_mb": memory_budget_mb,
            "provider": provider, "precision": ran,
            "unet_graphs": len(executor.graph_names), "sessions_rss_mb": sessions_mb,
            "sessions_anon_mb": anon - anon_before, "sessions_file_mb": mapped - file_before,
            "unet_weights_mb": unet_weights_mb(pipeline.manifest), "peak_rss_mb": peak_rss_mb()}


def measure_diffusers(model: str, scheduler: str, steps: int, guidance: float, prompt: str, latents: str,
                      height: int, width: int, repeats: int, save: str) -> dict:
    """Time ``repeats`` plain diffusers generations from the initial latents in ``latents``."""
    import torch

    from postdiff.exporter.models import load_model
    from postdiff.exporter.torch_reference import diffusers_generate

    loaded = load_model(model)
    initial = np.load(latents)

    def generate() -> np.ndarray:
        return diffusers_generate(loaded, scheduler, prompt, "", steps, guidance, initial, height, width)[0]

    generate()  # warm-up
    walls = []
    for _ in range(repeats):
        started = time.perf_counter()
        final = generate()
        walls.append(time.perf_counter() - started)
    np.save(Path(save) / "final.npy", final)
    return {"wall_s": float(np.median(walls)), "walls_s": walls, "torch_threads": torch.get_num_threads(),
            "peak_rss_mb": peak_rss_mb()}


def child_main(argv: list[str]) -> int:
    """``python -m postdiff.tools.bench '{"kind": ..., ...}'``: measure one row, print it as JSON."""
    spec = json.loads(argv[0])
    kind = spec.pop("kind")
    try:
        result = measure_runtime(**spec) if kind == "runtime" else measure_diffusers(**spec)
    except PostdiffError as exc:  # one line for the parent to report, with its exit status
        print(exc, file=sys.stderr)
        return exc.exit_code
    print(json.dumps(result))
    return 0


# --- parent side ---------------------------------------------------------------------------------------


def run_child(label: str, spec: dict) -> dict:
    """Measure one row in a child process and return its result; ``label`` names it in the
    error raised (with the child's last line) when the child fails: InputError when the child
    rejected its input (exit 2), RunFailure otherwise (an exception, a signal, out of memory)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    child = subprocess.run([sys.executable, "-m", "postdiff.tools.bench", json.dumps(spec)], capture_output=True,
                           text=True, env=env)
    if child.returncode != 0:
        tail = child.stderr.strip().splitlines()[-1:]
        why = tail[0] if tail else (f"killed by signal {-child.returncode} (out of memory?)" if child.returncode < 0
                                    else f"exit status {child.returncode}")
        raise (InputError if child.returncode == EXIT_USAGE else RunFailure)(f"{label} failed: {why}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def default_prompt(manifest: Manifest) -> str:
    """The first label of a label-conditioned model, else the first calibration prompt."""
    return manifest.tokenizer.labels[0] if manifest.tokenizer.labels else SD_PROMPTS[0]


def check_options(options: BenchOptions) -> None:
    """Reject bad numbers and modes before anything runs."""
    if isinstance(options.repeats, bool) or not isinstance(options.repeats, int) or options.repeats < 1:
        raise InputError(f"--repeats {options.repeats} is below 1; time at least one generation per row (default 3)")
    if options.weights not in WEIGHT_MODES:
        raise InputError(f"--weights '{options.weights}' is not one of {list(WEIGHT_MODES)}")
    for provider in options.providers:
        get_provider(provider)  # InputError naming the choices
    if not options.providers or not options.precisions:
        raise InputError("--provider and --precision each need at least one value")
    if options.bundle is None and options.model is None:
        raise InputError("nothing to benchmark: give --model MODEL (exported to a temporary bundle) and/or "
                         "--bundle DIR (used if it exists, else --model is exported there)")


def prepare_bundle(options: BenchOptions, scratch: Path, schedules: list[str], progress: bool) -> Path:
    """The bundle to time: ``options.bundle`` if it exists, else a new export of ``options.model``."""
    if options.bundle is not None and (options.bundle / MANIFEST_NAME).is_file():
        return options.bundle
    if options.bundle is not None and options.bundle.exists():
        raise InputError(f"--bundle {options.bundle} exists but is not a bundle (no {MANIFEST_NAME}); remove it "
                         "or name a folder that does not exist yet, which --model is then exported to")
    if options.model is None:
        raise InputError(f"--bundle {options.bundle} does not exist; pass --model MODEL to export it there")
    from postdiff.exporter.export import ExportOptions, export_bundle

    out = options.bundle if options.bundle is not None else scratch / "bundle"
    export_bundle(ExportOptions(source=options.model, out=out, resolution=options.resolution,
                                schedules=tuple(schedules)), progress=progress)
    return out


def diffusers_source(options: BenchOptions, manifest: Manifest) -> str:
    """The model diffusers loads: ``--model``, or the bundle's built-in source; it must be the bundle's."""
    from postdiff.exporter.options import BUILTIN_SPECS, source_id

    if options.model is None:
        if manifest.model.source not in BUILTIN_SPECS:
            raise InputError(f"the bundle was exported from the folder '{manifest.model.source}'; pass --model with "
                             "its path to time diffusers, or --no-diffusers")
        return manifest.model.source
    if source_id(options.model) != manifest.model.source:
        raise InputError(f"--model {options.model} is not the model the bundle was exported from "
                         f"('{manifest.model.source}'); pass that model, or --no-diffusers")
    return options.model


def bench(options: BenchOptions, progress: bool = True) -> dict:
    """Measure every row (see the module docstring) and return the report."""
    check_options(options)
    specs = [options.baseline] + [s for s in options.schedules if s != options.baseline]
    plans = [resolve_schedule(spec) for spec in specs]  # ScheduleError for a bad name, before any export
    profile = load_device_profile(options.device) if options.device is not None else None
    with tempfile.TemporaryDirectory(prefix="postdiff-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        bundle = prepare_bundle(options, scratch, specs, progress)
        manifest = load_manifest(bundle, verify=True)  # hashes and stamps; the children check the stamp only
        if options.scheduler is None:
            options = replace(options, scheduler=default_scheduler(manifest.scheduler_class))
        # diffusers' pipeline takes inference steps: as many as give the baseline's model calls (PNDM: one fewer)
        diffusers_steps = make_scheduler(options.scheduler, manifest.scheduler).num_inference_steps_for(
            len(plans[0].steps))
        for plan in plans:
            required_graphs(manifest, plan)  # ScheduleError naming the graphs the bundle lacks
        if options.memory_budget_mb is not None:  # the floor without the child's own resident memory
            pipeline = Pipeline(bundle, verify=False, memory_budget_mb=options.memory_budget_mb)
            for plan in plans:
                check_budget(estimate(manifest, bundle, pipeline.phases(plan), pipeline.weights_mode == "shared",
                                      resident=0), options.memory_budget_mb)
        predicted = [predict_ms(profile, manifest, plan, options.scheduler) for plan in plans] if profile else None
        model = diffusers_source(options, manifest) if options.diffusers else None
        prompt = options.prompt if options.prompt is not None else default_prompt(manifest)
        # (label, index into plans or None for diffusers, provider, precision); diffusers starts from the
        # baseline's latents
        reference = options.providers[0]
        base = plans[0].name
        order = [(f"runtime:{base}", 0, reference, AUTO_PRECISION)] + \
                ([(f"diffusers:{base}", None, "", "")] if model else []) + \
                [(f"runtime:{plan.name}", i, reference, AUTO_PRECISION) for i, plan in enumerate(plans) if i > 0]
        for provider, precision in provider_rows(options):
            order += [(f"{row_prefix(provider, precision)}:{plan.name}", i, provider, precision)
                      for i, plan in enumerate(plans)]
        rows: dict[str, dict] = {}
        bar = tqdm(order, desc="bench", unit="row", disable=not progress)
        for number, (label, index, provider, precision) in enumerate(bar):
            bar.set_postfix_str(label)
            what = f"bench row {label}"
            save = scratch / f"row{number}"
            save.mkdir()
            if index is None:
                row = run_child(what, {"kind": "diffusers", "model": model, "scheduler": options.scheduler,
                                 "steps": diffusers_steps, "guidance": manifest.model.default_guidance,
                                 "prompt": prompt, "latents": str(scratch / "row0" / "initial.npy"),
                                 "height": manifest.model.height, "width": manifest.model.width,
                                 "repeats": options.repeats, "save": str(save)})
            else:
                row = run_child(what, {"kind": "runtime", "bundle": str(bundle), "schedule": specs[index],
                                 "scheduler": options.scheduler, "seed": options.seed,
                                 "repeats": options.repeats, "weights": options.weights, "prompt": prompt,
                                 "save": str(save), "provider": provider, "precision": precision,
                                 "memory_budget_mb": options.memory_budget_mb, "unet": options.unet})
                row["schedule"] = plans[index].name
                row["unet_gmacs"] = total_macs(plans[index], manifest) / 1e9
                if predicted is not None:
                    row["predicted_ms"] = predicted[index]
            row["final"] = np.load(save / "final.npy")
            rows[label] = row
        bar.close()
    return _report(options, manifest, rows, prompt, plans[0].name)


def provider_rows(options: BenchOptions) -> list[tuple[str, str]]:
    """(provider, precision) of every row set after the reference provider's: each further provider
    (the reference again too, when it takes precisions) at each ``--precision`` its backend runs."""
    pairs: list[tuple[str, str]] = []
    for number, provider in enumerate(options.providers):
        if get_provider(provider).backend == "onnxruntime":
            if number > 0:
                pairs.append((provider, AUTO_PRECISION))
            continue
        pairs += [(provider, precision) for precision in options.precisions]
    return list(dict.fromkeys(pairs))


def row_prefix(provider: str, precision: str) -> str:
    """``openvino``, ``openvino-fp32``: the label of a further provider's rows."""
    return provider if precision == AUTO_PRECISION else f"{provider}-{precision}"


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b||: how far latents ``a`` drifted from the reference ``b``."""
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-30))


def _report(options: BenchOptions, manifest: Manifest, rows: dict[str, dict], prompt: str, baseline: str) -> dict:
    """Ratios against the runtime baseline (schedule ``baseline``) and diffusers; the final-latent
    difference of the two."""
    import onnxruntime as ort

    base = rows[f"runtime:{baseline}"]
    theirs = rows.get(f"diffusers:{baseline}")
    finals = {label: row["final"] for label, row in rows.items()}
    same_on_reference = {row["schedule"]: finals[label] for label, row in rows.items()
                         if label.startswith("runtime:")}
    report_rows = []
    for label, row in rows.items():
        final = row.pop("final")
        if "schedule" in row:
            row["sessions_pss_mb"] = row["sessions_anon_mb"] + row["sessions_file_mb"]
            row["sessions_x_weights"] = row["sessions_pss_mb"] / row["unet_weights_mb"]
            row["rel_l2_vs_baseline"] = rel_l2(final, finals[f"runtime:{baseline}"])
            if not label.startswith("runtime:"):
                row["rel_l2_vs_reference"] = rel_l2(final, same_on_reference[row["schedule"]])
        out = {"row": label, **{k: _round(v) for k, v in row.items()},
               "speedup_vs_baseline": round(base["wall_s"] / row["wall_s"], 3)}
        if theirs is not None:
            out["speedup_vs_diffusers"] = round(theirs["wall_s"] / row["wall_s"], 3)
        if "unet_gmacs" in row:
            out["mac_predicted_speedup"] = round(base["unet_gmacs"] / row["unet_gmacs"], 3)
        if "predicted_ms" in row:  # the device profile's prediction vs this run: + = predicted slower
            out["prediction_error"] = round(row["predicted_ms"] / (1e3 * row["wall_s"]) - 1, 3)
        if label == f"runtime:{baseline}" and theirs is not None:
            out["max_abs_diff_vs_diffusers"] = float(np.max(np.abs(final - theirs["final"])))
        report_rows.append(out)
    report_rows.sort(key=lambda r: (not r["row"].startswith("diffusers"), r["row"] != f"runtime:{baseline}",
                                    not r["row"].startswith("runtime:")))
    return {"machine": f"{cpu_model()} ({os.cpu_count()} cores), {platform.system()}",
            "onnxruntime": ort.__version__, "openvino": _openvino_version(options), "model": manifest.model.source,
            "resolution": f"{manifest.model.height}x{manifest.model.width}",
            "bundle": str(options.bundle) if options.bundle else None,
            "scheduler": options.scheduler, "prompt": prompt, "seed": options.seed, "repeats": options.repeats,
            "baseline": baseline, "rows": report_rows}


def _openvino_version(options: BenchOptions) -> str | None:
    """The OpenVINO version, when a row ran on it."""
    if not any(get_provider(p).backend == "openvino" for p in options.providers):
        return None
    from postdiff.runtime.runners.openvino import openvino_module

    return openvino_module().get_version()


def _round(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def format_report(report: dict) -> str:
    """The report as a fixed-width table."""
    columns = (("wall s", "wall_s", "{:.3f}"), ("graphs s", "graph_s", "{:.3f}"),
               ("overhead", "overhead_pct", "{:.2f}%"), ("vs base", "speedup_vs_baseline", "{:.2f}x"),
               ("vs diff.", "speedup_vs_diffusers", "{:.2f}x"), ("MAC pred.", "mac_predicted_speedup", "{:.2f}x"),
               ("pred. s", "predicted_ms", "{:.3f}"), ("pred. err", "prediction_error", "{:+.0%}"),
               ("load s", "load_s", "{:.2f}"),
               ("sessions s", "sessions_s", "{:.2f}"), ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
               ("sess. MB", "sessions_pss_mb", "{:.0f}"), ("x weights", "sessions_x_weights", "{:.2f}"),
               ("precision", "precision", "{}"), ("drift/base", "rel_l2_vs_baseline", "{:.2e}"),
               ("drift/ORT", "rel_l2_vs_reference", "{:.2e}"))
    width = max(len(r["row"]) for r in report["rows"])
    lines = [f"{report['model']} {report['resolution']}, {report['scheduler']}, prompt {report['prompt']!r}, "
             f"median of {report['repeats']}; {report['machine']}, onnxruntime {report['onnxruntime']}"
             + (f", openvino {report['openvino']}" if report.get("openvino") else ""),
             f"{'row':<{width}}" + "".join(f" {title:>11}" for title, _, _ in columns)]
    for r in report["rows"]:
        cells = []
        for _, key, fmt in columns:
            value = r.get(key)
            value = value / 1e3 if key == "predicted_ms" and value is not None else value
            cells.append(f" {'-' if value is None else fmt.format(value):>11}")
        lines.append(f"{r['row']:<{width}}" + "".join(cells))
    lines.append("sess. MB: memory the schedule's graphs hold once opened and run (proportional set, anonymous + "
                 "mapped files); x weights: that over one UNet's weights")
    lines.append("drift/base: ||final - the runtime's baseline final|| / ||...||; drift/ORT: the same against this "
                 "schedule's own runtime: row (ONNX Runtime fp32)")
    lines += [f"{r['row']} vs diffusers: final latents max abs diff {r['max_abs_diff_vs_diffusers']:.2e}"
              for r in report["rows"] if "max_abs_diff_vs_diffusers" in r]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1:]))
