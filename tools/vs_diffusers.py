"""Time one generation through the postdiff runtime and through diffusers, in the same run.

    python -m postdiff.tools.vs_diffusers BUNDLE --model MODEL [--steps 20] [--scheduler ddim] [--json OUT]

Both sides start from the same initial latents; the final-latent difference is reported with the
times, so a speed figure never hides a wrong result. Model load and graph-session creation are
excluded from the timings (one warm-up text encoding is done on each side).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m postdiff.tools.vs_diffusers", description=__doc__.split("\n")[1])
    parser.add_argument("bundle")
    parser.add_argument("--model", required=True, help="the model the bundle was exported from")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scheduler", default="ddim", choices=["ddim", "dpmpp-2m", "euler"])
    parser.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)

    from postdiff.runtime.pipeline import GenerateOptions, Pipeline

    pipeline = Pipeline(Path(args.bundle))
    options = GenerateOptions(prompt=args.prompt, seed=0, steps=args.steps, scheduler=args.scheduler)
    latents = pipeline.initial_latents(0)
    for name in pipeline.manifest.graphs:
        pipeline.runner(name)
    started = time.perf_counter()
    ours = pipeline.generate(options, latents=latents)
    runtime_s = time.perf_counter() - started

    import torch
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    from postdiff.exporter.models import load_model

    classes = {"ddim": DDIMScheduler, "dpmpp-2m": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}
    model = load_model(args.model)
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=classes[args.scheduler].from_config(model.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    manifest = pipeline.manifest
    with torch.no_grad():
        started = time.perf_counter()
        theirs = pipe(args.prompt, height=manifest.model.height, width=manifest.model.width,
                      num_inference_steps=args.steps, guidance_scale=options.guidance,
                      latents=torch.from_numpy(latents), output_type="latent").images
        decoded = model.vae.decode(theirs / model.vae.config.scaling_factor, return_dict=False)[0]
        diffusers_s = time.perf_counter() - started
    figures = {
        "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
        "model": args.model, "resolution": f"{manifest.model.height}x{manifest.model.width}", "steps": args.steps,
        "scheduler": args.scheduler, "runtime_s": round(runtime_s, 2), "diffusers_s": round(diffusers_s, 2),
        "speedup_vs_diffusers": round(diffusers_s / runtime_s, 3),
        "final_latents_max_abs_diff": float(np.max(np.abs(ours.latents - theirs.numpy()))),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }
    del decoded
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
