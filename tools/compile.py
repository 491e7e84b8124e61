"""`postdiff compile`: TensorRT engines for the graphs a bundle's schedules run.

A build tool, not part of the device's generate path: it lives in tools/ but imports no torch, so a
Jetson runs it with the runtime-only install plus TensorRT. Engines land in ``BUNDLE/engines/`` and are
listed in ``engines.json`` (runtime/engines.py, which the TensorRT runner reads). The UNet
is built from the merged graph (``export --merged``) as one engine: its cache roles are ``If``
branches and every (resolution, batch) the schedules use is one optimization profile, so the engine
holds the UNet weights once (docs/tensorrt.md). ``--unet variants`` builds one engine per
per-variant graph instead (each holding its own copy of the weights; for comparison).

Builds are atomic (an engine is written to a temporary file and renamed; engines.json is rewritten
after each engine) and cached: an engine whose key (:func:`cache_key`) is unchanged is reused.
Torch-free; imports TensorRT (``tensorrt``) or TensorRT-RTX (``tensorrt_rtx``) only when called.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from tqdm.auto import tqdm

from postdiff.errors import BundleError, InputError
from postdiff.files import atomic_path
from postdiff.runtime.engines import (ENGINES_DIR, ENGINES_JSON, FORMAT_VERSION, EngineEntry, EnginesIndex, Profile,
                                      ShapeRange, gpu_compute_capability, import_backend, load_engines,
                                      manifest_sha256)
from postdiff.runtime.executor import concrete
from postdiff.runtime.jsonio import dumps, to_dict, write_json_atomic
from postdiff.runtime.manifest import DYNAMIC, GraphSpec, Manifest, ServedVariant, UNetVariant, load_manifest
from postdiff.runtime.names import TEXT_ENCODER, VAE_DECODER, unet_graph_name
from postdiff.runtime.schedule import Schedule, graph_variants

RTX_TARGETS = (75, 80, 86, 89, 120, 121)  # TensorRT-RTX 1.x ComputeCapability.SM*
UNET_DESIGNS = ("auto", "merged", "variants")


@dataclass(frozen=True)
class CompileOptions:
    """Validated `postdiff compile` arguments."""

    bundle: Path
    backend: str = "tensorrt"
    sm: int | None = None  # target compute capability (TensorRT-RTX only), e.g. 86
    schedules: tuple[Schedule, ...] = ()  # () = every UNet variant the bundle holds
    unet: str = "auto"  # merged (one engine) | variants (one engine per graph) | auto: merged when exported
    opt_level: int | None = None  # TensorRT builder optimization level 0-5 (None: the builder's default, 3)
    profiles: str = "static"  # the merged engine's optimization profiles (merged_profiles)


@dataclass(frozen=True)
class EnginePlan:
    """One engine to build: its graph, the variants it serves and its optimization profiles."""

    name: str
    graph: str
    serves: tuple[str, ...]
    profiles: tuple[Profile, ...] = ()


@dataclass
class CompileReport:
    """What a compile did."""

    index: EnginesIndex
    built: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)


def cache_key(graph_sha256: str, profiles: tuple[Profile, ...], precision: str, backend: str, version: str,
              target: str, builder: dict[str, str]) -> str:
    """The build's identity: sha256 over everything that makes an engine valid (module docstring)."""
    payload = {"graph_sha256": graph_sha256, "profiles": to_dict(profiles), "precision": precision,
               "backend": backend, "backend_version": version, "target": target, "builder": builder}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def target_of(options: CompileOptions) -> int:
    """The compute capability to build for: ``--sm`` (TensorRT-RTX: any listed target, no GPU needed),
    else the GPU of this machine (TensorRT always builds for the GPU it runs on)."""
    if options.backend == "tensorrt-rtx" and options.sm is not None:
        if options.sm not in RTX_TARGETS:
            raise InputError(f"--sm {options.sm} is not a TensorRT-RTX target; expected one of "
                             f"{list(RTX_TARGETS)} (Jetson Orin, SM87, needs --backend tensorrt on the device)")
        return options.sm
    if options.sm is not None:
        raise InputError("--sm works with --backend tensorrt-rtx only: TensorRT builds for the GPU it runs on; "
                         "drop --sm and run `postdiff compile` on the device")
    return gpu_compute_capability()


def wanted_variants(manifest: Manifest, schedules: Iterable[Schedule]) -> list[UNetVariant]:
    """The concrete UNet variants to serve: those of ``schedules``, or (none given) every variant the
    bundle holds, which for a bundle exported with ``--schedule`` are those schedules' variants."""
    variants: dict[UNetVariant, None] = {}
    for schedule in schedules:
        for variant in graph_variants(schedule):
            variants.setdefault(concrete(manifest, variant))
    if variants:
        return list(variants)
    served = manifest.graphs[manifest.merged_unet].merged.serves if manifest.merged_unet else ()
    return list(dict.fromkeys([*manifest.unet_graphs, *(s.variant for s in served)]))


def variant_name(variant: UNetVariant) -> str:
    """The per-variant graph name of ``variant`` (what engines.json lists as served)."""
    return unet_graph_name(variant.latent, variant.batch, variant.deep, variant.branch, variant.xattn)


PROFILE_MODES = ("static", "batch", "one")


def merged_profiles(spec: GraphSpec, served: list[ServedVariant], mode: str = "static") -> tuple[Profile, ...]:
    """The optimization profiles of the merged UNet engine. ``mode`` groups the served variants:
    ``static``: one profile per (latent, batch), min = opt = max; ``batch``: one per batch size,
    ranged over the latent sizes; ``one``: a single profile ranged over all of them. Every free input
    of the merged graph is set to the shapes the variants of a profile feed it, as input or as
    placeholder (ServedVariant.placeholders): TensorRT checks every ``If`` branch against the profile,
    not only the branch a variant takes. A ranged profile spans the elementwise min and max of those
    shapes, opt = max. TensorRT compiles every branch once per profile, so fewer profiles mean fewer
    kernels in the engine (docs/tensorrt.md, figures).

    Raises:
        InputError: an unknown ``mode``.
        BundleError: (static) two variants of one profile feed an input different shapes (e.g. the
            features of two DeepCache branches at one resolution); compile those schedules separately.
    """
    if mode not in PROFILE_MODES:
        raise InputError(f"--profiles '{mode}' is not one of {list(PROFILE_MODES)}")
    group_of = {"static": lambda v: (v.latent, v.batch), "batch": lambda v: v.batch, "one": lambda v: 0}[mode]
    groups: dict[Any, list[ServedVariant]] = {}
    for s in sorted(served, key=lambda s: (s.variant.latent, s.variant.batch)):
        groups.setdefault(group_of(s.variant), []).append(s)
    free = {t.name for t in spec.inputs if DYNAMIC in t.shape}
    profiles = []
    for members in groups.values():
        shapes: dict[str, ShapeRange] = {}
        for member in members:
            for tensor in (*member.inputs, *member.placeholders):
                if tensor.name not in free:
                    continue
                known = shapes.setdefault(tensor.name, ShapeRange(tensor.shape, tensor.shape, tensor.shape))
                if mode == "static" and known.opt != tensor.shape:
                    raise BundleError(
                        f"the merged UNet's input {tensor.name} takes shapes {known.opt} and {tensor.shape} in one "
                        f"profile ({variant_name(member.variant)}); one engine cannot serve both: compile the "
                        "schedules that need them separately (--schedule)")
                low = tuple(map(min, known.min, tensor.shape))
                high = tuple(map(max, known.max, tensor.shape))
                shapes[tensor.name] = ShapeRange(low, high, high)
        profiles.append(Profile(serves=tuple(variant_name(s.variant) for s in members), shapes=shapes))
    return tuple(profiles)


def plan_engines(manifest: Manifest, variants: list[UNetVariant], unet: str,
                 profiles: str = "static") -> list[EnginePlan]:
    """The engines a compile builds: text encoder and decoder, and the UNet as ``unet`` says.

    Raises:
        InputError: an unknown ``unet`` design, or ``merged`` on a bundle without the merged graph.
        BundleError: a variant neither form of the bundle computes.
    """
    if unet not in UNET_DESIGNS:
        raise InputError(f"--unet '{unet}' is not one of {list(UNET_DESIGNS)}")
    merged = manifest.merged_unet
    if unet == "merged" and merged is None:
        raise InputError("--unet merged needs the merged UNet graph, which this bundle lacks; re-export it with "
                         "`postdiff export ... --merged` (or compile --unet variants: one engine, and one copy of "
                         "the weights, per graph)")
    plans = [EnginePlan(name, name, (name,)) for name in (TEXT_ENCODER, VAE_DECODER) if name in manifest.graphs]
    if unet != "variants" and merged is not None:
        served = [manifest.served(v) for v in variants]
        missing = [variant_name(v) for v, s in zip(variants, served) if s is None]
        if missing:
            raise BundleError(f"the merged UNet graph does not serve {missing}; re-export with those schedules "
                              "and --merged")
        spec = manifest.graph(merged)
        plans.append(EnginePlan(merged, merged, tuple(variant_name(v) for v in variants),
                                merged_profiles(spec, served, profiles)))
        return plans
    for variant in variants:
        name = manifest.unet_graph(variant)
        plans.append(EnginePlan(name, name, (name,)))
    return plans


def compile_bundle(options: CompileOptions, progress: bool = True) -> CompileReport:
    """Build (or reuse) every engine of the bundle's schedules; see the module docstring.

    Raises:
        BundleError, InputError, BackendMissing, NoGpu (runtime/engines.py): with the fix in the message.
    """
    bundle = Path(options.bundle)
    manifest = load_manifest(bundle)
    trt = import_backend(options.backend)
    sm = target_of(options)
    plans = plan_engines(manifest, wanted_variants(manifest, options.schedules), options.unet, options.profiles)
    folder = bundle / ENGINES_DIR
    folder.mkdir(exist_ok=True)
    previous = _previous(bundle, manifest)
    version = str(trt.__version__)
    index = EnginesIndex(format_version=FORMAT_VERSION, manifest_sha256=manifest_sha256(bundle),
                         backend=options.backend, backend_version=version, target=f"sm{sm}", engines={})
    report = CompileReport(index=index)
    if options.opt_level is not None and not 0 <= options.opt_level <= 5:
        raise InputError(f"--opt-level {options.opt_level} is outside 0..5 (TensorRT's builder optimization levels)")
    builder_options = {"network": "strongly_typed"}
    if options.opt_level is not None:
        builder_options["optimization_level"] = str(options.opt_level)
    for plan in plans:
        spec = manifest.graph(plan.graph)
        key = cache_key(spec.sha256, plan.profiles, spec.precision, options.backend, version, index.target,
                        builder_options)
        old = previous.get(plan.name)
        if old is not None and old.key == key and (folder / old.file).is_file():
            index.engines[plan.name] = old
            report.reused.append(plan.name)
            continue
        file = f"{plan.name}.{key[:12]}.engine"
        started = time.perf_counter()
        blob = _build(trt, options.backend, sm, bundle / spec.file, plan, builder_options, progress)
        with atomic_path(folder / file) as tmp:
            tmp.write_bytes(memoryview(blob))
        index.engines[plan.name] = EngineEntry(
            file=file, bytes=memoryview(blob).nbytes, sha256=_sha256(blob), graph=plan.graph, graph_sha256=spec.sha256,
            serves=plan.serves, profiles=plan.profiles, precision=spec.precision, builder=builder_options, key=key,
            build_seconds=round(time.perf_counter() - started, 2))
        write_json_atomic(folder / ENGINES_JSON, index)  # after each engine: an interrupt loses at most one
        report.built.append(plan.name)
    if not (folder / ENGINES_JSON).is_file() or (folder / ENGINES_JSON).read_text(encoding="utf-8") != dumps(index):
        write_json_atomic(folder / ENGINES_JSON, index)  # nothing changed, nothing written
    keep = {e.file for e in index.engines.values()} | {ENGINES_JSON}
    for stale in folder.iterdir():  # engines of older keys, superseded now that engines.json names the new ones
        if stale.name not in keep and stale.suffix == ".engine":
            stale.unlink()
    return report


def _previous(bundle: Path, manifest: Manifest) -> dict[str, EngineEntry]:
    """The engines a previous compile left that are still valid for this bundle (none if stale)."""
    try:
        return dict(load_engines(bundle, manifest).engines)
    except BundleError:
        return {}


def _sha256(blob: Any) -> str:
    return hashlib.sha256(memoryview(blob)).hexdigest()


def _build(trt: ModuleType, backend: str, sm: int, onnx_path: Path, plan: EnginePlan, builder_options: dict[str, str],
           progress: bool) -> Any:
    """Parse ``onnx_path`` (external weights found beside it) and build the serialized engine."""
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # precision follows the ONNX dtypes
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path.resolve())):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise BundleError(f"{backend} cannot parse {onnx_path.name}: {errors}; report it with the bundle's "
                          "manifest.json")
    config = builder.create_builder_config()
    if "optimization_level" in builder_options:
        config.builder_optimization_level = int(builder_options["optimization_level"])
    if backend == "tensorrt-rtx":
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{sm}"), 0)
    for profile in plan.profiles:
        optimization = builder.create_optimization_profile()
        for name, shapes in profile.shapes.items():
            optimization.set_shape(name, shapes.min, shapes.opt, shapes.max)
        config.add_optimization_profile(optimization)
    bar = tqdm(desc=plan.name, unit="step", disable=not progress, leave=False)
    monitor = _monitor(trt, bar)
    if monitor is not None:
        config.progress_monitor = monitor
    try:
        blob = builder.build_serialized_network(network, config)
    finally:
        bar.close()
    if blob is None:
        raise BundleError(f"{backend} could not build an engine from {onnx_path.name} for sm{sm} (the builder "
                          "logged why above); report it with the bundle's manifest.json")
    return blob


def _monitor(trt: ModuleType, bar: tqdm) -> Any:
    """A TensorRT progress monitor driving ``bar`` over the builder's top-level phases (None if the
    backend has none)."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Monitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self.top: set[str] = set()

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                self.top.add(phase_name)
                bar.total = (bar.total or 0) + num_steps
                bar.set_postfix_str(phase_name)
                bar.refresh()

        def step_complete(self, phase_name: str, step: int) -> bool:
            if phase_name in self.top:
                bar.update(1)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            self.top.discard(phase_name)

    return Monitor()
