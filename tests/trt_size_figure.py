"""The command behind docs/tensorrt.md's merged-engine size table: builds the UNet engine of a bundle
with TensorRT-RTX (no GPU needed) under one set of builder settings and prints one JSON line with
its bytes and build time.

    python tests/trt_size_figure.py --make-narrow MODEL   # SD 1.5's UNet layout at widths 128/256/512/512
    postdiff export MODEL --out B --resolution 256x256 --schedule postdiff-sd15 --schedule baseline --merged
    python tests/trt_size_figure.py B --unet merged --profiles batch [--opt-level 0] \\
        [--max-tactics 1] [--no-jit-conv] [--schedule postdiff-sd15] [--sm 86]

Not a test (pytest collects only test_*.py). Build times depend on the machine's load: say so.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from postdiff.profiles.presets import resolve_schedule
from postdiff.runtime.engines import import_backend
from postdiff.tools.compile import PROFILE_MODES, plan_engines, wanted_variants
from postdiff.runtime.manifest import load_manifest


def make_narrow(out: Path) -> None:
    """A diffusers folder: SD 1.5's UNet layout (layers, attention, cross-attention 768) at block widths
    128/256/512/512 (142 M parameters, 569 MB fp32), a 2-layer CLIP text encoder and a small VAE, random
    weights (seed 0): a model whose UNet weights dominate its engine, small enough to export here."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from postdiff.exporter.models import SD1_SCHEDULER_CONFIG, _text_encoder, build_byte_tokenizer

    torch.manual_seed(0)
    tokenizer = build_byte_tokenizer()
    text_encoder = _text_encoder(tokenizer, vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                 num_attention_heads=12, num_hidden_layers=2, hidden_act="quick_gelu",
                                 projection_dim=768)
    unet = UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(128, 256, 512, 512), cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64, 64),
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, sample_size=256)
    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    text_encoder.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD1_SCHEDULER_CONFIG))
    (out / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))


def main(argv: list[str]) -> int:
    if argv[:1] == ["--make-narrow"] and len(argv) == 2:
        make_narrow(Path(argv[1]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--unet", default="merged", choices=["merged", "variants"])
    parser.add_argument("--graph", help="with --unet variants: the one UNet graph to build (default: the largest)")
    parser.add_argument("--profiles", default="static", choices=PROFILE_MODES)
    parser.add_argument("--schedule", action="append")
    parser.add_argument("--sm", type=int, default=86)
    parser.add_argument("--opt-level", type=int)
    parser.add_argument("--max-tactics", type=int, help="config.max_num_tactics")
    parser.add_argument("--no-jit-conv", action="store_true", help="tactic sources without JIT_CONVOLUTIONS")
    parser.add_argument("--no-edge-conv", action="store_true", help="tactic sources without EDGE_MASK_CONVOLUTIONS")
    parser.add_argument("--tiling", type=int, help="config.tiling_optimization_level")
    parser.add_argument("--keep", help="write the engine here")
    args = parser.parse_args(argv)

    trt = import_backend("tensorrt-rtx")
    bundle = Path(args.bundle)
    manifest = load_manifest(bundle, verify=False)
    schedules = [resolve_schedule(s) for s in args.schedule or ()]
    plans = [p for p in plan_engines(manifest, wanted_variants(manifest, schedules), args.unet, args.profiles)
             if p.graph.startswith("unet")]
    if args.unet == "variants":
        pick = args.graph or max(plans, key=lambda p: (bundle / manifest.graph(p.graph).file).stat().st_size).graph
        plans = [p for p in plans if p.graph == pick]
    plan = plans[0]
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser_ = trt.OnnxParser(network, logger)
    if not parser_.parse_from_file(str((bundle / manifest.graph(plan.graph).file).resolve())):
        print([str(parser_.get_error(i).desc()) for i in range(parser_.num_errors)], file=sys.stderr)
        return 1
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{args.sm}"), 0)
    if args.opt_level is not None:
        config.builder_optimization_level = args.opt_level
    if args.max_tactics is not None:
        config.max_num_tactics = args.max_tactics
    if args.tiling is not None:
        config.tiling_optimization_level = trt.TilingOptimizationLevel(args.tiling)
    sources = config.get_tactic_sources()
    if args.no_jit_conv:
        sources &= ~(1 << int(trt.TacticSource.JIT_CONVOLUTIONS))
    if args.no_edge_conv:
        sources &= ~(1 << int(trt.TacticSource.EDGE_MASK_CONVOLUTIONS))
    config.set_tactic_sources(sources)
    for profile in plan.profiles:
        optimization = builder.create_optimization_profile()
        for name, shapes in profile.shapes.items():
            optimization.set_shape(name, shapes.min, shapes.opt, shapes.max)
        config.add_optimization_profile(optimization)
    started = time.perf_counter()
    blob = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    row = {"graph": plan.graph, "profiles": args.profiles if plan.profiles else "-", "n_profiles": len(plan.profiles),
           "opt_level": args.opt_level, "max_tactics": args.max_tactics, "no_jit_conv": args.no_jit_conv,
           "no_edge_conv": args.no_edge_conv, "tiling": args.tiling,
           "bytes": None if blob is None else memoryview(blob).nbytes, "build_s": round(seconds, 1),
           "weights_bytes": sum((bundle / f).stat().st_size for f in os.listdir(bundle) if f.endswith(".weights")),
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "load": os.getloadavg()[0]}
    if blob is not None and args.keep:
        Path(args.keep).write_bytes(memoryview(blob))
    print(json.dumps(row))
    return 0 if blob is not None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
