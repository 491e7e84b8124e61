"""`postdiff demo`: export a model, then generate the same seeds with each scheduler, torch-free.

Writes ``bundle/`` (reused on a later run with the same model), ``grid.png`` (rows: samplers,
columns: seeds) and ``results.json`` into the output folder, and prints a table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from postdiff.runtime.errors import InputError
from postdiff.runtime.jsonio import write_json_atomic
from postdiff.runtime.manifest import MANIFEST_NAME, load_manifest
from postdiff.runtime.pipeline import GenerateOptions, Pipeline
from postdiff.runtime.schedulers import SCHEDULERS
from postdiff.tools.grid import make_grid

PROMPTS = ("a photograph of an astronaut riding a horse", "a watercolor of a lighthouse at dusk",
           "a bowl of fruit on a wooden table", "a city street in the rain at night")


@dataclass(frozen=True)
class DemoOptions:
    """`postdiff demo` arguments."""

    model: str = "random:tiny-sd"
    out: Path = Path("postdiff-demo")
    samples: int = 4
    steps: int = 20


def run_demo(options: DemoOptions, progress: bool = True) -> dict:
    """Run the demo and return what it wrote to ``results.json``."""
    if options.samples <= 0:
        raise InputError(f"--samples {options.samples} is not positive; use at least 1")
    bundle = _ensure_bundle(options, progress)
    pipeline = Pipeline(bundle)
    rows, runs = [], []
    for scheduler in SCHEDULERS:
        images, seconds = [], 0.0
        for seed in tqdm(range(options.samples), desc=scheduler, disable=not progress):
            request = GenerateOptions(prompt=PROMPTS[seed % len(PROMPTS)], seed=seed, steps=options.steps,
                                      scheduler=scheduler)
            started = time.perf_counter()
            images.append(pipeline.generate(request).image)
            seconds += time.perf_counter() - started
        rows.append(images)
        runs.append({"name": scheduler, "steps": options.steps, "latency_s": seconds / options.samples})
    grid = make_grid(rows, [r["name"] for r in runs], scale=max(1, 128 // rows[0][0].shape[0]))
    grid.save(options.out / "grid.png")
    results = {"model": options.model, "samples": options.samples, "runs": runs}
    write_json_atomic(options.out / "results.json", results)
    print(f"{'sampler':<10} {'steps':>5} {'latency (s/image)':>18}")
    for run in runs:
        print(f"{run['name']:<10} {run['steps']:>5} {run['latency_s']:>18.3f}")
    print(f"wrote {options.out / 'grid.png'} and {options.out / 'results.json'}")
    return results


def _ensure_bundle(options: DemoOptions, progress: bool) -> Path:
    """Export the demo model into ``out/bundle`` unless a bundle of the same model is already there."""
    bundle = options.out / "bundle"
    if (bundle / MANIFEST_NAME).is_file():
        manifest = load_manifest(bundle, verify=False)
        if manifest.model.source == options.model:
            return bundle
        raise InputError(f"{bundle} holds a bundle of '{manifest.model.source}', not '{options.model}'; "
                         "use another --out or delete it")
    from postdiff.exporter.export import ExportOptions, export_bundle  # needs torch: only when exporting

    options.out.mkdir(parents=True, exist_ok=True)
    export_bundle(ExportOptions(source=options.model, out=bundle), progress=progress)
    return bundle
