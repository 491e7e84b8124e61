"""The bundle manifest: the one contract between the exporter and the runtime.

A bundle is a folder holding ``manifest.json``, the ONNX graphs, one external weights file shared by
the UNet graphs, and the tokenizer. The runtime learns every file name, tensor name, shape and dtype
from here and nowhere else.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from postdiff.errors import BundleError
from postdiff.runtime.jsonio import OMIT_DEFAULT, dumps, load_versioned
from postdiff.runtime.names import unet_graph_name

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


DYNAMIC = -1  # a TensorSpec dimension the graph leaves free (the merged UNet's batch and spatial sides)


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: its name, shape (``DYNAMIC`` for a free dimension) and numpy dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Parity:
    """How closely a graph reproduced its torch module at export (seeded random inputs)."""

    max_abs_diff: float
    reference_max_abs: float
    tolerance: float


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of the bundle."""

    file: str
    sha256: str
    role: str  # text_encoder | unet | vae_decoder
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str  # fp32 | fp16
    parity: Parity
    macs: int  # multiply-accumulates of one call, counted from the static shapes
    variant: UNetVariant | None = None  # UNet graphs only
    initializers: dict[str, str] = field(default_factory=dict)  # initializer name -> key in weights.tensors
    merged: MergedUNet | None = field(default=None, metadata={OMIT_DEFAULT: True})  # the merged UNet only
    # A text encoder or decoder too large for one protobuf (> 2 GB, e.g. T5-XXL): its weights as ONNX
    # external data in this one file beside the graph, and the file's sha256 ("" for graphs that hold theirs).
    external_data: str = field(default="", metadata={OMIT_DEFAULT: True})
    external_sha256: str = field(default="", metadata={OMIT_DEFAULT: True})

    def input(self, name: str) -> TensorSpec:
        """The input called ``name``; BundleError if the graph has none."""
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise BundleError(
            f"graph {self.file} has no input '{name}' (inputs: {[s.name for s in self.inputs]}); "
            "the bundle was written by an incompatible exporter: re-export it"
        )


@dataclass(frozen=True)
class WeightEntry:
    """One tensor payload inside the shared weights file."""

    offset: int
    length: int
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SharedWeights:
    """The external weights file every UNet graph references, and its payload index."""

    file: str
    sha256: str
    tensors: dict[str, WeightEntry]


@dataclass(frozen=True)
class UNetVariant:
    """What a UNet graph computes (see ``postdiff.runtime.schedule.Variant``)."""

    latent: tuple[int, int]  # (h, w)
    batch: int
    deep: str  # none | write | read
    branch: int
    xattn: str  # none | write | read


@dataclass(frozen=True)
class MergedBranch:
    """One cache role of the merged UNet graph: the ``If`` branch taken when the selector is ``index``.

    ``inputs`` are the merged graph's inputs the branch reads (every other input gets a placeholder);
    ``outputs`` the merged outputs it fills (the others come back empty).
    """

    index: int
    deep: str  # none | write | read
    branch: int  # DeepCache branch id (0 when deep is none)
    xattn: str  # none | write | read
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class ServedVariant:
    """A concrete UNet variant the merged graph computes: its branch and, in the per-variant graph's
    own tensor names, the exact inputs it takes and outputs it returns; ``placeholders`` are the
    merged graph's other inputs at the shapes they would have for this variant (TensorRT needs every
    branch shape-consistent, and a branch passes an uncomputed cache input through as its output)."""

    variant: UNetVariant
    branch: int  # MergedBranch.index
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parity: Parity  # merged graph (this branch, these shapes) against the torch module at export
    macs: int
    placeholders: tuple[TensorSpec, ...] = ()  # every other merged input, at its natural shape here: fed zeros


@dataclass(frozen=True)
class MergedUNet:
    """How one UNet graph holds every cache role of a bundle as ``If`` branches over one set of weights
    (DESIGN §2, docs/tensorrt.md): the selector input picks the branch, batch and spatial sides are
    free (``DYNAMIC``), and ``serves`` lists every (resolution, batch, role) it is exported and
    checked for. Cache outputs are renamed (``output_names``: per-variant name -> merged name) since
    a graph cannot take and produce a tensor of one name."""

    selector: str  # int32 scalar input choosing the branch ("" when there is only one branch)
    branches: tuple[MergedBranch, ...]
    serves: tuple[ServedVariant, ...]
    output_names: dict[str, str]


@dataclass(frozen=True)
class TokenizerSpec:
    """How prompts become the text encoder's id row.

    ``bpe``: a tokenizers-library JSON ``file``, padded/truncated to ``max_length`` with ``pad_id``.
    ``t5``: the same for a T5 (SentencePiece Unigram) ``file``; the prompt is lower-cased and stripped
    first (PixArt-alpha's pipeline) and the row comes with its attention mask (1 = token, 0 = padding).
    ``labels``: the prompt names one of ``labels`` (optionally as "digit N"); id = its index, and the
    empty prompt is the null label (id ``len(labels)``) used for guidance.
    """

    max_length: int
    kind: str = "bpe"
    file: str = ""
    sha256: str = ""
    pad_id: int = 0
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class SdxlConditioning:
    """How an SDXL bundle conditions its UNet beyond the cross-attention states.

    The prompt goes through both text-encoder graphs (``text_encoder``, ``text_encoder_2``, each
    with its own tokenizer); their hidden states concatenate along the width into the context, and
    ``text_encoder_2``'s ``text_embeds`` is the pooled embedding the UNet takes. The UNet also takes
    ``time_ids``: original size, crop top-left, target size, in pixels (docs/sdxl.md).
    ``force_zeros_for_empty_prompt``: an empty negative prompt is all-zero conditioning (states
    and pooled), as diffusers' SDXL pipeline does when no negative prompt is given.
    """

    force_zeros_for_empty_prompt: bool


@dataclass(frozen=True)
class PixArtInfo:
    """A PixArt-alpha bundle (docs/pixart.md): the denoiser graphs (role ``unet``) are a diffusion
    transformer of ``blocks`` blocks. The T5 text encoder takes ``attention_mask`` beside the ids and
    every denoiser graph that cross-attends takes it as ``encoder_attention_mask``. The graphs already
    keep the epsilon half of a ``learned_sigma`` output and carry their own micro-conditions (their
    image size and aspect ratio) and position embedding; ``micro_conditions`` and
    ``interpolation_scale`` say what was baked in. A block-cache ``branch`` b caches blocks [b, blocks - b).
    """

    blocks: int
    patch_size: int
    learned_sigma: bool
    micro_conditions: bool
    interpolation_scale: float


@dataclass(frozen=True)
class ModelInfo:
    """What model the bundle was made from and the geometry the runtime needs."""

    source: str
    latent_channels: int
    vae_scale_factor: int
    downsample_factor: int  # latent H and W must be multiples of this
    height: int  # image pixels
    width: int
    default_guidance: float = 7.5
    # Length of the guidance-scale embedding the UNet takes as ``timestep_cond`` (LCM-distilled
    # models: runtime/guidance.py computes it); 0: the model uses classifier-free guidance instead.
    guidance_embedding: int = 0
    lora: str = ""  # the LoRA fused into the weights at export ("file.safetensors xSCALE"), if any

    @property
    def latent(self) -> tuple[int, int]:
        """Full-resolution latent (h, w)."""
        return self.height // self.vae_scale_factor, self.width // self.vae_scale_factor


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json``."""

    format_version: int
    producer: dict[str, str]
    model: ModelInfo
    graphs: dict[str, GraphSpec]
    tokenizer: TokenizerSpec
    scheduler: dict[str, Any]  # the model's scheduler_config.json, normalised (exporter/scheduler_config.py)
    weights: SharedWeights
    schedules: tuple[str, ...] = ()  # the schedules the bundle was exported for
    scheduler_class: str = ""  # the diffusers class the model ships: generate's default sampler
    tokenizer_2: TokenizerSpec | None = None  # SDXL: the second encoder's tokenizer
    sdxl: SdxlConditioning | None = None  # SDXL bundles only
    pixart: PixArtInfo | None = field(default=None, metadata={OMIT_DEFAULT: True})  # PixArt-alpha bundles only

    @cached_property
    def merged_unet(self) -> str | None:
        """Name of the merged UNet graph (exported with ``--merged``), or None."""
        return next((name for name, spec in sorted(self.graphs.items()) if spec.merged is not None), None)

    def served(self, variant: UNetVariant) -> ServedVariant | None:
        """How the merged UNet graph computes ``variant``, or None (no merged graph, or not served)."""
        if self.merged_unet is None:
            return None
        return next((s for s in self.graphs[self.merged_unet].merged.serves if s.variant == variant), None)

    @cached_property
    def unet_graphs(self) -> dict[UNetVariant, str]:
        """Graph name by UNet variant (the first name in sorted order, should two graphs compute one)."""
        index: dict[UNetVariant, str] = {}
        for name, spec in sorted(self.graphs.items()):
            if spec.variant is not None:
                index.setdefault(spec.variant, name)
        return index

    def unet_graph(self, variant: UNetVariant) -> str:
        """Name of the UNet graph computing ``variant``; BundleError naming it in words otherwise."""
        if variant in self.unet_graphs:
            return self.unet_graphs[variant]
        raise BundleError(f"the bundle has no {describe_variant(variant)} (it has "
                          f"{', '.join(sorted(self.unet_graphs.values()))}); {self.export_hint()}")

    def export_hint(self) -> str:
        """What to do about a missing graph: the schedules this bundle can run, and how to re-export."""
        names = " or ".join(f"`--schedule {name}`" for name in self.schedules)
        export = f"re-export with `postdiff export {self.model.source} --schedule NAME ...` for the schedule you want"
        return f"this bundle was exported to run {names}; use that, or {export}" if self.schedules else export

    def graph(self, name: str) -> GraphSpec:
        """The graph called ``name``; BundleError naming the available graphs otherwise."""
        if name not in self.graphs:
            raise BundleError(
                f"the bundle has no graph '{name}' (it has {sorted(self.graphs)}); "
                "re-export the model with the options that produce it"
            )
        return self.graphs[name]


def describe_variant(variant: UNetVariant) -> str:
    """A UNet variant in words, with its graph file, e.g. "batch-2 (guided) UNet graph at latent 32x32,
    DeepCache branch 1 write (unet-32x32-b2-deep1-write.onnx)"."""
    guided = "guided" if variant.batch == 2 else "guidance off"
    roles = []
    if variant.deep != "none":
        roles.append(f"DeepCache branch {variant.branch} {variant.deep}")
    if variant.xattn != "none":
        roles.append(f"cross-attention {variant.xattn}")
    file = unet_graph_name(variant.latent, variant.batch, variant.deep, variant.branch, variant.xattn)
    return (f"batch-{variant.batch} ({guided}) UNet graph at latent {variant.latent[0]}x{variant.latent[1]}"
            f"{', ' + ', '.join(roles) if roles else ''} ({file}.onnx)")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dump_manifest(manifest: Manifest) -> str:
    """The deterministic text of ``manifest.json`` (sorted keys, trailing newline)."""
    return dumps(manifest)


def load_manifest(bundle: Path, verify: bool = True) -> Manifest:
    """Read and check a bundle's manifest.

    Args:
        bundle: the bundle folder.
        verify: also check that every file exists and matches its recorded sha256, hashing only
            the files the bundle's stamp does not vouch for (:mod:`postdiff.runtime.stamp`).

    Raises:
        BundleError: missing folder or manifest, unknown format version, malformed manifest,
            missing file or sha256 mismatch.
    """
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"bundle folder {bundle} does not exist; create one with `postdiff export`")
    path = bundle / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(
            f"{bundle} has no {MANIFEST_NAME}: it is not a postdiff bundle, or its export did not "
            "finish; re-export it with `postdiff export`"
        )
    manifest = load_versioned(Manifest, path, FORMAT_VERSION, BundleError,
                              "re-export the bundle with this postdiff or upgrade postdiff")
    if verify:
        from postdiff.runtime.stamp import verify_bundle  # stamp builds on this module

        verify_bundle(bundle, manifest)
    return manifest


def bundle_files(manifest: Manifest) -> dict[str, str]:
    """Every file the manifest names, mapped to its expected sha256."""
    files = {spec.file: spec.sha256 for spec in manifest.graphs.values()}
    files.update({spec.external_data: spec.external_sha256 for spec in manifest.graphs.values() if spec.external_data})
    if manifest.tokenizer.file:
        files[manifest.tokenizer.file] = manifest.tokenizer.sha256
    if manifest.tokenizer_2 is not None and manifest.tokenizer_2.file:
        files[manifest.tokenizer_2.file] = manifest.tokenizer_2.sha256
    files[manifest.weights.file] = manifest.weights.sha256
    return files
