"""Memory of a schedule's UNet graph set under each backend form: the command behind issue 15's figure.

``python -m postdiff.tools.ov_memory export OUT [--width 0.4] [--resolution 256]`` exports an
SD-1.5-layout model at ``width`` times SD 1.5's channel counts (random weights, a 2-layer text
encoder: the UNet dominates) with the ``postdiff-sd15`` and ``baseline`` schedules and ``--merged``.

``python -m postdiff.tools.ov_memory measure OUT`` then loads, in a fresh process per form, every UNet
graph that schedule runs, calls each once with zeros, and prints the peak resident set (VmHWM) above the
process's RSS before loading, as a multiple of the bytes of ``unet.weights`` (one copy of the UNet's
weights), and the same for what it holds after the calls: all of it (VmRSS) and its private part
(RssAnon; the rest is file-backed: pages of the weights file OpenVINO maps, which the kernel may drop
and read again), and the private part once the graphs are loaded, before any call. ``--graphs NAME ...``
measures exactly those UNet graphs of the manifest as one OpenVINO variant set (``--forms ov-set``):
which graphs add memory to the set, and how much. ``--limit X`` runs each form in a memory cgroup (v1 or v2;
needs write access to the process's own cgroup) that lets it allocate, once its libraries are loaded,
``X`` times the weights more, page cache included (at the limit the kernel first drops clean file
pages): a form that fits completes, with the major page faults of a second round of calls (weights
read back from the file during inference), and one that does not is killed by the kernel and
reported as such (as is one still running after two minutes: near its limit a form can re-read
weights without end). Forms: ``ort`` (ONNX Runtime, shared initializers), ``ov-graphs`` (one OpenVINO
compiled model per graph), ``ov-set`` (all graphs in one OpenVINO model, :mod:`~postdiff.runtime.runners.openvino_set`),
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

from postdiff.errors import InputError

FORMS = ("ort", "ov-graphs", "ov-set", "ov-merged")
SCHEDULE = "postdiff-sd15"
LIMIT_TIMEOUT_S = 120  # a form under --limit that has not finished by then is thrashing: reported as not fitting


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _own_memory_cgroup() -> tuple[Path, str]:
    """This process's memory cgroup directory and its limit file (cgroup v1 or v2)."""
    entries = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
    for _, controllers, path in entries:  # a v1 memory hierarchy first (hybrid systems have both)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "memory.limit_in_bytes"
    for number, _, path in entries:
        if number == "0":
            return Path("/sys/fs/cgroup") / path.lstrip("/"), "memory.max"
    raise InputError("--limit: this process is in no memory cgroup (/proc/self/cgroup); run without --limit")


def _enter_limited_cgroup(allowance: int) -> None:
    """Move this process into a new child of its memory cgroup that lets it charge ``allowance`` more bytes.

    Pages the process already holds stay charged to the old cgroup (neither cgroup version moves them),
    so everything the child is charged for -- anonymous memory and page cache alike -- is new.
    """
    parent, limit_file = _own_memory_cgroup()
    child = parent / f"postdiff-ov-memory-{os.getpid()}"
    try:
        child.mkdir()
        if limit_file == "memory.limit_in_bytes":
            (child / "memory.swappiness").write_text("0")  # no swap: the limit is memory, not memory + swap
        else:
            (child / "memory.swap.max").write_text("0")
        (child / "cgroup.procs").write_text(str(os.getpid()))
        usage = child / ("memory.usage_in_bytes" if limit_file == "memory.limit_in_bytes" else "memory.current")
        (child / limit_file).write_text(str(int(usage.read_text()) + allowance))
    except OSError as exc:
        raise InputError(f"--limit: cannot create a memory cgroup under {parent} ({exc}); "
                         "run as a user who may, or without --limit") from None


def _drop_cached(bundle: Path) -> None:
    """Ask the kernel to drop the bundle's files from the page cache, so that this process's reads of
    them are charged to its cgroup (a cached page stays charged to whoever first read it)."""
    for path in bundle.iterdir():
        if path.is_file():
            with path.open("rb") as file:
                os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


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
        # SD's VAE factor of 8 (four blocks: three downsamplings), so the latents are SD's at this resolution
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64, 64),
                            layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=resolution, norm_num_groups=8)
        return _finish(f"sd15-layout-{width}x", tokenizer, text_encoder, unet, vae, SD1_SCHEDULER_CONFIG)

    export_module.load_model = reduced  # the exporter's model source, replaced for this script only
    export_bundle(ExportOptions(source="random:sd15", out=out, resolution=(resolution, resolution),
                                schedules=(SCHEDULE, "baseline"), merged=merged), progress=False)


def measure_one(bundle: Path, form: str, precision: str, schedule_spec: str = SCHEDULE,
                limit_x: float | None = None, graphs: list[str] | None = None) -> dict:
    """Load the schedule's UNet graphs (or ``graphs``, as an ov-set) in ``form`` in this process, call
    each once; the figures.

    With ``limit_x``, first move this process into a memory cgroup that lets it allocate ``limit_x``
    times the weights more, page cache included (the kernel kills it if the form does not fit).
    """
    import resource
    from postdiff.profiles.presets import resolve_schedule
    from postdiff.runtime.pipeline import Pipeline

    import onnxruntime  # noqa: F401  (the libraries and OpenVINO's CPU plugin are not the graphs' memory)

    if form != "ort":
        from postdiff.runtime.runners.openvino import cpu_precisions

        cpu_precisions()  # loads the CPU plugin
    before, anon_before = _rss_kb("VmRSS"), _rss_kb("RssAnon")
    weights = (bundle / "unet.weights").stat().st_size
    if limit_x is not None:
        _enter_limited_cgroup(int(limit_x * weights))
        _drop_cached(bundle)
    from dataclasses import replace

    schedule = resolve_schedule(schedule_spec)  # every step at this run's precision
    schedule = replace(schedule, steps=tuple(replace(step, precision="auto") for step in schedule.steps))
    if graphs:  # exactly these UNet graphs as one variant set (which graphs add memory, and how much)
        from postdiff.runtime.manifest import load_manifest
        from postdiff.runtime.runners.openvino_set import OpenVinoVariantSet

        if form != "ov-set":
            raise InputError(f"--graphs is measured as the ov-set form, not {form}; add --forms ov-set")
        variant_set = OpenVinoVariantSet(bundle, load_manifest(bundle, verify=False), graphs, precision)
        runners = [variant_set.runner(name) for name in graphs]
        ran = [variant_set.precision]
    elif form == "ov-merged":  # the runtime refuses this form (wrong results, docs/openvino.md): built by hand
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
    def call_each() -> None:
        for runner in runners:
            runner.infer({t.name: np.zeros(t.shape, t.dtype) for t in runner.spec.inputs})

    loaded = (_rss_kb("RssAnon") - anon_before) * 1024  # what compiling took: weights packed before any call
    call_each()
    peak = (_rss_kb("VmHWM") - before) * 1024
    now = (_rss_kb("VmRSS") - before) * 1024
    anon = (_rss_kb("RssAnon") - anon_before) * 1024
    figures = {"form": form, "precision": ran, "graphs": len(runners), "weights_mb": round(weights / 2**20, 1),
               "peak_above_start_mb": round(peak / 2**20, 1), "x_weights_peak": round(peak / weights, 2),
               "held_after_calls_mb": round(now / 2**20, 1), "x_weights_held": round(now / weights, 2),
               "x_weights_held_private": round(anon / weights, 2),
               "x_weights_private_after_loading": round(loaded / weights, 2)}
    if limit_x is not None:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        call_each()
        figures.update(limit_x=limit_x, fits=True,
                       major_faults_second_round=resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults)
    return figures


def _remove_cgroup(pid: int) -> None:
    """Remove the cgroup a finished ``one --limit`` process ``pid`` made (if it made one)."""
    try:
        child = _own_memory_cgroup()[0] / f"postdiff-ov-memory-{pid}"
        if child.is_dir():
            child.rmdir()
    except (InputError, OSError):
        pass  # nothing made, or nothing we may remove: the kernel keeps an empty cgroup harmlessly


def _run_one(command: list[str], form: str, precision: str, limit_x: float | None) -> str:
    """Run one ``one`` measurement process; its JSON line, or one saying why it gave none."""
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    failed = {"form": form, "precision": precision}
    try:
        stdout, stderr = run.communicate(timeout=None if limit_x is None else LIMIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:  # near its limit a form can thrash (weights read back) for ever
        run.kill()
        run.communicate()
        return json.dumps({**failed, "limit_x": limit_x, "fits": False,
                           "error": f"not done after {LIMIT_TIMEOUT_S} s under the limit (thrashing)"})
    finally:
        if limit_x is not None:
            _remove_cgroup(run.pid)
    if run.returncode == -9 and limit_x is not None:
        return json.dumps({**failed, "limit_x": limit_x, "fits": False,
                           "error": "killed by the kernel: does not fit under the limit"})
    if run.returncode:
        return json.dumps({**failed, "error": stderr.strip().splitlines()[-1:]})
    return stdout.strip()


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
    mea.add_argument("--limit", type=float, metavar="X",
                     help="run each form in a memory cgroup that lets it allocate X times the weights beyond its libraries")
    mea.add_argument("--graphs", nargs="+", metavar="NAME",
                     help="measure exactly these UNet graphs of the manifest as one variant set (with --forms ov-set)")
    one = sub.add_parser("one")  # one measurement, in its own process (what `measure` runs)
    one.add_argument("bundle", type=Path)
    one.add_argument("form", choices=FORMS)
    one.add_argument("precision")
    one.add_argument("--schedule", default=SCHEDULE)
    one.add_argument("--limit", type=float, metavar="X")
    one.add_argument("--graphs", nargs="+", metavar="NAME")
    args = parser.parse_args()
    if args.command == "export":
        export(args.out, args.width, args.resolution, merged=not args.no_merged)
    elif args.command == "one":
        print(json.dumps(measure_one(args.bundle, args.form, args.precision, args.schedule, args.limit, args.graphs)))
    else:
        for form in args.forms:
            for precision in (["fp32"] if form == "ort" else args.precisions):
                command = [sys.executable, "-m", "postdiff.tools.ov_memory", "one", str(args.bundle), form, precision,
                           "--schedule", args.schedule] + ([] if args.limit is None else ["--limit", str(args.limit)])
                command += ["--graphs", *args.graphs] if args.graphs else []
                print(_run_one(command, form, precision, args.limit))


if __name__ == "__main__":
    main()
