"""The `postdiff` command line: a thin argparse layer over library functions.

Each subcommand imports only what it needs, so the device-side commands (`generate`) never import
torch. Errors are printed as one line on stderr with the exit codes of :data:`EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Callable

from postdiff import __version__
from postdiff.errors import EXIT_FAILURE, EXIT_USAGE, InputError, PostdiffError
from postdiff.runtime.runners.providers import (AUTO_PRECISION, DEFAULT_PROVIDER, RUNTIME_PRECISIONS, provider_names,
                                                providers_help)

EXIT_OK, EXIT_INTERRUPTED = 0, 130
#: what every command's exit status means (shown in --help)
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAILURE: "a verification, parity or runtime failure (`postdiff verify` finding a file that fails its "
                  "sha256, a graph that does not reproduce torch, a generation or measurement that crashed)",
    EXIT_USAGE: "bad input or usage (a flag, file, model or schedule; a broken or corrupted bundle, refused "
                "before any compute; a missing optional extra)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); nothing half-written is left behind",
}
# The modules of each optional extra (pyproject.toml), for one line instead of a ModuleNotFoundError.
EXTRA_MODULES = {
    "export": ("torch", "diffusers", "transformers", "onnx", "onnx_graphsurgeon", "safetensors"),
    "tools": ("matplotlib",),
    "train": ("mlxtend",),
}
EXTRA_INSTALL = {
    "export": "install the torch build for this machine, then `pip install 'postdiff[export]'` (README: "
              "Installing elsewhere)",
    "tools": "`pip install 'postdiff[tools]'`",
    "train": "`pip install 'postdiff[train]'`",
}


def _cmd_export(args: argparse.Namespace) -> int:
    """Export a diffusers model to a bundle (needs the [export] extra: torch, diffusers, onnx)."""
    from postdiff.exporter.options import ExportOptions, check_options, parse_resolution

    resolution = parse_resolution(args.resolution) if args.resolution else None
    options = ExportOptions(source=args.model, out=Path(args.out), resolution=resolution, precision=args.precision,
                            schedules=tuple(args.schedule or ()), tuning_space=args.tuning_space,
                            lora=args.lora, lora_scale=args.lora_scale, merged=args.merged)
    check_options(options)  # before torch and diffusers, which take seconds to import
    from postdiff.exporter.export import export_bundle

    started = time.perf_counter()
    manifest = export_bundle(options, progress=not args.quiet)
    worst = max(g.parity.max_abs_diff for g in manifest.graphs.values())
    print(f"wrote {args.out} in {time.perf_counter() - started:.1f} s: {len(manifest.graphs)} graphs "
          f"({', '.join(sorted(manifest.graphs))}); worst parity vs torch {worst:.1e}")
    return EXIT_OK


def _new_file(out: Path, overwrite: bool) -> Path:
    """``--out`` checked before any work: its folder exists, it is not a folder, and it does not
    exist unless ``overwrite``."""
    from postdiff.files import check_new_path

    if out.is_dir():
        raise InputError(f"--out {out} is a folder; name a file to write")
    return check_new_path(out, replace=overwrite)


def _cmd_generate(args: argparse.Namespace) -> int:
    """Generate images from a bundle, torch-free (numpy + onnxruntime): one prompt, or a prompts file,
    and any number of seeds per prompt, all from one load."""
    import numpy as np

    from postdiff.runtime.conditioning import SizeConditioning
    from postdiff.profiles.presets import resolve_schedule
    from postdiff.runtime.batch import batch_requests, generate_batch, output_paths
    from postdiff.runtime.pipeline import GenerateOptions, Pipeline
    from postdiff.runtime.prompts import PromptJob, load_prompts

    if (args.prompt is None) == (args.prompts is None):
        raise InputError("give exactly one of --prompt TEXT or --prompts FILE")
    if args.prompts and args.negative_prompt:
        raise InputError("--negative-prompt goes with --prompt; with --prompts, give each line's negative_prompt "
                         "in the file (JSON Lines)")
    jobs = load_prompts(Path(args.prompts)) if args.prompts else (PromptJob(prompt=args.prompt,
                                                                           negative_prompt=args.negative_prompt),)
    schedule = resolve_schedule(args.schedule) if args.schedule else None
    if schedule is not None and args.steps is not None and args.steps != len(schedule.steps):
        raise InputError(f"--steps {args.steps} contradicts schedule '{schedule.name}', which has "
                         f"{len(schedule.steps)} steps; drop --steps (the schedule fixes them)")
    steps = len(schedule.steps) if schedule else (20 if args.steps is None else args.steps)
    base = GenerateOptions(prompt=jobs[0].prompt, seed=args.seed, steps=steps,  # checked before the bundle loads;
                           guidance=0.0 if args.guidance is None else args.guidance,  # the default guidance is
                           scheduler=args.scheduler)  # the bundle's
    base.validate()
    sizes = SizeConditioning(original_size=args.original_size, crop_top_left=args.crop_top_left or (0, 0),
                             target_size=args.target_size)
    sizes.validate()
    requests = batch_requests(jobs, base, args.num_images)
    paths = output_paths(Path(args.out), len(requests), args.overwrite)
    if len(requests) > 1 and (args.latents or args.save_latents):
        raise InputError("--latents and --save-latents take one image; drop them, or --prompts/--num-images")
    latents = _load_latents(Path(args.latents)) if args.latents else None
    if args.save_latents:
        _new_file(Path(args.save_latents), args.overwrite)
    pipeline = Pipeline(Path(args.bundle), provider=args.provider, verify=not args.no_verify,
                        memory_budget_mb=args.memory_budget, precision=args.precision)
    guidance = pipeline.manifest.model.default_guidance if args.guidance is None else args.guidance
    if pipeline.manifest.sdxl is None and sizes != SizeConditioning():
        raise InputError("--original-size / --crop-top-left / --target-size are SDXL's size conditioning; this "
                         "bundle's model has none: drop them")
    requests = [GenerateOptions(prompt=r.prompt, negative_prompt=r.negative_prompt, seed=r.seed, steps=r.steps,
                                guidance=guidance, scheduler=r.scheduler, sizes=sizes) for r in requests]
    if schedule is None:
        default = pipeline.default_schedule(guidance)
        if default is not None:
            schedule = resolve_schedule(default)
            print(f"running schedule '{default}': the bundle has no plain-generation graph, and '{default}' is "
                  "the first schedule it was exported for (choose with --schedule)", file=sys.stderr)
            if args.steps is not None and args.steps != len(schedule.steps):
                raise InputError(f"--steps {args.steps} contradicts schedule '{default}' ({len(schedule.steps)} "
                                 "steps), the only kind this bundle can run; drop --steps")
    started = time.perf_counter()
    if latents is not None or args.save_latents:
        result = pipeline.generate(requests[0], latents=latents, progress=not args.quiet, schedule=schedule)
        from postdiff.runtime.image import save_image

        save_image(result.image, paths[0])
        if args.save_latents:
            np.save(args.save_latents, result.latents)
        written = paths
    else:
        written = generate_batch(pipeline, requests, paths, schedule=schedule, progress=not args.quiet)
    elapsed = time.perf_counter() - started
    ran = f"schedule '{schedule.name}'" if schedule is not None else \
        f"plain generation ({steps} steps, {'guided' if guidance > 1 else 'guidance off, batch 1'})"
    where = written[0] if len(written) == 1 else f"{len(written)} images {written[0]} ... {written[-1]}"
    precisions = ", ".join(sorted(set(pipeline.precisions.values()))) or "-"
    print(f"wrote {where} with {ran} in {elapsed:.2f} s ({len(written) / elapsed:.2f} images/s, "
          f"{args.provider} {precisions}); "
          f"first UNet call {pipeline.timings.get('load_s', float('nan')):.2f} s after process start "
          f"(verify {pipeline.timings['verify_s']:.2f} s); opening sessions took "
          f"{pipeline.timings['sessions_s']:.2f} s in all, later phases' included")
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    """Hash every file of a bundle against its manifest and record the result in the bundle's stamp
    (verified.json), so that later loads re-hash only the files whose size or mtime changed."""
    from postdiff.errors import CorruptBundleError, VerificationError
    from postdiff.runtime.manifest import load_manifest
    from postdiff.runtime.stamp import STAMP_NAME, verify_bundle

    bundle = Path(args.bundle)
    manifest = load_manifest(bundle, verify=False)
    started = time.perf_counter()
    try:
        result = verify_bundle(bundle, manifest, use_stamp=False)
    except CorruptBundleError as exc:  # the check this command exists for failed: exit 1, not bad usage
        raise VerificationError(str(exc)) from None
    stamp = f"recorded in {bundle / STAMP_NAME}" if result.stamp_written else \
        f"not recorded: {bundle} is read-only (loads will hash again; see --no-verify)"
    print(f"verified {result.checked} files of {bundle} in {time.perf_counter() - started:.1f} s; {stamp}")
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
    from postdiff.files import check_new_path
    from postdiff.tools.explain import format_table
    from postdiff.runtime.jsonio import write_json_atomic
    from postdiff.runtime.manifest import load_manifest
    from postdiff.profiles.schedule_builder import build_schedule, knobs_from_flags

    if args.out is None and not args.explain:
        raise InputError("nothing to do: give --out SCHEDULE.json to write the schedule, and/or --explain")
    out = check_new_path(Path(args.out), replace=True) if args.out else None
    knobs, name, description = knobs_from_flags(
        preset=args.preset, steps=args.steps, low_res=args.low_res, deepcache_interval=args.deepcache_interval,
        deepcache_branch=args.deepcache_branch, deepcache_nonuniform=args.deepcache_nonuniform,
        xattn_gate=args.xattn_gate, xattn_mode=args.xattn_mode, guidance_embedding=args.guidance_embedding,
        bf16=args.bf16)
    schedule = build_schedule(knobs, args.name or name, description)
    manifest = load_manifest(Path(args.bundle), verify=False) if args.bundle else None
    if args.device and manifest is None:
        raise InputError("--device needs --bundle (the bundle the device profile was measured on)")
    if args.explain:
        from postdiff.profiles.device import load_device_profile

        profile = load_device_profile(Path(args.device)) if args.device else None
        print(format_table(schedule, manifest, profile, run_precision=args.precision))
    if out is not None:
        write_json_atomic(out, schedule)
        print(f"wrote {out}")
    return EXIT_OK


def _cmd_compile(args: argparse.Namespace) -> int:
    """Build the TensorRT engines a bundle's schedules run into BUNDLE/engines/ (listed in engines.json;
    an engine whose cache key is unchanged is reused, so a second run builds nothing). The UNet becomes
    one engine from the merged graph (`export --merged`): its cache roles are If branches and every
    resolution and batch is an optimization profile, so the weights are held once. Where to run it:
    --backend tensorrt (Jetson, any TensorRT 10 GPU) builds for the GPU it runs on, so run it on the
    device itself; --backend tensorrt-rtx (RTX GPUs) builds anywhere, even without a GPU, for the
    compute capability --sm names (75, 80, 86, 89, 120, 121)."""
    from postdiff.profiles.presets import resolve_schedule
    from postdiff.tools.compile import CompileOptions, compile_bundle

    options = CompileOptions(bundle=Path(args.bundle), backend=args.backend, sm=args.sm,
                             schedules=tuple(resolve_schedule(s) for s in args.schedule or ()), unet=args.unet,
                             opt_level=args.opt_level, profiles=args.profiles)
    started = time.perf_counter()
    report = compile_bundle(options, progress=not args.quiet)
    for name, entry in sorted(report.index.engines.items()):
        state = "built" if name in report.built else "reused"
        print(f"{state:6} {entry.file}: {entry.bytes / 1e6:.1f} MB, serves {len(entry.serves)} variant(s)"
              + (f", {len(entry.profiles)} profile(s)" if entry.profiles else "")
              + (f", {entry.build_seconds:.1f} s" if state == "built" else ""))
    print(f"{report.index.backend} {report.index.backend_version} for {report.index.target}: built "
          f"{len(report.built)}, reused {len(report.reused)} in {time.perf_counter() - started:.1f} s; "
          f"see {Path(args.bundle) / 'engines' / 'engines.json'}")
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    """Check a GPU provider against ONNX Runtime CPU on this machine: every graph on the same seeded
    inputs (max abs/rel difference, fp32 and fp16 tolerances), the bundle's schedules end to end,
    per-graph latency and peak device memory. Needs a CUDA GPU; exit 1 if anything is out of tolerance."""
    from postdiff.tools.check import check_bundle, format_report

    print(format_report(check_bundle(Path(args.bundle), args.provider, progress=not args.quiet)))
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    """Time diffusers against the runtime on the 20-step baseline, and the runtime's baseline against
    faster schedules, in one run on this machine: median wall time, time inside graphs, the runtime's
    own overhead, speed-ups, peak memory per row, the final-latent difference from diffusers, and
    with --device the predicted latency and its error."""
    from postdiff.runtime.jsonio import write_json_atomic
    from postdiff.tools.bench import BenchOptions, bench, format_report

    resolution = None
    if args.resolution:  # the exporter (and torch) only when there is something to export
        from postdiff.exporter.options import parse_resolution

        resolution = parse_resolution(args.resolution)
    options = BenchOptions(
        model=args.model, bundle=Path(args.bundle) if args.bundle else None,
        schedules=tuple(args.schedule or ("postdiff-sd15",)), baseline=args.baseline, resolution=resolution,
        scheduler=args.scheduler,
        seed=args.seed, repeats=args.repeats, weights=args.weights, diffusers=not args.no_diffusers,
        device=Path(args.device) if args.device else None, prompt=args.prompt, memory_budget_mb=args.memory_budget,
        unet=args.unet, providers=tuple(args.provider or (DEFAULT_PROVIDER,)), precisions=tuple(args.precision or (AUTO_PRECISION,)))
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
                             progress=not args.quiet, precision=args.precision,
                             memory_budget_mb=args.memory_budget)
    write_json_atomic(out, profile)
    print(format_profile(profile))
    print(f"wrote {out}")
    return EXIT_OK


def _cmd_tune(args: argparse.Namespace) -> int:
    """Pick the schedule with the best images within a latency budget on a device: predict every
    candidate's latency from the device profile, measure fidelity on calibration samples against the
    20-step baseline, and write the chosen schedule plus frontier.json and frontier.png beside it."""
    from postdiff.tools.tune import TuneOptions, format_summary, tune
    from postdiff.tools.tune_ray import RayOptions

    if args.ray is None and (args.ray_bundle is not None or args.ray_cpus is not None):
        raise InputError("--ray-bundle and --ray-cpus only apply with --ray [ADDRESS]; add --ray or drop them")
    ray = None if args.ray is None else RayOptions(address=args.ray, bundle=args.ray_bundle or "shared",
                                                   cpus=args.ray_cpus)
    options = TuneOptions(bundle=Path(args.bundle), device=Path(args.device), out=Path(args.out),
                          budget_ms=args.budget_ms, speedup=args.speedup, calib=args.calib, workers=args.workers,
                          scheduler=args.scheduler, timing_runs=args.timing_runs, slack=args.slack,
                          cache=Path(args.cache) if args.cache else None, ray=ray,
                          precision_space=args.precision_space)
    print(format_summary(tune(options, progress=not args.quiet)))
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    """Fewer steps or cheaper steps? Export a model, run baseline / fewer-steps / postdiff on the same
    seeds, and report latency, speed-up, MACs and fidelity (writes grid.png and results.json)."""
    from postdiff.tools.demo import DemoOptions, run_demo

    run_demo(DemoOptions(model=args.model, out=Path(args.out), samples=args.samples), progress=not args.quiet)
    return EXIT_OK


def _add_provider_flags(parser: argparse.ArgumentParser) -> None:
    """--provider (choices from the provider registry) and --precision, shared by the device commands."""
    parser.add_argument("--provider", default=DEFAULT_PROVIDER, choices=provider_names(),
                        help=f"backend and device (default: {DEFAULT_PROVIDER}). {providers_help()}")
    parser.add_argument("--precision", default=AUTO_PRECISION, choices=RUNTIME_PRECISIONS,
                        help="inference precision (default auto: the graphs' own under ONNX Runtime, the CPU's "
                             "fastest under OpenVINO -- bf16 where the CPU has it); bf16 needs --provider openvino")


def _budget_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory-budget", type=float, metavar="MB",
                        help="open only the graphs of the current phase (text encoder, each stretch of UNet steps, "
                             "decoder) and release the rest; refuse, before any compute, a run whose largest phase "
                             "is estimated above MB (weights + graph inputs/outputs + what is resident already)")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used to render --help). Choices come from the registries."""
    from postdiff.exporter.options import BUILTIN_SPECS, PRECISIONS
    from postdiff.profiles.presets import preset_names
    from postdiff.runtime.engines import BACKENDS
    from postdiff.runtime.executor import UNET_FORMS
    from postdiff.runtime.schedule import XATTN_MODES
    from postdiff.profiles.schedule_builder import BF16_POLICIES
    from postdiff.runtime.schedulers import SCHEDULERS
    from postdiff.tools.bench import WEIGHT_MODES

    models = ", ".join(BUILTIN_SPECS)
    epilog = "exit status: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items())
    parser = argparse.ArgumentParser(
        prog="postdiff",
        description="Edge deployment compiler for diffusion models: export a diffusers model to an ONNX "
                    "bundle on a workstation, then generate with it torch-free on the device.",
        epilog=epilog,
    )
    parser.add_argument("--version", action="version", version=f"postdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    export = sub.add_parser("export", help=_cmd_export.__doc__, description=_cmd_export.__doc__)
    export.add_argument("model", help=f"local diffusers folder (SD 1.x/2.x, SDXL or PixArt-alpha layout) or a built-in spec: "
                                      f"{models} (digits is the embedded MNIST model; random:sdxl-slim is SDXL's "
                                      "layout at 1/5 width, the benchmark model; random:sdxl the full SDXL "
                                      "architecture: a workstation export, docs/sdxl.md; random:pixart-slim is "
                                      "PixArt-alpha's layout at 1/4 width, docs/pixart.md)")
    export.add_argument("--out", required=True, help="bundle folder to create (must not exist)")
    export.add_argument("--resolution", metavar="HxW", help="image size in pixels (default: the model's)")
    export.add_argument("--precision", default="fp32", choices=PRECISIONS, help="graph precision")
    export.add_argument("--schedule", action="append", metavar="SCHEDULE",
                        help="schedule file or preset whose graph variants to export (repeatable; default: only "
                             "the plain full-resolution graph)")
    export.add_argument("--tuning-space", action="store_true",
                        help="also export every graph variant the candidates of `postdiff tune` need")
    export.add_argument("--lora", metavar="PATH",
                        help="LoRA .safetensors file (diffusers/PEFT or kohya format, e.g. LCM-LoRA) to fuse into the "
                             "exported weights")
    export.add_argument("--lora-scale", type=float, default=1.0, metavar="S",
                        help="strength of the fused LoRA, as diffusers' fuse_lora(lora_scale=S) (default: 1.0)")
    export.add_argument("--merged", action="store_true",
                        help="also export the merged UNet graph: every variant as an If branch over one set of "
                             "weights, batch and spatial sides free; `postdiff compile` builds TensorRT engines "
                             "from it that hold the weights once (docs/tensorrt.md)")
    export.add_argument("--quiet", action="store_true", help="no progress bar")
    export.set_defaults(handler=_cmd_export)

    gen = sub.add_parser("generate", help=_cmd_generate.__doc__, description=_cmd_generate.__doc__)
    gen.add_argument("bundle", help="bundle folder written by `postdiff export`")
    gen.add_argument("--prompt", help="text prompt (or --prompts)")
    gen.add_argument("--prompts", metavar="FILE",
                     help="prompts file, UTF-8: one prompt per line, or JSON Lines with prompt, negative_prompt "
                          "(optional) and seed (optional) per line; every image from one load")
    gen.add_argument("--num-images", type=int, default=1, metavar="N",
                     help="images per prompt, on consecutive seeds from --seed or the line's seed (default: 1); "
                          "several images are written as OUT-000.png, OUT-001.png ...")
    gen.add_argument("--negative-prompt", default="", help="negative prompt of --prompt (default: empty)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the initial noise, >= 0 (default: 0)")
    gen.add_argument("--steps", type=int, help="denoising steps of plain generation (default: 20)")
    gen.add_argument("--schedule", metavar="SCHEDULE",
                     help="schedule file or preset to execute (e.g. postdiff-sd15); the bundle must have been "
                          "exported with it (default: plain generation where the bundle has its graph, else the "
                          "first schedule the bundle was exported for)")
    gen.add_argument("--guidance", type=float,
                     help="classifier-free guidance scale; <= 1 turns guidance off (default: the model's, "
                          "7.5 for Stable Diffusion)")
    gen.add_argument("--scheduler", choices=list(SCHEDULERS),
                     help="sampler (default: the one the model ships, recorded in the bundle; an error naming "
                          "the supported ones if postdiff does not port it)")
    _add_provider_flags(gen)
    gen.add_argument("--original-size", type=_pixel_pair, metavar="HxW",
                     help="SDXL: original size conditioning in pixels (default: the image size)")
    gen.add_argument("--crop-top-left", type=_pixel_pair, metavar="YxX",
                     help="SDXL: crop top-left conditioning in pixels (default: 0x0)")
    gen.add_argument("--target-size", type=_pixel_pair, metavar="HxW",
                     help="SDXL: target size conditioning in pixels (default: the image size; a low-resolution "
                          "stage carries it scaled to its own size, docs/sdxl.md)")
    gen.add_argument("--unet", default="auto", choices=UNET_FORMS,
                     help="UNet form to run: per-variant graphs or the merged graph of `export --merged` "
                          "(default auto: per-variant graphs where the bundle has them)")
    gen.add_argument("--latents", metavar="NPY", help="initial latents (1, C, h, w) float32 instead of seeded noise")
    gen.add_argument("--save-latents", metavar="NPY", help="also save the final latents")
    gen.add_argument("--out", required=True, help="image file to write: .png, or .jpg/.jpeg (JPEG quality 95)")
    gen.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _budget_flag(gen)
    gen.add_argument("--no-verify", action="store_true",
                     help="skip checking the bundle's files against their sha256 (for read-only media verified "
                          "elsewhere); by default only files changed since `postdiff verify` are hashed")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(handler=_cmd_generate)

    ver = sub.add_parser("verify", help=_cmd_verify.__doc__, description=_cmd_verify.__doc__)
    ver.add_argument("bundle", help="bundle folder written by `postdiff export`")
    ver.set_defaults(handler=_cmd_verify)

    comp = sub.add_parser("compile", help=_cmd_compile.__doc__.split(". ")[0], description=_cmd_compile.__doc__)
    comp.add_argument("bundle", help="bundle folder written by `postdiff export` (with --merged for one UNet engine)")
    comp.add_argument("--backend", default="tensorrt", choices=list(BACKENDS),
                      help="tensorrt: TensorRT 10 (Jetson's JetPack, datacenter GPUs), on the device; tensorrt-rtx: "
                           "TensorRT-RTX (pip install 'postdiff[tensorrt-rtx]'), anywhere with --sm (default: tensorrt)")
    comp.add_argument("--sm", type=int, metavar="CC",
                      help="compute capability to build for, tensorrt-rtx only: 75, 80, 86, 89, 120, 121 "
                           "(e.g. 86 = RTX 30xx/A-series)")
    comp.add_argument("--schedule", action="append", metavar="SCHEDULE",
                      help="schedule (preset or file) whose variants the engines serve; repeatable (default: every "
                           "UNet variant the bundle holds, i.e. those of the schedules it was exported for)")
    comp.add_argument("--unet", default="auto", choices=UNET_FORMS,
                      help="merged: one UNet engine from the merged graph; variants: one engine per UNet graph, "
                           "each with its own copy of the weights (default auto: merged when the bundle has it)")
    comp.add_argument("--opt-level", type=int, metavar="N",
                      help="TensorRT builder optimization level 0-5: lower builds faster, runs slower (default: the "
                           "builder's, 3); part of the cache key")
    comp.add_argument("--profiles", default="static", choices=["static", "batch", "one"],
                      help="the merged UNet engine's optimization profiles: static: one per (resolution, batch); "
                           "batch: one per batch size, ranged over the resolutions; one: a single ranged profile. "
                           "Fewer profiles, fewer kernels in the engine (docs/tensorrt.md) (default: static)")
    comp.add_argument("--quiet", action="store_true", help="no progress bars")
    comp.set_defaults(handler=_cmd_compile)

    chk = sub.add_parser("check", help=_cmd_check.__doc__.split(": ")[0], description=_cmd_check.__doc__)
    chk.add_argument("bundle", help="bundle folder (for tensorrt: compiled with `postdiff compile` on this machine)")
    chk.add_argument("--provider", required=True, choices=["tensorrt", "cuda"],
                     help="tensorrt: postdiff's TensorRT runner; cuda: ONNX Runtime's CUDA provider")
    chk.add_argument("--quiet", action="store_true", help="no progress bars")
    chk.set_defaults(handler=_cmd_check)

    sched = sub.add_parser("schedule", help=_cmd_schedule.__doc__, description=_cmd_schedule.__doc__)
    sched.add_argument("--preset", help=f"start from a preset ({', '.join(preset_names())}); "
                                        "the other flags override its knobs")
    sched.add_argument("--steps", type=int, help="total denoising steps (default 20)")
    sched.add_argument("--low-res", nargs="+", metavar="SCALE:STEPS",
                       help="low-resolution stages before full resolution, e.g. 0.5:10 or 0.5:6 0.75:4")
    sched.add_argument("--deepcache-interval", type=int, metavar="K",
                       help="write the DeepCache feature every K steps and read it in between (DeepCache's "
                            "cache_interval; 1 = off)")
    sched.add_argument("--deepcache-branch", type=int, metavar="B",
                       help="DeepCache branch (DeepCache's cache_branch_id; 0 = shallowest)")
    sched.add_argument("--deepcache-nonuniform", metavar="C,P",
                       help="DeepCache's non-uniform pattern: writes packed around centre step C with power P, "
                            "e.g. 10,1.4")
    sched.add_argument("--xattn-gate", type=int, metavar="M",
                       help="T-GATE's gate_step: steps 0..M-1 guided, the cross-attention maps written at step M-1, "
                            "guidance off and the maps read from step M")
    sched.add_argument("--xattn-mode", choices=XATTN_MODES, help="keep the conditional maps (PostDiff) or "
                                                                      "their mean with the unconditional (T-GATE)")
    sched.add_argument("--guidance-embedding", action="store_true",
                       help="no classifier-free guidance on any step: for models that take the guidance scale as "
                            "an embedding (LCM), which run one conditional evaluation per step")
    sched.add_argument("--bf16", choices=BF16_POLICIES,
                       help="steps pinned to bf16 (OpenVINO on a CPU with native bfloat16), the others to fp32: all, "
                            "low-res (below full resolution), early (all but the last quarter), reads (DeepCache "
                            "reads); default none: no step pinned")
    sched.add_argument("--name", help="schedule name (default: the preset's, or 'custom')")
    sched.add_argument("--out", metavar="SCHEDULE.json", help="file to write")
    sched.add_argument("--explain", action="store_true",
                       help="print the per-step table (scale, batch, cache roles); MACs and the predicted speed-up "
                            "need --bundle")
    sched.add_argument("--bundle", help="bundle exported with this schedule: adds latent sizes, MACs per step and the "
                                        "predicted speed-up to --explain")
    sched.add_argument("--device", metavar="DEVICE.json",
                       help="device profile of --bundle: adds each evaluation's measured cost at its precision "
                            "and the predicted latency to --explain")
    sched.add_argument("--precision", default=AUTO_PRECISION, choices=RUNTIME_PRECISIONS,
                       help="with --device: the run's --precision, which steps without their own run at "
                            "(default auto: the precision the profile's main timings ran at)")
    sched.set_defaults(handler=_cmd_schedule)

    bench = sub.add_parser("bench", help=_cmd_bench.__doc__, description=_cmd_bench.__doc__)
    bench.add_argument("--model", help=f"model to export and to run in diffusers: {models} "
                                       "or a diffusers folder (default: the bundle's, when it is a built-in)")
    bench.add_argument("--bundle", metavar="DIR",
                       help="bundle to time; if DIR does not exist, --model is exported there with baseline and "
                            "every --schedule (default: a temporary export, deleted afterwards)")
    bench.add_argument("--schedule", action="append", metavar="SCHEDULE",
                       help="schedule (preset or file) to time against the baseline; repeatable "
                            "(default: postdiff-sd15)")
    bench.add_argument("--baseline", default="baseline", metavar="SCHEDULE",
                       help="the reference schedule (preset or file) every row is compared with, and the one "
                            "diffusers runs (default: baseline, 20 guided steps; an LCM model: lcm-4)")
    bench.add_argument("--resolution", metavar="HxW", help="export resolution in pixels (default: the model's)")
    bench.add_argument("--scheduler", choices=list(SCHEDULERS),
                       help="sampler (default: the one the model ships)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: 0)")
    bench.add_argument("--prompt", help="prompt (default: an SD prompt, or a label model's first label)")
    bench.add_argument("--repeats", type=int, default=3,
                       help="timed generations per row after one warm-up; the median counts (default: 3)")
    bench.add_argument("--weights", default="auto", choices=WEIGHT_MODES,
                       help="how UNet sessions hold the weights (default auto: shared when the bundle has several "
                            "UNet graphs, as `postdiff generate` does)")
    bench.add_argument("--unet", default="auto", choices=UNET_FORMS,
                       help="UNet form to time: per-variant graphs or the merged graph of `export --merged` "
                            "(default auto: per-variant graphs where the bundle has them)")
    bench.add_argument("--device", metavar="DEVICE.json",
                       help="device profile of this bundle: adds each row's predicted latency and the "
                            "prediction error (predicted / measured - 1)")
    bench.add_argument("--provider", action="append", choices=provider_names(),
                       help=f"provider to time; repeatable: the first gives the runtime: rows, each further one the "
                            f"baseline and every schedule again, labelled PROVIDER[-PRECISION]:SCHEDULE (default: "
                            f"{DEFAULT_PROVIDER}). {providers_help()}")
    bench.add_argument("--precision", action="append", choices=RUNTIME_PRECISIONS,
                       help="inference precision of the OpenVINO rows; repeatable, one row set each (default: auto, "
                            "the CPU's fastest)")
    bench.add_argument("--no-diffusers", action="store_true", help="skip the diffusers row (no torch needed)")
    bench.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    _budget_flag(bench)
    bench.add_argument("--quiet", action="store_true", help="no progress bars")
    bench.set_defaults(handler=_cmd_bench)

    prof = sub.add_parser("profile", help=_cmd_profile.__doc__, description=_cmd_profile.__doc__)
    prof.add_argument("bundle", help="bundle folder written by `postdiff export`")
    prof.add_argument("--out", required=True, metavar="DEVICE.json", help="device profile to write")
    _add_provider_flags(prof)
    prof.add_argument("--repeats", type=int, default=10, help="timed calls per graph and operation (default: 10)")
    prof.add_argument("--warmup", type=int, default=2, help="untimed calls before them (default: 2)")
    prof.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _budget_flag(prof)
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
    tune.add_argument("--workers", type=int, metavar="W",
                      help="processes measuring fidelity (default: one per CPU); with --ray, Ray workers (default: as "
                           "many as the cluster's CPUs hold)")
    tune.add_argument("--scheduler", choices=list(SCHEDULERS),
                      help="sampler to tune for (default: the one the model ships)")
    tune.add_argument("--timing-runs", type=int, default=5, metavar="R",
                      help="timed generations per candidate for the measured latency (default: 5)")
    tune.add_argument("--precision-space", action="store_true",
                      help="add precision to the candidate space: bf16 on all, the low-resolution, the early or the "
                           "DeepCache-read steps (needs an OpenVINO device profile with bf16 timings; generation "
                           "runs on OpenVINO, fp32 where a step pins nothing)")
    tune.add_argument("--slack", type=float, default=0.5,
                      help="also measure cheaper-steps candidates predicted up to budget x (1 + SLACK) (default: 0.5)")
    tune.add_argument("--cache", metavar="PATH",
                      help="results cache, JSON lines (default: tune-cache.jsonl beside --out); a re-run, or a run "
                           "for another budget, reuses every result in it")
    tune.add_argument("--out", required=True, metavar="SCHEDULE.json",
                      help="chosen schedule to write (frontier.json and frontier.png go beside it)")
    tune.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                      help="score fidelity on Ray workers (needs the [distributed] extra): no ADDRESS starts a local "
                           "Ray instance, `auto` or HOST:6379 / ray://HOST:10001 joins a running cluster. Latency is "
                           "still predicted from --device and measured here; results stream into the same --cache. "
                           "Put --ray after the bundle, or write --ray=ADDRESS")
    tune.add_argument("--ray-bundle", choices=["shared", "store"],
                      help="how the bundle reaches Ray workers: shared (default) = each node opens the same absolute "
                           "path (mount it there), store = shipped once through Ray's object store; either way every "
                           "worker checks its sha256")
    tune.add_argument("--ray-cpus", type=int, metavar="C",
                      help="CPUs (and ONNX Runtime threads) per Ray worker (default: the cluster's CPUs / --workers, "
                           "or 1)")
    tune.add_argument("--quiet", action="store_true", help="no progress bars")
    tune.set_defaults(handler=_cmd_tune)

    demo = sub.add_parser("demo", help=_cmd_demo.__doc__, description=_cmd_demo.__doc__)
    demo.add_argument("--model", default="digits",
                      help=f"model to demo: {models} or a diffusers folder (default: digits, the embedded "
                           "MNIST model)")
    demo.add_argument("--samples", type=int, default=100, help="samples per schedule (default: 100)")
    demo.add_argument("--out", default="postdiff-demo", help="output folder (default: postdiff-demo/)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_cmd_demo)
    for command in sub.choices.values():
        command.epilog = epilog
    return parser


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The one-line fix for a module of an optional extra that is not installed, else None."""
    top = (exc.name or "").split(".")[0]
    for extra, modules in EXTRA_MODULES.items():
        if top in modules:
            return (f"this command needs the [{extra}] extra, which is not installed (no module '{top}'); "
                    f"fix: {EXTRA_INSTALL[extra]}")
    return None


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (``kill``, a service manager, a CI timeout) stops a command as Ctrl-C does: the same
    clean-up runs, so nothing half-written is left behind."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `postdiff` console script; returns one of :data:`EXIT_CODES`."""
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except PostdiffError as exc:
        print(f"postdiff {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        fix = missing_extra(exc)
        if fix is None:
            raise
        print(f"postdiff {args.command}: error: {fix}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"postdiff {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
