"""The `postdiff` command line: a thin argparse layer over library functions.

Each subcommand imports only what it needs, so the device-side commands (`generate`) never import
torch. Errors a user can fix are printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Callable

from postdiff import __version__
from postdiff.errors import InputError, PostdiffError

EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 2, 130


def _cmd_export(args: argparse.Namespace) -> int:
    """Export a diffusers model to a bundle (needs the [export] extra: torch, diffusers, onnx)."""
    from postdiff.exporter.export import ExportOptions, export_bundle, parse_resolution

    resolution = parse_resolution(args.resolution) if args.resolution else None
    options = ExportOptions(source=args.model, out=Path(args.out), resolution=resolution, precision=args.precision,
                            schedules=tuple(args.schedule or ()), tuning_space=args.tuning_space)
    started = time.perf_counter()
    manifest = export_bundle(options, progress=not args.quiet)
    worst = max(g.parity.max_abs_diff for g in manifest.graphs.values())
    print(f"wrote {args.out} in {time.perf_counter() - started:.1f} s: {len(manifest.graphs)} graphs "
          f"({', '.join(sorted(manifest.graphs))}); worst parity vs torch {worst:.1e}")
    return EXIT_OK


def _new_file(out: Path, overwrite: bool) -> Path:
    """``--out`` checked before any work: its folder exists, and it does not unless ``overwrite``."""
    if out.exists() and not overwrite:
        raise InputError(f"--out {out} already exists; choose another file or pass --overwrite")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: folder {out.parent} does not exist; create it first")
    return out


def _cmd_generate(args: argparse.Namespace) -> int:
    """Generate an image from a bundle, torch-free (numpy + onnxruntime)."""
    import numpy as np

    from postdiff.runtime.conditioning import SizeConditioning
    from postdiff.runtime.image import save_png
    from postdiff.runtime.pipeline import GenerateOptions, Pipeline
    from postdiff.profiles.presets import resolve_schedule

    out = _new_file(Path(args.out), args.overwrite)
    schedule = resolve_schedule(args.schedule) if args.schedule else None
    if schedule is not None and args.steps is not None and args.steps != len(schedule.steps):
        raise InputError(f"--steps {args.steps} contradicts schedule '{schedule.name}', which has "
                         f"{len(schedule.steps)} steps; drop --steps (the schedule fixes them)")
    steps = len(schedule.steps) if schedule else (20 if args.steps is None else args.steps)
    GenerateOptions(prompt=args.prompt, steps=steps).validate()
    latents = _load_latents(Path(args.latents)) if args.latents else None
    pipeline = Pipeline(Path(args.bundle), provider=args.provider)
    guidance = pipeline.manifest.model.default_guidance if args.guidance is None else args.guidance
    sizes = SizeConditioning(original_size=args.original_size, crop_top_left=args.crop_top_left or (0, 0),
                             target_size=args.target_size)
    if pipeline.manifest.sdxl is None and sizes != SizeConditioning():
        raise InputError("--original-size / --crop-top-left / --target-size are SDXL's size conditioning; this "
                         "bundle's model has none: drop them")
    options = GenerateOptions(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
                              steps=steps, guidance=guidance, scheduler=args.scheduler, sizes=sizes)
    started = time.perf_counter()
    result = pipeline.generate(options, latents=latents, progress=not args.quiet, schedule=schedule)
    elapsed = time.perf_counter() - started
    save_png(result.image, out)
    if args.save_latents:
        np.save(args.save_latents, result.latents)
    print(f"wrote {out} ({result.image.shape[1]}x{result.image.shape[0]}) in {elapsed:.2f} s")
    return EXIT_OK


def _pixel_pair(text: str) -> tuple[int, int]:
    """``"1024x768"`` -> (1024, 768), for argparse (its error names the flag)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"'{text}' is not two whole pixel counts like 1024x1024")
    return int(parts[0]), int(parts[1])


def _load_latents(path: Path):  # -> np.ndarray
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"--latents {path} is not a readable .npy array ({exc})") from None


def _cmd_schedule(args: argparse.Namespace) -> int:
    """Build a denoising schedule from PostDiff's knobs (or a preset), validate it, write it as JSON."""
    from postdiff.tools.explain import format_table
    from postdiff.runtime.jsonio import write_json_atomic
    from postdiff.runtime.manifest import load_manifest
    from postdiff.profiles.schedule_builder import build_schedule, knobs_from_flags

    if args.out is None and not args.explain:
        raise InputError("nothing to do: give --out SCHEDULE.json to write the schedule, and/or --explain")
    out = Path(args.out) if args.out else None
    if out is not None and not out.parent.is_dir():
        raise InputError(f"--out {out}: folder {out.parent} does not exist; create it first")
    knobs, name, description = knobs_from_flags(
        preset=args.preset, steps=args.steps, low_res=args.low_res, deepcache_interval=args.deepcache_interval,
        deepcache_branch=args.deepcache_branch, deepcache_nonuniform=args.deepcache_nonuniform,
        xattn_gate=args.xattn_gate, xattn_mode=args.xattn_mode)
    schedule = build_schedule(knobs, args.name or name, description)
    manifest = load_manifest(Path(args.bundle), verify=False) if args.bundle else None
    if args.explain:
        print(format_table(schedule, manifest))
    if out is not None:
        write_json_atomic(out, schedule)
        print(f"wrote {out}")
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    """Time diffusers against the runtime on the 20-step baseline, and the runtime's baseline against
    faster schedules, in one run on this machine: median wall time, time inside graphs, the runtime's
    own overhead, speed-ups, peak memory per row, and the final-latent difference from diffusers."""
    from postdiff.runtime.jsonio import write_json_atomic
    from postdiff.tools.bench import BenchOptions, bench, format_report

    resolution = None
    if args.resolution:  # the exporter (and torch) only when there is something to export
        from postdiff.exporter.export import parse_resolution

        resolution = parse_resolution(args.resolution)
    options = BenchOptions(
        model=args.model, bundle=Path(args.bundle) if args.bundle else None,
        schedules=tuple(args.schedule or ("postdiff-sd15",)), resolution=resolution, scheduler=args.scheduler,
        seed=args.seed, repeats=args.repeats, weights=args.weights, diffusers=not args.no_diffusers,
        device=Path(args.device) if args.device else None, prompt=args.prompt)
    report = bench(options, progress=not args.quiet)
    print(format_report(report))
    if args.json:
        write_json_atomic(Path(args.json), report)
        print(f"wrote {args.json}")
    return EXIT_OK


def _cmd_profile(args: argparse.Namespace) -> int:
    """Time every graph of a bundle on this device, plus the scheduler step and resolution switch, and
    record peak memory and the machine in a device profile (JSON) for latency prediction and tuning."""
    from postdiff.runtime.jsonio import write_json_atomic
    from postdiff.tools.profiler import format_profile, profile_bundle

    out = _new_file(Path(args.out), args.overwrite)
    profile = profile_bundle(Path(args.bundle), provider=args.provider, repeats=args.repeats, warmup=args.warmup,
                             progress=not args.quiet)
    write_json_atomic(out, profile)
    print(format_profile(profile))
    print(f"wrote {out}")
    return EXIT_OK


def _cmd_tune(args: argparse.Namespace) -> int:
    """Pick the schedule with the best images within a latency budget on a device: predict every
    candidate's latency from the device profile, measure fidelity on calibration samples against the
    20-step baseline, and write the chosen schedule plus frontier.json and frontier.png beside it."""
    from postdiff.tools.tune import TuneOptions, format_summary, tune

    options = TuneOptions(bundle=Path(args.bundle), device=Path(args.device), out=Path(args.out),
                          budget_ms=args.budget_ms, speedup=args.speedup, calib=args.calib, workers=args.workers,
                          scheduler=args.scheduler, timing_runs=args.timing_runs, slack=args.slack,
                          cache=Path(args.cache) if args.cache else None)
    print(format_summary(tune(options, progress=not args.quiet)))
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    """Fewer steps or cheaper steps? Export a model, run baseline / fewer-steps / postdiff on the same
    seeds, and report latency, speed-up, MACs and fidelity (writes grid.png and results.json)."""
    from postdiff.tools.demo import DemoOptions, run_demo

    run_demo(DemoOptions(model=args.model, out=Path(args.out), samples=args.samples), progress=not args.quiet)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used to render --help)."""
    parser = argparse.ArgumentParser(
        prog="postdiff",
        description="Edge deployment compiler for diffusion models: export a diffusers model to an ONNX "
                    "bundle on a workstation, then generate with it torch-free on the device.",
    )
    parser.add_argument("--version", action="version", version=f"postdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    export = sub.add_parser("export", help=_cmd_export.__doc__, description=_cmd_export.__doc__)
    export.add_argument("model", help="local diffusers folder (SD 1.x/2.x or SDXL layout) or a built-in spec: "
                                      "digits (the embedded MNIST model), random:tiny-sd, random:sd15, "
                                      "random:tiny-sdxl, random:sdxl-slim (SDXL's layout at 1/5 width, the "
                                      "benchmark model), random:sdxl (the full SDXL architecture: a workstation "
                                      "export, docs/sdxl.md)")
    export.add_argument("--out", required=True, help="bundle folder to create (must not exist)")
    export.add_argument("--resolution", metavar="HxW", help="image size in pixels (default: the model's)")
    export.add_argument("--precision", default="fp32", choices=["fp32", "fp16"], help="graph precision")
    export.add_argument("--schedule", action="append", metavar="SCHEDULE",
                        help="schedule file or preset whose graph variants to export (repeatable; default: only "
                             "the plain full-resolution graph)")
    export.add_argument("--tuning-space", action="store_true",
                        help="also export every graph variant the candidates of `postdiff tune` need")
    export.add_argument("--quiet", action="store_true", help="no progress bar")
    export.set_defaults(handler=_cmd_export)

    gen = sub.add_parser("generate", help=_cmd_generate.__doc__, description=_cmd_generate.__doc__)
    gen.add_argument("bundle", help="bundle folder written by `postdiff export`")
    gen.add_argument("--prompt", required=True, help="text prompt")
    gen.add_argument("--negative-prompt", default="", help="negative prompt (default: empty)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: 0)")
    gen.add_argument("--steps", type=int, help="denoising steps of plain generation (default: 20)")
    gen.add_argument("--schedule", metavar="SCHEDULE",
                     help="schedule file or preset to execute (e.g. postdiff-sd15); the bundle must have been "
                          "exported with it")
    gen.add_argument("--guidance", type=float,
                     help="classifier-free guidance scale; <= 1 turns guidance off (default: the model's, "
                          "7.5 for Stable Diffusion)")
    gen.add_argument("--scheduler", default="ddim", choices=["ddim", "dpmpp-2m", "euler"],
                     help="sampler (default: ddim)")
    gen.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"],
                     help="ONNX Runtime execution provider (default: cpu)")
    gen.add_argument("--original-size", type=_pixel_pair, metavar="HxW",
                     help="SDXL: original size conditioning in pixels (default: the image size)")
    gen.add_argument("--crop-top-left", type=_pixel_pair, metavar="YxX",
                     help="SDXL: crop top-left conditioning in pixels (default: 0x0)")
    gen.add_argument("--target-size", type=_pixel_pair, metavar="HxW",
                     help="SDXL: target size conditioning in pixels (default: the image size; a low-resolution "
                          "stage carries it scaled to its own size, docs/sdxl.md)")
    gen.add_argument("--latents", metavar="NPY", help="initial latents (1, C, h, w) float32 instead of seeded noise")
    gen.add_argument("--save-latents", metavar="NPY", help="also save the final latents")
    gen.add_argument("--out", required=True, help="PNG file to write")
    gen.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(handler=_cmd_generate)

    sched = sub.add_parser("schedule", help=_cmd_schedule.__doc__, description=_cmd_schedule.__doc__)
    sched.add_argument("--preset", help="start from a preset (baseline, fewer-steps, postdiff-sd15, postdiff-beta34); "
                                        "the other flags override its knobs")
    sched.add_argument("--steps", type=int, help="total denoising steps (default 20)")
    sched.add_argument("--low-res", nargs="+", metavar="SCALE:STEPS",
                       help="low-resolution stages before full resolution, e.g. 0.5:10 or 0.5:6 0.75:4")
    sched.add_argument("--deepcache-interval", type=int, metavar="K", help="refresh the DeepCache feature every K "
                                                                             "steps (1 = off)")
    sched.add_argument("--deepcache-branch", type=int, metavar="B", help="DeepCache branch (0 = shallowest)")
    sched.add_argument("--deepcache-nonuniform", metavar="C,P",
                       help="non-uniform refreshes packed around centre step C with power P, e.g. 10,1.4")
    sched.add_argument("--xattn-gate", type=int, metavar="M", help="capture cross-attention at step M; guidance "
                                                                    "off and cached maps after it")
    sched.add_argument("--xattn-mode", choices=["cond", "ave"], help="keep the conditional maps (PostDiff) or "
                                                                      "their mean with the unconditional (T-GATE)")
    sched.add_argument("--name", help="schedule name (default: the preset's, or 'custom')")
    sched.add_argument("--out", metavar="SCHEDULE.json", help="file to write")
    sched.add_argument("--explain", action="store_true", help="print the per-step table and predicted speed-up")
    sched.add_argument("--bundle", help="bundle exported with this schedule, for the MAC counts in --explain")
    sched.set_defaults(handler=_cmd_schedule)

    bench = sub.add_parser("bench", help=_cmd_bench.__doc__, description=_cmd_bench.__doc__)
    bench.add_argument("--model", help="model to export and to run in diffusers: digits, random:tiny-sd, random:sd15, "
                                       "random:tiny-sdxl, random:sdxl-slim "
                                       "or a diffusers folder (default: the bundle's, when it is a built-in)")
    bench.add_argument("--bundle", metavar="DIR",
                       help="bundle to time; if DIR does not exist, --model is exported there with baseline and "
                            "every --schedule (default: a temporary export, deleted afterwards)")
    bench.add_argument("--schedule", action="append", metavar="SCHEDULE",
                       help="schedule (preset or file) to time against the baseline; repeatable "
                            "(default: postdiff-sd15)")
    bench.add_argument("--resolution", metavar="HxW", help="export resolution in pixels (default: the model's)")
    bench.add_argument("--scheduler", default="ddim", choices=["ddim", "dpmpp-2m", "euler"])
    bench.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: 0)")
    bench.add_argument("--prompt", help="prompt (default: an SD prompt, or a label model's first label)")
    bench.add_argument("--repeats", type=int, default=3,
                       help="timed generations per row after one warm-up; the median counts (default: 3)")
    bench.add_argument("--weights", default="auto", choices=["auto", "shared", "per-session"],
                       help="how UNet sessions hold the weights (default auto: shared when the bundle has several "
                            "UNet graphs, as `postdiff generate` does)")
    bench.add_argument("--device", metavar="DEVICE.json",
                       help="device profile of this bundle: adds each row's predicted latency")
    bench.add_argument("--no-diffusers", action="store_true", help="skip the diffusers row (no torch needed)")
    bench.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    bench.add_argument("--quiet", action="store_true", help="no progress bars")
    bench.set_defaults(handler=_cmd_bench)

    prof = sub.add_parser("profile", help=_cmd_profile.__doc__, description=_cmd_profile.__doc__)
    prof.add_argument("bundle", help="bundle folder written by `postdiff export`")
    prof.add_argument("--out", required=True, metavar="DEVICE.json", help="device profile to write")
    prof.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"],
                      help="ONNX Runtime execution provider (default: cpu)")
    prof.add_argument("--repeats", type=int, default=10, help="timed calls per graph and operation (default: 10)")
    prof.add_argument("--warmup", type=int, default=2, help="untimed calls before them (default: 2)")
    prof.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    prof.add_argument("--quiet", action="store_true", help="no progress bar")
    prof.set_defaults(handler=_cmd_profile)

    tune = sub.add_parser("tune", help=_cmd_tune.__doc__, description=_cmd_tune.__doc__)
    tune.add_argument("bundle", help="bundle folder, ideally exported with --tuning-space (it must hold the "
                                     "20-step baseline's graph)")
    tune.add_argument("--device", required=True, metavar="DEVICE.json",
                      help="device profile of this bundle, written by `postdiff profile` on the target device")
    budget = tune.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-ms", type=float, metavar="X", help="latency budget per image on the device, ms")
    budget.add_argument("--speedup", type=float, metavar="Y",
                        help="budget = the 20-step baseline's predicted latency / Y")
    tune.add_argument("--calib", type=int, default=128, metavar="N",
                      help="calibration samples per candidate (seeds 0..N-1; default: 128 -- on digits, 32 samples did "
                           "not rank candidates as 256 do, 128 did)")
    tune.add_argument("--workers", type=int, metavar="W", help="processes measuring fidelity (default: one per CPU)")
    tune.add_argument("--scheduler", default="ddim", choices=["ddim", "dpmpp-2m", "euler"],
                      help="sampler to tune for (default: ddim)")
    tune.add_argument("--timing-runs", type=int, default=5, metavar="R",
                      help="timed generations per candidate for the measured latency (default: 5)")
    tune.add_argument("--slack", type=float, default=0.5,
                      help="also measure cheaper-steps candidates predicted up to budget x (1 + SLACK) (default: 0.5)")
    tune.add_argument("--cache", metavar="PATH",
                      help="results cache, JSON lines (default: tune-cache.jsonl beside --out); a re-run, or a run "
                           "for another budget, reuses every result in it")
    tune.add_argument("--out", required=True, metavar="SCHEDULE.json",
                      help="chosen schedule to write (frontier.json and frontier.png go beside it)")
    tune.add_argument("--quiet", action="store_true", help="no progress bars")
    tune.set_defaults(handler=_cmd_tune)

    demo = sub.add_parser("demo", help=_cmd_demo.__doc__, description=_cmd_demo.__doc__)
    demo.add_argument("--model", default="digits",
                      help="model to demo: digits (default, the embedded MNIST model), random:tiny-sd, "
                           "random:sd15 or a diffusers folder")
    demo.add_argument("--samples", type=int, default=100, help="samples per schedule (default: 100)")
    demo.add_argument("--out", default="postdiff-demo", help="output folder (default: postdiff-demo/)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `postdiff` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except PostdiffError as exc:
        print(f"postdiff {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"postdiff {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
