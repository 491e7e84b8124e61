"""`postdiff bench`: diffusers vs the runtime, and the runtime's baseline vs faster schedules, in one run.

Rows, each measured in a child process of its own (so that its peak resident memory is its own):

* ``runtime:baseline`` -- the 20-step baseline schedule through :class:`~postdiff.runtime.pipeline.Pipeline`;
* ``diffusers:baseline`` -- the same generation in PyTorch through diffusers
  (:func:`~postdiff.exporter.torch_reference.diffusers_generate`), from the runtime's initial latents; the
  final latents of the two are compared, so that a speed figure never hides a wrong result;
* ``runtime:SCHEDULE`` -- one row per ``--schedule`` (preset or schedule file).

Every row does one untimed warm-up generation (sessions, allocators), then ``repeats`` timed
ones: the median wall time of prompt encoding + denoising + decoding. Runtime rows also add up the
time spent inside graph calls; the rest of the wall time is the runtime's own overhead (numpy
scheduler steps, guidance, resolution switches, feed checks, tokenizing, image conversion).
Speed-ups are ratios of medians measured in this one invocation on this one machine.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from postdiff.profiles.device import load_device_profile
from postdiff.errors import InputError
from postdiff.runtime.executor import ScheduleExecutor, required_graphs
from postdiff.tools.explain import total_macs
from postdiff.runtime.manifest import MANIFEST_NAME, Manifest, load_manifest
from postdiff.runtime.pipeline import GenerateOptions, Pipeline
from postdiff.runtime.runners.base import Runner
from postdiff.profiles.presets import resolve_schedule
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
    resolution: tuple[int, int] | None = None  # export resolution (pixels); None: the model's
    scheduler: str = "ddim"
    seed: int = 0
    repeats: int = 3
    weights: str = "auto"  # how UNet sessions hold weights: auto | shared | per-session
    unet: str = "auto"  # UNet form: auto | variants | merged (executor.resolve_graphs)
    diffusers: bool = True  # also time diffusers (needs torch and the model)
    device: Path | None = None  # device profile: adds each row's predicted latency
    prompt: str | None = None  # default: the first calibration prompt (SD_PROMPTS), or a label model's first label


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


def measure_runtime(bundle: str, schedule: str, scheduler: str, seed: int, repeats: int, weights: str, prompt: str,
                    save: str, unet: str = "auto") -> dict:
    """Time ``repeats`` generations of ``schedule``; save the initial and final latents under ``save``."""
    plan = resolve_schedule(schedule)
    before = rss_mb()
    pipeline = TimedPipeline(Path(bundle), verify=False, shared_weights=WEIGHT_MODES[weights], unet=unet)
    executor = ScheduleExecutor(pipeline.manifest, plan, pipeline.runner, unet)
    for variant in executor.variants:  # every UNet session the schedule needs, run once: weights resident and
        runner = executor.runner_for(variant)  # activation memory allocated (the merged graph: at each shape)
        runner.infer({t.name: np.zeros(t.shape, dtype=t.dtype) for t in runner.spec.inputs})
    sessions_mb = rss_mb() - before
    options = GenerateOptions(prompt=prompt, seed=seed, steps=len(plan.steps), scheduler=scheduler,
                              guidance=pipeline.manifest.model.default_guidance)
    initial = pipeline.initial_latents(seed, executor.first_latent_shape())
    pipeline.generate(options, latents=initial, schedule=plan)  # warm-up
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
            "weights": pipeline.weights_mode,
            "unet_graphs": len(executor.graph_names), "sessions_rss_mb": sessions_mb, "peak_rss_mb": peak_rss_mb()}


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
    result = measure_runtime(**spec) if kind == "runtime" else measure_diffusers(**spec)
    print(json.dumps(result))
    return 0


# --- parent side ---------------------------------------------------------------------------------------


def run_child(label: str, spec: dict) -> dict:
    """Measure one row in a child process and return its result; ``label`` names it in the
    InputError raised (with the child's last line) when the child fails."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    child = subprocess.run([sys.executable, "-m", "postdiff.tools.bench", json.dumps(spec)], capture_output=True,
                           text=True, env=env)
    if child.returncode != 0:
        tail = child.stderr.strip().splitlines()[-1:]
        why = tail[0] if tail else (f"killed by signal {-child.returncode} (out of memory?)" if child.returncode < 0
                                    else f"exit status {child.returncode}")
        raise InputError(f"{label} failed: {why}")
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
    from postdiff.exporter.export import source_id
    from postdiff.exporter.models import BUILTIN_SPECS

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
    specs = [BASELINE] + [s for s in options.schedules if s != BASELINE]
    plans = [resolve_schedule(spec) for spec in specs]  # ScheduleError for a bad name, before any export
    profile = load_device_profile(options.device) if options.device is not None else None
    with tempfile.TemporaryDirectory(prefix="postdiff-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        bundle = prepare_bundle(options, scratch, specs, progress)
        manifest = load_manifest(bundle, verify=True)  # the children skip the sha256 check
        for plan in plans:
            required_graphs(manifest, plan)  # ScheduleError naming the graphs the bundle lacks
        predicted = [predict_ms(profile, manifest, plan, options.scheduler) for plan in plans] if profile else None
        model = diffusers_source(options, manifest) if options.diffusers else None
        prompt = options.prompt if options.prompt is not None else default_prompt(manifest)
        # (label, index into plans or None for diffusers); diffusers starts from the baseline's latents
        order = [(f"runtime:{BASELINE}", 0)] + ([("diffusers:baseline", None)] if model else []) + \
                [(f"runtime:{plan.name}", i) for i, plan in enumerate(plans) if i > 0]
        rows: dict[str, dict] = {}
        bar = tqdm(order, desc="bench", unit="row", disable=not progress)
        for number, (label, index) in enumerate(bar):
            bar.set_postfix_str(label)
            what = f"bench row {label}"
            save = scratch / f"row{number}"
            save.mkdir()
            if index is None:
                row = run_child(what, {"kind": "diffusers", "model": model, "scheduler": options.scheduler,
                                 "steps": len(plans[0].steps), "guidance": manifest.model.default_guidance,
                                 "prompt": prompt, "latents": str(scratch / "row0" / "initial.npy"),
                                 "height": manifest.model.height, "width": manifest.model.width,
                                 "repeats": options.repeats, "save": str(save)})
            else:
                row = run_child(what, {"kind": "runtime", "bundle": str(bundle), "schedule": specs[index],
                                 "scheduler": options.scheduler, "seed": options.seed,
                                 "repeats": options.repeats, "weights": options.weights, "prompt": prompt,
                                 "save": str(save), "unet": options.unet})
                row["unet_gmacs"] = total_macs(plans[index], manifest) / 1e9
                if predicted is not None:
                    row["predicted_ms"] = predicted[index]
            row["final"] = np.load(save / "final.npy")
            rows[label] = row
        bar.close()
    return _report(options, manifest, rows, prompt)


def _report(options: BenchOptions, manifest: Manifest, rows: dict[str, dict], prompt: str) -> dict:
    """Ratios against the runtime baseline and diffusers; the final-latent difference of the two."""
    import onnxruntime as ort

    base = rows[f"runtime:{BASELINE}"]
    theirs = rows.get("diffusers:baseline")
    report_rows = []
    for label, row in rows.items():
        final = row.pop("final")
        out = {"row": label, **{k: _round(v) for k, v in row.items()},
               "speedup_vs_baseline": round(base["wall_s"] / row["wall_s"], 3)}
        if theirs is not None:
            out["speedup_vs_diffusers"] = round(theirs["wall_s"] / row["wall_s"], 3)
        if "unet_gmacs" in row:
            out["mac_predicted_speedup"] = round(base["unet_gmacs"] / row["unet_gmacs"], 3)
        if label == f"runtime:{BASELINE}" and theirs is not None:
            out["max_abs_diff_vs_diffusers"] = float(np.max(np.abs(final - theirs["final"])))
        report_rows.append(out)
    report_rows.sort(key=lambda r: (not r["row"].startswith("diffusers"), r["row"] != f"runtime:{BASELINE}"))
    return {"machine": f"{cpu_model()} ({os.cpu_count()} cores), {platform.system()}",
            "onnxruntime": ort.__version__, "model": manifest.model.source,
            "resolution": f"{manifest.model.height}x{manifest.model.width}",
            "bundle": str(options.bundle) if options.bundle else None,
            "scheduler": options.scheduler, "prompt": prompt, "seed": options.seed, "repeats": options.repeats,
            "rows": report_rows}


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
               ("pred. s", "predicted_ms", "{:.3f}"), ("peak RSS MB", "peak_rss_mb", "{:.0f}"))
    width = max(len(r["row"]) for r in report["rows"])
    lines = [f"{report['model']} {report['resolution']}, {report['scheduler']}, prompt {report['prompt']!r}, "
             f"median of {report['repeats']}; {report['machine']}, onnxruntime {report['onnxruntime']}",
             f"{'row':<{width}}" + "".join(f" {title:>11}" for title, _, _ in columns)]
    for r in report["rows"]:
        cells = []
        for _, key, fmt in columns:
            value = r.get(key)
            value = value / 1e3 if key == "predicted_ms" and value is not None else value
            cells.append(f" {'-' if value is None else fmt.format(value):>11}")
        lines.append(f"{r['row']:<{width}}" + "".join(cells))
    lines += [f"{r['row']} vs diffusers: final latents max abs diff {r['max_abs_diff_vs_diffusers']:.2e}"
              for r in report["rows"] if "max_abs_diff_vs_diffusers" in r]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1:]))
