"""`postdiff export`: a model in, a bundle out.

Stages: load the model; trace the text encoder, the VAE decoder and every UNet variant the
requested schedules need (the plain full-resolution CFG graph when no schedule is given); gather the
UNet weights into one shared file, each distinct payload once; count each graph's MACs and measure
its parity against torch; write the tokenizer, then the manifest, and move the finished folder into
place. A failure at any stage leaves nothing at the destination.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

import diffusers
import onnx
import torch
from tqdm.auto import tqdm

import postdiff
from postdiff.exporter.bundle import publish, staging_folder
from postdiff.exporter.macs import count_macs
from postdiff.exporter.lora import check_lora_scale, fuse_lora
from postdiff.exporter.merge import BranchGraph, covering_roles, merge_branches, merged_output_name, tensor_specs
from postdiff.exporter.models import LoadedModel, load_model
from postdiff.exporter.options import ExportOptions, check_options, source_id
from postdiff.exporter.scheduler_config import normalize_config, scheduler_class
from postdiff.exporter.trace import (OPSET, GraphPlan, export_onnx, half_precision, text_and_decoder_plans,
                                     unet_plan)
from postdiff.exporter.verify import FP16_TOLERANCE, FP32_TOLERANCE, measure_merged_parity, measure_parity
from postdiff.exporter.weights import WeightStore
from postdiff.runtime import names
from postdiff.errors import InputError
from postdiff.runtime.manifest import (FORMAT_VERSION, GraphSpec, Manifest, MergedUNet, ModelInfo, PixArtInfo,
                                       SdxlConditioning,
                                       ServedVariant, SharedWeights, TensorSpec, TokenizerSpec, UNetVariant,
                                       sha256_file)
from postdiff.runtime.executor import at_latent
from postdiff.profiles.presets import resolve_schedule
from postdiff.runtime.schedule import PLAIN, PLAIN_UNGUIDED, Schedule, graph_variants

UNET_WEIGHTS = "unet.weights"
MERGED_UNET = "unet-merged"  # graph name of the merged UNet (exporter/merge.py)
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_2_FILE = "tokenizer_2.json"


def check_resolution(model: LoadedModel, height: int, width: int) -> None:
    """Reject an image size whose latent is off the UNet's grid, naming valid sizes."""
    step = model.vae_scale_factor * model.downsample_factor
    if height <= 0 or width <= 0 or height % step or width % step:
        near_h = max(step, round(height / step) * step)
        near_w = max(step, round(width / step) * step)
        raise InputError(
            f"resolution {height}x{width} is off this model's grid: height and width must be positive "
            f"multiples of {step} pixels ({model.vae_scale_factor} px per latent cell x {model.downsample_factor} "
            f"for the UNet's downsamplers); the nearest valid size is {near_h}x{near_w}"
        )


def unet_variants(schedules: list[Schedule], latent: tuple[int, int], multiple: int,
                  embedded_guidance: bool = False) -> list[UNetVariant]:
    """Every UNet variant the schedules evaluate, made concrete at this bundle's latent size.

    Wherever plain generation's batch-2 graph is exported, its batch-1 twin comes with it (same
    weights, one small graph file): plain generation with guidance off runs that, as diffusers does.
    Models that embed the guidance scale (LCM) have no batch-2 plain graph, only the batch-1 one.
    """
    variants: dict[UNetVariant, None] = {}
    for schedule in schedules:
        for v in graph_variants(schedule):
            variants.setdefault(at_latent(v, latent, multiple))
    plain, unguided = at_latent(PLAIN, latent, multiple), at_latent(PLAIN_UNGUIDED, latent, multiple)
    if not schedules and embedded_guidance:
        variants.setdefault(unguided)
    elif not schedules or plain in variants:
        variants.setdefault(plain)
        variants.setdefault(unguided)
    return list(variants)


def export_bundle(options: ExportOptions, progress: bool = True) -> Manifest:
    """Export ``options.source`` to a new bundle at ``options.out`` and return its manifest."""
    check_options(options)
    schedules = [resolve_schedule(spec) for spec in options.schedules]
    if options.lora is not None:
        check_lora_scale(options.lora_scale)
    model = load_model(options.source)
    if options.lora is not None:
        fuse_lora(model, Path(options.lora), options.lora_scale)
    height, width = options.resolution or model.default_resolution
    check_resolution(model, height, width)
    latent = (height // model.vae_scale_factor, width // model.vae_scale_factor)
    wanted = list(schedules)
    embedded = model.embedded_guidance_dim is not None  # guidance as an embedding (LCM): no CFG
    if options.merged and model.is_pixart:
        raise InputError(f"--merged is not supported for the PixArt-alpha transformer {options.source} (its cache "
                         "tensors are token-shaped); export it without --merged")
    if options.tuning_space:  # the variants only: manifest.schedules keeps naming the requested schedules
        from postdiff.profiles.tuning import LCM_STEPS_FULL, tuning_schedules

        wanted += (tuning_schedules(LCM_STEPS_FULL, latent, model.downsample_factor, cfg=False) if embedded
                   else tuning_schedules(latent=latent, multiple=model.downsample_factor))
    if embedded:
        guided = [s.name for s in schedules if any(step.cfg for step in s.steps)]
        if guided:
            raise InputError(
                f"schedule '{guided[0]}' runs classifier-free guidance, but {options.source} takes the guidance "
                "scale as an embedding (an LCM: one conditional evaluation per step); pass schedules built with "
                "guidance off (`postdiff schedule --guidance-embedding`, or the presets lcm-4 / postdiff-lcm)")
        wanted = [s for s in wanted if not any(step.cfg for step in s.steps)]
    variants = unet_variants(wanted, latent, model.downsample_factor, embedded)
    plans = text_and_decoder_plans(model, height, width) + [unet_plan(model, v) for v in variants]
    full_precision = fp32_roles(model)
    if options.precision == "fp16":
        # The text encoders stay fp32: they run once per prompt, and CLIP's traced LayerNorm does not
        # type-check in half precision. So does an SDXL decoder whose VAE asks for upcasting.
        plans = [p if p.role in full_precision else half_precision(p) for p in plans]
    with staging_folder(options.out) as stage:
        store = WeightStore(stage / UNET_WEIGHTS)
        graphs = {}
        bar = tqdm(plans, desc="export", unit="graph", disable=not progress)
        with tempfile.TemporaryDirectory(dir=stage.parent, prefix=f".{options.out.name}.scratch-") as scratch:
            for plan in bar:
                bar.set_postfix_str(plan.name)
                precision = "fp32" if plan.role in full_precision else options.precision
                graphs[plan.name] = _export_graph(plan, stage, Path(scratch), precision, store)
            if options.merged:
                unet_plans = [p for p in plans if p.role == names.UNET]
                bar.set_postfix_str(MERGED_UNET)
                graphs[MERGED_UNET] = _export_merged(model, unet_plans, graphs, stage, Path(scratch),
                                                     options.precision, store)
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            producer={"postdiff": postdiff.__version__, "torch": torch.__version__.split("+")[0],
                      "diffusers": diffusers.__version__, "onnx": onnx.__version__, "onnx_opset": str(OPSET)},
            model=ModelInfo(source=source_id(options.source), latent_channels=model.unet.config.in_channels,
                            vae_scale_factor=model.vae_scale_factor, downsample_factor=model.downsample_factor,
                            height=height, width=width, default_guidance=model.default_guidance,
                            guidance_embedding=model.embedded_guidance_dim or 0,
                            lora="" if options.lora is None else f"{Path(options.lora).name} x{options.lora_scale:g}"),
            graphs=graphs,
            tokenizer=_write_tokenizer(model, stage),
            tokenizer_2=_write_tokenizer(model, stage, second=True) if model.is_sdxl else None,
            sdxl=SdxlConditioning(force_zeros_for_empty_prompt=model.force_zeros_for_empty_prompt)
            if model.is_sdxl else None,
            scheduler=normalize_config(model.scheduler_config),
            scheduler_class=scheduler_class(model.scheduler_config),
            weights=SharedWeights(file=UNET_WEIGHTS, sha256=sha256_file(stage / UNET_WEIGHTS),
                                  tensors=dict(store.entries)),
            schedules=tuple(s.name for s in schedules),
            pixart=_pixart_info(model) if model.is_pixart else None,
        )
        publish(stage, options.out, manifest)
    return manifest


def _export_graph(plan: GraphPlan, stage: Path, scratch: Path, precision: str, store: WeightStore) -> GraphSpec:
    file = f"{plan.name}.onnx"
    initializers: dict[str, str] = {}
    external = ""
    if plan.role == names.UNET:  # weights go to the file all UNet variants share
        export_onnx(plan, scratch / file)
        graph = onnx.load(str(scratch / file), load_external_data=True)
        initializers = store.externalize(graph)
        onnx.save_model(graph, str(stage / file))
        for leftover in scratch.iterdir():  # the tracer's own side files for > 2 GB models
            leftover.unlink()
    else:
        graph, external = _export_own_weights(plan, stage, scratch, file)
    macs = count_macs(graph)
    tolerance = FP16_TOLERANCE if precision == "fp16" else FP32_TOLERANCE
    parity = measure_parity(plan, stage / file, tolerance)
    return GraphSpec(
        file=file, sha256=sha256_file(stage / file), role=plan.role,
        inputs=tuple(_tensor_spec(v) for v in graph.graph.input),
        outputs=tuple(_tensor_spec(v) for v in graph.graph.output),
        precision=precision, parity=parity, macs=macs, variant=plan.variant, initializers=initializers,
        external_data=external, external_sha256=sha256_file(stage / external) if external else "",
    )


#: A graph other than the denoiser whose weights reach this many bytes keeps them in one external-data file
#: ``NAME.weights`` beside it (protobuf cannot hold 2 GB; T5-XXL is 19 GB in fp32).
OWN_WEIGHTS_FILE_BYTES = 1 << 30


def _export_own_weights(plan: GraphPlan, stage: Path, scratch: Path, file: str) -> tuple[onnx.ModelProto, str]:
    """Trace a text encoder / decoder graph into ``stage``; returns (graph, external-data file or "").

    Above 2 GB the tracer writes one side file per tensor; those, or any graph whose weights reach
    :data:`OWN_WEIGHTS_FILE_BYTES`, are gathered into one ``NAME.weights`` file the manifest lists and hashes.
    """
    export_onnx(plan, scratch / file)
    side_files = [p for p in scratch.iterdir() if p.name != file]
    if not side_files and (scratch / file).stat().st_size < OWN_WEIGHTS_FILE_BYTES:  # the tracer's file as it is
        os.replace(scratch / file, stage / file)
        return onnx.load(str(stage / file)), ""
    graph = onnx.load(str(scratch / file), load_external_data=True)
    weight_bytes = sum(len(t.raw_data) for t in graph.graph.initializer)
    external = ""
    if side_files or weight_bytes >= OWN_WEIGHTS_FILE_BYTES:
        external = f"{plan.name}.weights"
        onnx.save_model(graph, str(stage / file), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external, size_threshold=1024)
        graph = onnx.load(str(stage / file), load_external_data=False)
    else:
        onnx.save_model(graph, str(stage / file))
    for leftover in scratch.iterdir():
        leftover.unlink()
    return graph, external


def _export_merged(model: LoadedModel, plans: list[GraphPlan], graphs: dict[str, GraphSpec], stage: Path,
                   scratch: Path, precision: str, store: WeightStore) -> GraphSpec:
    """The merged UNet graph (exporter/merge.py): one dynamic-shape trace per cache role, merged as ``If``
    branches over the shared weights, then checked against torch at every concrete variant it serves."""
    role_of = {p.name: (p.variant.deep, p.variant.branch, p.variant.xattn) for p in plans}
    covering = covering_roles(list(dict.fromkeys(role_of.values())))
    roles = list(dict.fromkeys(covering.values()))  # one branch per covering role
    branches = []
    for deep, branch, xattn in roles:  # traced at the shapes of the first variant it serves
        first = next(p for p in plans if covering[role_of[p.name]] == (deep, branch, xattn))
        variant = replace(first.variant, deep=deep, branch=branch, xattn=xattn)
        dynamic = unet_plan(model, variant, dynamic=True)
        if precision == "fp16":
            dynamic = half_precision(dynamic)
        export_onnx(dynamic, scratch / "branch.onnx")
        graph = onnx.load(str(scratch / "branch.onnx"), load_external_data=True)
        branches.append(BranchGraph(deep, branch, xattn, graph, store.externalize(graph)))
        for leftover in scratch.iterdir():
            leftover.unlink()
    merged, branch_specs, initializers = merge_branches(branches)
    branches.clear()  # the traced graphs are no longer needed (SD scale: the weights in memory)
    path = stage / f"{MERGED_UNET}.onnx"
    onnx.save_model(merged, str(path))
    index = {role: i for i, role in enumerate(roles)}
    output_names = {o.name: merged_output_name(o.name) for p in plans for o in graphs[p.name].outputs}
    inputs, outputs = tensor_specs(merged.graph.input), tensor_specs(merged.graph.output)
    selector = merged.graph.input[0].name if len(branch_specs) > 1 else ""
    tolerance = FP16_TOLERANCE if precision == "fp16" else FP32_TOLERANCE
    references = {t.name: (t, graphs[p.name].variant) for p in plans for t in (*graphs[p.name].inputs,
                                                                                *graphs[p.name].outputs)}
    serves = []
    for plan in plans:
        spec = graphs[plan.name]
        branch = index[covering[role_of[plan.name]]]
        taken = {t.name for t in spec.inputs}
        placeholders = tuple(_natural_spec(*references[t.name], plan.variant) for t in inputs
                             if t.name not in taken and t.name != selector)
        parity = measure_merged_parity(plan, path, placeholders, selector, branch, output_names, tolerance)
        serves.append(ServedVariant(variant=plan.variant, branch=branch, inputs=spec.inputs, outputs=spec.outputs,
                                    parity=parity, macs=spec.macs, placeholders=placeholders))
    worst = max((s.parity for s in serves), key=lambda p: p.max_abs_diff)
    return GraphSpec(
        file=path.name, sha256=sha256_file(path), role=names.UNET, inputs=inputs, outputs=outputs,
        precision=precision, parity=worst, macs=max(s.macs for s in serves), initializers=initializers,
        merged=MergedUNet(selector=selector, branches=branch_specs, serves=tuple(serves), output_names=output_names),
    )


def _natural_spec(reference: TensorSpec, at: UNetVariant, variant: UNetVariant) -> TensorSpec:
    """``reference`` (a tensor's shape in the variant ``at``) scaled to ``variant``'s batch and latent size
    along its free axes (names.free_axes)."""
    (h0, w0), (h, w) = at.latent, variant.latent
    factor = {"batch": (variant.batch, at.batch), "height": (h, h0), "width": (w, w0), "tokens": (h * w, h0 * w0)}
    shape = list(reference.shape)
    for axis, kind in names.free_axes(reference.name).items():
        num, den = factor[kind]
        if (shape[axis] * num) % den:
            raise InputError(f"tensor {reference.name} of shape {reference.shape} at latent {at.latent} does not scale "
                             f"to latent {variant.latent}; export the resolutions separately")
        shape[axis] = shape[axis] * num // den if kind != "batch" else num
    return TensorSpec(name=reference.name, shape=tuple(shape), dtype=reference.dtype)


def _tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
    return TensorSpec(name=value.name, shape=tuple(d.dim_value for d in tensor_type.shape.dim), dtype=dtype)


def fp32_roles(model: LoadedModel) -> tuple[str, ...]:
    """Graph roles an fp16 export keeps in fp32: the text encoders, and the VAE decoder of an SDXL
    model whose VAE config says ``force_upcast`` (diffusers' SDXL pipeline decodes those in fp32)."""
    upcast = model.is_sdxl and model.vae is not None and bool(getattr(model.vae.config, "force_upcast", False))
    return names.TEXT_ENCODERS + ((names.VAE_DECODER,) if upcast else ())


def _pixart_info(model: LoadedModel) -> PixArtInfo:
    transformer = model.unet
    return PixArtInfo(blocks=len(transformer.transformer_blocks), patch_size=int(transformer.config.patch_size),
                      learned_sigma=transformer.out_channels == 2 * transformer.config.in_channels,
                      micro_conditions=bool(transformer.use_additional_conditions),
                      interpolation_scale=float(transformer.pos_embed.interpolation_scale))


def _write_tokenizer(model: LoadedModel, stage: Path, second: bool = False) -> TokenizerSpec:
    if model.is_pixart:  # T5: the converted SentencePiece model; rows of 120 ids plus the attention mask
        model.tokenizer.backend_tokenizer.save(str(stage / TOKENIZER_FILE))
        return TokenizerSpec(kind="t5", file=TOKENIZER_FILE, sha256=sha256_file(stage / TOKENIZER_FILE),
                             max_length=model.id_length, pad_id=int(model.tokenizer.pad_token_id))
    if model.labels:  # label prompts need no file: the manifest lists them
        return TokenizerSpec(kind="labels", max_length=1, labels=model.labels)
    tokenizer = model.tokenizer_2 if second else model.tokenizer
    file = TOKENIZER_2_FILE if second else TOKENIZER_FILE
    tokenizer.backend_tokenizer.save(str(stage / file))
    return TokenizerSpec(kind="bpe", file=file, sha256=sha256_file(stage / file),
                         max_length=int(tokenizer.model_max_length), pad_id=int(tokenizer.pad_token_id))
