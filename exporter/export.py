"""`postdiff export`: a model in, a bundle out.

Stages: load the model, trace each graph to ONNX, gather the UNet weights into one shared file,
measure each graph's parity against torch, write the tokenizer, then the manifest, and move the
finished folder into place. A failure at any stage leaves nothing at the destination.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import diffusers
import onnx
import torch
from tqdm.auto import tqdm

import postdiff
from postdiff.exporter.bundle import check_destination, publish, staging_folder
from postdiff.exporter.models import LoadedModel, load_model
from postdiff.exporter.trace import OPSET, GraphPlan, export_onnx, graph_plans, move_weights_to_file
from postdiff.exporter.verify import FP16_TOLERANCE, FP32_TOLERANCE, measure_parity
from postdiff.runtime import names
from postdiff.runtime.errors import InputError
from postdiff.runtime.manifest import (FORMAT_VERSION, GraphSpec, Manifest, ModelInfo, TensorSpec, TokenizerSpec,
                                       sha256_file)
from postdiff.runtime.schedulers import normalize_config

PRECISIONS = ("fp32", "fp16")
UNET_WEIGHTS = "unet.weights"
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class ExportOptions:
    """Validated `postdiff export` arguments."""

    source: str
    out: Path
    resolution: tuple[int, int] | None = None  # (height, width) in pixels; None: the model's default
    precision: str = "fp32"


def parse_resolution(text: str) -> tuple[int, int]:
    """``"512x768"`` -> (512, 768) (height x width); InputError for anything else."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise InputError(f"--resolution '{text}' is not HEIGHTxWIDTH in pixels, e.g. 512x512")
    return int(match.group(1)), int(match.group(2))


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


def export_bundle(options: ExportOptions, progress: bool = True) -> Manifest:
    """Export ``options.source`` to a new bundle at ``options.out`` and return its manifest."""
    if options.precision not in PRECISIONS:
        raise InputError(f"--precision '{options.precision}' is not supported; expected one of {list(PRECISIONS)}")
    check_destination(options.out)
    bar = tqdm(total=5, desc="export", unit="stage", disable=not progress)
    bar.set_postfix_str("loading model")
    model = load_model(options.source)
    height, width = options.resolution or model.default_resolution
    check_resolution(model, height, width)
    if options.precision == "fp16":
        # The text encoder stays fp32: it runs once per prompt, and CLIP's traced LayerNorm does not
        # type-check in half precision.
        for module in (model.unet, model.vae):
            module.half()
    bar.update()
    plans = graph_plans(model, height, width)
    if options.precision == "fp16":
        for plan in plans:
            if plan.name != names.TEXT_ENCODER:
                plan.inputs.update({k: v.half() for k, v in plan.inputs.items() if v.is_floating_point()})
    with staging_folder(options.out) as stage:
        graphs = {}
        with tempfile.TemporaryDirectory(dir=stage.parent, prefix=f".{options.out.name}.scratch-") as scratch:
            for plan in plans:
                bar.set_postfix_str(f"{plan.name}: trace, check parity")
                precision = "fp32" if plan.name == names.TEXT_ENCODER else options.precision
                graphs[plan.name] = _export_graph(plan, stage, Path(scratch), precision)
                bar.update()
        bar.set_postfix_str("tokenizer, manifest")
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            producer={"postdiff": postdiff.__version__, "torch": torch.__version__.split("+")[0],
                      "diffusers": diffusers.__version__, "onnx": onnx.__version__, "onnx_opset": str(OPSET)},
            model=ModelInfo(source=_source_id(options.source), latent_channels=model.unet.config.in_channels,
                            vae_scale_factor=model.vae_scale_factor, downsample_factor=model.downsample_factor,
                            height=height, width=width),
            graphs=graphs,
            tokenizer=_write_tokenizer(model, stage),
            scheduler=normalize_config(model.scheduler_config),
            files={UNET_WEIGHTS: sha256_file(stage / UNET_WEIGHTS)},
        )
        publish(stage, options.out, manifest)
    bar.set_postfix_str("done")
    bar.close()
    return manifest


def _export_graph(plan: GraphPlan, stage: Path, scratch: Path, precision: str) -> GraphSpec:
    file = f"{plan.name}.onnx"
    if plan.name == names.UNET:  # weights in the shared file the UNet variants reference
        traced = scratch / file
        export_onnx(plan, traced)
        move_weights_to_file(traced, stage / file, UNET_WEIGHTS)
        external = (UNET_WEIGHTS,)
    else:
        export_onnx(plan, stage / file)
        external = ()
    tolerance = FP16_TOLERANCE if precision == "fp16" else FP32_TOLERANCE
    parity = measure_parity(plan, stage / file, tolerance)
    graph = onnx.load(str(stage / file), load_external_data=False)
    return GraphSpec(
        file=file, sha256=sha256_file(stage / file), role=plan.name,
        inputs=tuple(_tensor_spec(v) for v in graph.graph.input),
        outputs=tuple(_tensor_spec(v) for v in graph.graph.output),
        precision=precision, parity=parity, external_data=external,
    )


def _tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
    return TensorSpec(name=value.name, shape=tuple(d.dim_value for d in tensor_type.shape.dim), dtype=dtype)


def _write_tokenizer(model: LoadedModel, stage: Path) -> TokenizerSpec:
    path = stage / TOKENIZER_FILE
    model.tokenizer.backend_tokenizer.save(str(path))
    return TokenizerSpec(file=TOKENIZER_FILE, sha256=sha256_file(path),
                         max_length=int(model.tokenizer.model_max_length), pad_id=int(model.tokenizer.pad_token_id))


def _source_id(source: str) -> str:
    """Built-in specs by name, folders by their last path component (no machine paths in bundles)."""
    return source if source.startswith("random:") else Path(source).resolve().name
