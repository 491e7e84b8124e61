"""`postdiff demo`: the paper's question on a real model, end to end, torch-free at run time.

Exports the model (default: the embedded `digits`) with three schedules — `baseline` (20 full
steps), `fewer-steps` (8 steps, the paper's alternative) and `postdiff` (the paper's SD 1.5 preset:
half resolution for the first 10 steps, DeepCache, cross-attention gate) — then runs each on the
same seeds and prompts, and reports latency, speed-up, MACs and fidelity. Writes ``bundle/``
(reused by a later run of the same model), ``grid.png`` (rows: schedules, columns: seeds) and
``results.json`` into the output folder. The console says what each fidelity figure is measured
against; the grid labels its rows (schedules) and columns (prompt and seed).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from postdiff.errors import InputError
from postdiff.files import atomic_path
from postdiff.tools.explain import total_macs
from postdiff.runtime.jsonio import write_json_atomic
from postdiff.runtime.manifest import MANIFEST_NAME, load_manifest
from postdiff.runtime.pipeline import Pipeline
from postdiff.profiles.presets import resolve_schedule
from postdiff.runtime.jsonio import read_json
from postdiff.tools.evaluate import (CLASSIFIER, DigitJudge, Request, fidelity, generate_set, is_digit_model,
                                     requests_for)
from postdiff.tools.grid import make_grid

# (name shown, preset)
SCHEDULES = (("baseline", "baseline"), ("fewer-steps", "fewer-steps"), ("postdiff", "postdiff-sd15"))
GRID_COLUMNS = 10
CLASSIFIER_ACCURACY = read_json(CLASSIFIER.with_suffix(".json"))["heldout_accuracy"]


@dataclass(frozen=True)
class DemoOptions:
    """`postdiff demo` arguments."""

    model: str = "digits"
    out: Path = Path("postdiff-demo")
    samples: int = 100


def run_demo(options: DemoOptions, progress: bool = True) -> dict:
    """Run the demo, print its table, and return what it wrote to ``results.json``."""
    if options.samples < 2:
        raise InputError(f"--samples {options.samples} is too few; use at least 2 (digit-FID needs a spread)")
    bundle = _ensure_bundle(options, progress)
    pipeline = Pipeline(bundle)
    requests = requests_for(pipeline, options.samples)
    judge = DigitJudge() if is_digit_model(pipeline.manifest) else None
    sets, runs = [], []
    for name, preset in SCHEDULES:
        schedule = replace(resolve_schedule(preset), name=name)
        sample_set = generate_set(pipeline, schedule, requests, progress=progress)
        sets.append(sample_set)
        macs = total_macs(schedule, pipeline.manifest)
        runs.append({"name": name, "latency_s": sample_set.latency_s, "macs": macs,
                     **fidelity(sample_set, sets[0], requests, judge)})
    for run in runs:
        run["speedup"] = runs[0]["latency_s"] / run["latency_s"]
    columns = min(GRID_COLUMNS, options.samples)
    grid = make_grid([s.images[:columns] for s in sets], [r["name"] for r in runs],
                     scale=max(1, 96 // sets[0].images[0].shape[0]),
                     column_labels=[column_label(r) for r in requests[:columns]],
                     corner="prompt, seed:")
    with atomic_path(options.out / "grid.png") as tmp:
        grid.save(tmp)
    results = {"model": options.model, "samples": options.samples, "runs": runs}
    write_json_atomic(options.out / "results.json", results)
    print(format_table(results))
    print(format_legend(judge is not None))
    print(f"wrote {options.out / 'grid.png'} and {options.out / 'results.json'}")
    return results


def format_table(results: dict) -> str:
    """The demo's table as text."""
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"model {results['model']}, {results['samples']} samples per schedule (same seeds and prompts)",
             f"{'schedule':<12} {'latency s':>9} {'speed-up':>8} {'GMACs':>7} {'adherence':>9} {'digit-FID':>9} "
             f"{'PSNR dB':>7} {'SSIM':>6}"]
    for r in results["runs"]:
        lines.append(f"{r['name']:<12} {r['latency_s']:>9.3f} {r['speedup']:>7.2f}x {r['macs'] / 1e9:>7.2f} "
                     f"{fmt(r['adherence'], '.1%'):>9} {fmt(r['digit_fid'], '.2f'):>9} {fmt(r['psnr_db'], '.1f'):>7} "
                     f"{fmt(r['ssim'], '.3f'):>6}")
    return "\n".join(lines)


def column_label(request: Request) -> str:
    """A grid column's heading: the prompt (quoted, shortened) and the seed."""
    prompt = request.prompt if len(request.prompt) <= 12 else request.prompt[:10] + "..."
    return f'"{prompt}", seed {request.seed}'


def format_legend(digits: bool) -> str:
    """What each fidelity column is measured against (printed under the table)."""
    lines = ["PSNR, SSIM: each image against the baseline's image of the same seed and prompt, averaged (the "
             "baseline row is that reference: SSIM 1, PSNR '-' for identical images)"]
    if digits:
        lines = [f"adherence: share of images the digit classifier ({CLASSIFIER_ACCURACY:.1%} accurate on held-out "
                 "real MNIST digits) reads as the digit asked for",
                 "digit-FID: Fréchet distance between the classifier's features of the images and of 1,000 held-out "
                 "real MNIST digits (lower is closer to real digits)"] + lines
    return "\n".join(lines)


def _ensure_bundle(options: DemoOptions, progress: bool) -> Path:
    """Export the demo model into ``out/bundle`` unless a bundle of the same model is already there."""
    bundle = options.out / "bundle"
    presets = tuple(preset for _, preset in SCHEDULES)
    if (bundle / MANIFEST_NAME).is_file():
        manifest = load_manifest(bundle, verify=False)
        if manifest.model.source == options.model and set(presets) <= set(manifest.schedules):
            return bundle
        raise InputError(f"{bundle} holds a bundle of '{manifest.model.source}' for {list(manifest.schedules)}, "
                         f"not '{options.model}' for {list(presets)}; use another --out or delete it")
    from postdiff.exporter.export import ExportOptions, export_bundle  # needs torch: only when exporting

    created = not options.out.exists()
    options.out.mkdir(parents=True, exist_ok=True)
    try:
        export_bundle(ExportOptions(source=options.model, out=bundle, schedules=presets), progress=progress)
    except BaseException:
        if created:  # leave nothing behind for a run that produced nothing
            shutil.rmtree(options.out, ignore_errors=True)
        raise
    return bundle
