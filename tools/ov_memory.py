"""Memory of a schedule's UNet graph set under each backend form: the command behind issue 15's figure.

``python -m postdiff.tools.ov_memory export OUT [--width 0.4] [--resolution 256]`` exports an
SD-1.5-layout model at ``width`` times SD 1.5's channel counts (random weights, a 2-layer text
encoder: the UNet dominates) with the ``postdiff-sd15`` schedule and ``--merged``.

``python -m postdiff.tools.ov_memory measure OUT`` then loads, in a fresh process per form, every UNet
graph that schedule runs, calls each once with zeros, and prints the peak resident set (VmHWM) above the
process's RSS before loading, as a multiple of the bytes of ``unet.weights`` (one copy of the UNet's
weights). Forms: ``ort`` (ONNX Runtime, shared initializers), ``ov-graphs`` (one OpenVINO compiled
model per graph), ``ov-set`` (all graphs in one OpenVINO model, :mod:`~postdiff.runtime.runners.openvino_set`),
``ov-merged`` (OpenVINO on the merged UNet graph, each variant a branch of it), each OpenVINO form at
fp32 and at bf16 where the CPU has it. Memory, not time: it may run on a loaded machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

FORMS = ("ort", "ov-graphs", "ov-set", "ov-merged")
SCHEDULE = "postdiff-sd15"


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def export(out: Path, width: float, resolution: int, merged: bool = True) -> None:
    """Export the reduced-width SD-1.5-layout bundle (workstation side: torch, diffusers)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from postdiff.exporter import export as export_module
    from postdiff.exporter.export import ExportOptions, export_bundle
    from postdiff.exporter.models import SD1_SCHEDULER_CONFIG, _finish, _text_encoder, build_byte_tokenizer

    def reduced(source: str):
        torch.manual_seed(0)
        tokenizer = build_byte_tokenizer()
        text_encoder = _text_encoder(tokenizer, vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                     num_attention_heads=12, num_hidden_layers=2, hidden_act="quick_gelu",
                                     projection_dim=768)
        channels = tuple(max(1, round(c * width / 32)) * 32 for c in (320, 640, 1280, 1280))
        unet = UNet2DConditionModel(sample_size=resolution // 8, in_channels=4, out_channels=4, layers_per_block=2,
                                    block_out_channels=channels, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                            layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, sample_size=resolution, norm_num_groups=8)
        return _finish(f"sd15-layout-{width}x", tokenizer, text_encoder, unet, vae, SD1_SCHEDULER_CONFIG)

    export_module.load_model = reduced  # the exporter's model source, replaced for this script only
    export_bundle(ExportOptions(source="random:sd15", out=out, resolution=(resolution, resolution),
                                schedules=(SCHEDULE,), merged=merged), progress=False)


def measure_one(bundle: Path, form: str, precision: str, schedule_spec: str = SCHEDULE) -> dict:
    """Load the schedule's UNet graphs in ``form`` in this process, call each once; the figures."""
    from postdiff.profiles.presets import resolve_schedule
    from postdiff.runtime.pipeline import Pipeline

    import onnxruntime  # noqa: F401  (the libraries and OpenVINO's CPU plugin are not the graphs' memory)

    if form != "ort":
        from postdiff.runtime.runners.openvino import cpu_precisions

        cpu_precisions()  # loads the CPU plugin
    before = _rss_kb("VmRSS")
    from dataclasses import replace

    schedule = resolve_schedule(schedule_spec)  # every step at this run's precision
    schedule = replace(schedule, steps=tuple(replace(step, precision="auto") for step in schedule.steps))
    if form == "ov-merged":  # the runtime refuses this form (wrong results, docs/openvino.md): built by hand
        from postdiff.runtime.executor import resolve_graphs
        from postdiff.runtime.manifest import load_manifest
        from postdiff.runtime.runners.branch import BranchRunner
        from postdiff.runtime.runners.openvino import OpenVinoRunner

        manifest = load_manifest(bundle, verify=False)
        merged = OpenVinoRunner(manifest.graph(manifest.merged_unet), bundle, precision)
        runners = [BranchRunner(merged, ref.served) for ref in resolve_graphs(manifest, schedule, "merged").values()]
        ran = [merged.precision]
    else:
        provider = "cpu" if form == "ort" else "openvino"
        pipeline = Pipeline(bundle, provider=provider, precision="auto" if form == "ort" else precision,
                            shared_weights=form != "ov-graphs", unet="variants")
        executor = pipeline.executor(schedule)
        runners = [executor.runner_for(variant) for variant in executor.variants]
        ran = sorted(set(pipeline.precisions.values()))
    for runner in runners:
        runner.infer({t.name: np.zeros(t.shape, t.dtype) for t in runner.spec.inputs})
    weights = (bundle / "unet.weights").stat().st_size
    peak = (_rss_kb("VmHWM") - before) * 1024
    now = (_rss_kb("VmRSS") - before) * 1024
    return {"form": form, "precision": ran, "graphs": len(runners), "weights_mb": round(weights / 2**20, 1),
            "peak_above_start_mb": round(peak / 2**20, 1), "x_weights_peak": round(peak / weights, 2),
            "held_after_calls_mb": round(now / 2**20, 1), "x_weights_held": round(now / weights, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export")
    exp.add_argument("out", type=Path)
    exp.add_argument("--width", type=float, default=0.4)
    exp.add_argument("--resolution", type=int, default=256)
    exp.add_argument("--no-merged", action="store_true",
                     help="skip the merged UNet graph (a cheaper export; the ov-merged form then reports an error)")
    mea = sub.add_parser("measure")
    mea.add_argument("bundle", type=Path)
    mea.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    mea.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    mea.add_argument("--schedule", default=SCHEDULE, help=f"schedule whose graphs are loaded (default {SCHEDULE})")
    one = sub.add_parser("one")  # one measurement, in its own process (what `measure` runs)
    one.add_argument("bundle", type=Path)
    one.add_argument("form", choices=FORMS)
    one.add_argument("precision")
    one.add_argument("--schedule", default=SCHEDULE)
    args = parser.parse_args()
    if args.command == "export":
        export(args.out, args.width, args.resolution, merged=not args.no_merged)
    elif args.command == "one":
        print(json.dumps(measure_one(args.bundle, args.form, args.precision, args.schedule)))
    else:
        for form in args.forms:
            for precision in (["fp32"] if form == "ort" else args.precisions):
                run = subprocess.run([sys.executable, "-m", "postdiff.tools.ov_memory", "one", str(args.bundle), form,
                                      precision, "--schedule", args.schedule], capture_output=True, text=True, env={**os.environ})
                if run.returncode:
                    print(json.dumps({"form": form, "precision": precision,
                                      "error": run.stderr.strip().splitlines()[-1:]}))
                else:
                    print(run.stdout.strip())


if __name__ == "__main__":
    main()
