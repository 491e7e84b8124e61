"""PixArt-alpha: the bundle, the runtime's T5 conditioning and every sampler against diffusers'
PixArtAlphaPipeline; per-resolution transformer graphs against diffusers at that resolution; every
PixArt schedule (mixed resolution, block cache, cross-attention cache) against the independent torch
reference on diffusers' own transformer forward (exporter/pixart_reference.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from postdiff.errors import InputError
from postdiff.exporter.layered_pixart import LayeredPixArt, cached_range
from postdiff.exporter.layered_unet import LayerPlan
from postdiff.exporter.pixart_models import PIXART_SCHEDULER_CONFIG
from postdiff.exporter.scheduler_config import normalize_config
from postdiff.exporter.torch_reference import TorchReferenceExecutor, diffusers_generate
from postdiff.profiles.presets import resolve_schedule
from postdiff.profiles.schedule_builder import ScheduleKnobs, build_schedule
from postdiff.runtime import names
from postdiff.runtime.pipeline import GenerateOptions, Pipeline
from postdiff.runtime.schedulers import available_schedulers
from tolerances import latent_tolerance

PIXART_SCHEDULES = ("baseline", "postdiff-pixart")
# Every sampler the runtime can build from PixArt-alpha's scheduler config (PNDM refuses it: the config
# leaves skip_prk_steps at False, whose Runge-Kutta warm-up is not ported).
PIXART_SAMPLERS = tuple(available_schedulers(normalize_config(PIXART_SCHEDULER_CONFIG)))


@pytest.fixture(scope="module")
def pixart_model():
    from postdiff.exporter.models import load_model

    return load_model("random:tiny-pixart")


@pytest.fixture(scope="module")
def pixart_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-pixart (fp32, 32x32 px, 16x16 latent) with the plain graphs and every graph of
    :func:`_knob_schedules` (postdiff-pixart among them)."""
    from postdiff.exporter.export import ExportOptions, export_bundle
    from postdiff.runtime.jsonio import write_json_atomic

    folder = tmp_path_factory.mktemp("pixart")
    files = ["baseline"]
    for schedule in _knob_schedules()[1:]:
        path = folder / f"{schedule.name}.json"
        write_json_atomic(path, schedule)
        files.append(str(path))
    out = folder / "tiny-pixart"
    export_bundle(ExportOptions(source="random:tiny-pixart", out=out, schedules=(*files, "postdiff-pixart")),
                  progress=False)
    return out


def _knob_schedules() -> list:
    return [
        resolve_schedule("postdiff-pixart"),
        build_schedule(ScheduleKnobs(steps=8, deepcache_interval=3, deepcache_branch=0), "block-cache-b0"),
        build_schedule(ScheduleKnobs(steps=8, deepcache_interval=2, deepcache_branch=2, xattn_gate=3,
                                     xattn_mode="ave"), "block-cache-b2-ave"),
    ]


def test_every_sampler_but_pndm_is_offered() -> None:
    assert set(PIXART_SAMPLERS) == {"ddim", "euler", "euler-ancestral", "dpm-solver", "unipc", "lcm"}


def test_manifest_carries_what_the_runtime_needs(pixart_bundle: Path) -> None:
    manifest = Pipeline(pixart_bundle).manifest
    assert manifest.pixart is not None and manifest.pixart.blocks == 6 and manifest.pixart.learned_sigma
    assert manifest.pixart.micro_conditions and manifest.pixart.interpolation_scale == 2.0
    assert manifest.tokenizer.kind == "t5" and manifest.tokenizer.max_length == 120 and manifest.tokenizer.pad_id == 0
    encoder = manifest.graph(names.TEXT_ENCODER)
    assert [t.name for t in encoder.inputs] == [names.INPUT_IDS, names.ATTENTION_MASK]
    plain = manifest.graph("unet-16x16-b2")
    assert [t.name for t in plain.inputs] == [names.SAMPLE, names.TIMESTEP, names.CONTEXT, names.ENCODER_MASK]
    assert plain.outputs[0].shape == (2, 4, 16, 16)  # the epsilon half of the 8 learned-sigma channels
    # the 3/4 stage: 12x12 latent, 36 tokens of width 24; branch 1 reads blocks [1, 5) as one residual
    read = manifest.graph("unet-12x12-b1-deep1-read-xattn-read")
    assert [t.name for t in read.inputs] == [names.SAMPLE, names.TIMESTEP, names.DEEP_FEATURE,
                                             "xattn/transformer_blocks.0.attn2", "xattn/transformer_blocks.5.attn2"]
    assert read.input(names.DEEP_FEATURE).shape == (1, 36, 24)
    assert read.macs < manifest.graph("unet-12x12-b1-xattn-read").macs / 2


def test_tokenizer_matches_the_t5_tokenizer_diffusers_uses(pixart_bundle: Path, pixart_model) -> None:
    pipeline = Pipeline(pixart_bundle)
    for prompt in ("A Red cube on a table ", "", "blurry, low quality", "a red cube " * 60):
        ids, mask = pipeline.tokenizer.encode_with_mask(prompt)
        theirs_ids, theirs_mask = pixart_model.tokenize(prompt)
        np.testing.assert_array_equal(ids, theirs_ids.numpy())
        np.testing.assert_array_equal(mask, theirs_mask.numpy())
    assert int(mask.sum()) == 120 and ids[0, -1] == 1  # truncated to 120 with </s> last


@pytest.mark.parametrize("scheduler,negative", [(s, "") for s in PIXART_SAMPLERS]
                         + [("dpm-solver", "blurry, low quality")])
def test_generation_matches_pixart_alpha_pipeline(pixart_bundle: Path, pixart_model, scheduler: str,
                                                  negative: str) -> None:
    pipeline = Pipeline(pixart_bundle)
    options = GenerateOptions(prompt="A red cube on a table", negative_prompt=negative, seed=3, steps=8,
                              guidance=4.5, scheduler=scheduler)
    latents = pipeline.initial_latents(options.seed)
    ours = pipeline.generate(options, latents=latents)
    theirs, image = diffusers_generate(pixart_model, scheduler, options.prompt, options.negative_prompt,
                                       options.steps, options.guidance, latents, 32, 32, seed=options.seed)
    diff = float(np.max(np.abs(ours.latents - theirs)))
    print(f"tiny-pixart / {scheduler} / negative {negative!r}: max abs {diff:.2e}, scale {np.abs(theirs).max():.1f}")
    assert diff <= latent_tolerance(theirs)
    assert int(np.max(np.abs(ours.image.astype(int) - image.astype(int)))) <= 1


def test_guidance_off_runs_the_conditional_batch_as_diffusers(pixart_bundle: Path, pixart_model) -> None:
    pipeline = Pipeline(pixart_bundle)
    options = GenerateOptions(prompt="a cat", seed=1, steps=4, guidance=1.0, scheduler="dpm-solver")
    latents = pipeline.initial_latents(options.seed)
    ours = pipeline.generate(options, latents=latents)
    theirs, _ = diffusers_generate(pixart_model, "dpm-solver", "a cat", "", 4, 1.0, latents, 32, 32)
    assert float(np.max(np.abs(ours.latents - theirs))) <= latent_tolerance(theirs)


@pytest.mark.parametrize("latent", [(12, 12), (16, 16), (12, 20)])
def test_each_resolution_graph_is_diffusers_at_that_resolution(pixart_model, latent: tuple[int, int]) -> None:
    """The traced position embedding and micro-conditions of one size are diffusers' at that size (and a
    graph of another size gives another embedding): the plain layered forward equals
    ``PixArtTransformer2DModel.forward`` fed the pipeline's micro-conditions at that pixel size."""
    transformer = pixart_model.unet
    module = LayeredPixArt(transformer, LayerPlan(), pixart_model.vae_scale_factor)
    generator = torch.Generator().manual_seed(0)
    inputs = module.example_inputs(2, *latent, 120, generator)
    h, w = (side * pixart_model.vae_scale_factor for side in latent)
    added = {"resolution": torch.tensor([[h, w]] * 2, dtype=torch.float32),
             "aspect_ratio": torch.tensor([[h / w]] * 2, dtype=torch.float32)}
    with torch.no_grad():
        ours = module(*inputs)[0]
        theirs = transformer(inputs[0], encoder_hidden_states=inputs[2], encoder_attention_mask=inputs[3],
                             timestep=inputs[1], added_cond_kwargs=added, return_dict=False)[0][:, :4]
    assert float((ours - theirs).abs().max()) <= 1e-5
    # the micro-conditions matter: the wrong size differs
    wrong = {"resolution": added["resolution"] * 2, "aspect_ratio": added["aspect_ratio"]}
    with torch.no_grad():
        other = transformer(inputs[0], encoder_hidden_states=inputs[2], encoder_attention_mask=inputs[3],
                            timestep=inputs[1], added_cond_kwargs=wrong, return_dict=False)[0][:, :4]
    assert float((other - theirs).abs().max()) > 1e-3


def test_block_cache_branches_are_ranges_of_blocks(pixart_model) -> None:
    assert cached_range(pixart_model.unet, 0) == (0, 6) and cached_range(pixart_model.unet, 2) == (2, 4)
    with pytest.raises(InputError, match="valid branches are 0..2"):
        cached_range(pixart_model.unet, 3)


def test_read_fed_its_write_equals_the_full_forward(pixart_model) -> None:
    """A block-cache read fed the residual its write emitted at the same inputs, and a cross-attention read fed
    the maps, give the full forward (the cut loses nothing)."""
    transformer, scale = pixart_model.unet, pixart_model.vae_scale_factor
    generator = torch.Generator().manual_seed(1)
    full = LayeredPixArt(transformer, LayerPlan(), scale)
    sample, timestep, context, mask = full.example_inputs(1, 16, 16, 120, generator)
    for branch in (0, 1, 2):
        write = LayeredPixArt(transformer, LayerPlan(deep="write", branch=branch, xattn="write"), scale)
        read = LayeredPixArt(transformer, LayerPlan(deep="read", branch=branch, xattn="read"), scale)
        with torch.no_grad():
            reference = full(sample, timestep, context, mask)[0]
            noise, feature, *maps = write(sample, timestep, context, mask)
            by_name = dict(zip(write.xattn_names, maps))
            replayed = read(sample, timestep, feature, *(by_name[n] for n in read.xattn_names))[0]
        assert float((noise - reference).abs().max()) <= 1e-6
        assert float((replayed - reference).abs().max()) <= 1e-5


# One sampler of each kind: multistep (PixArt's own), single-step, stochastic.
@pytest.mark.parametrize("scheduler", ["dpm-solver", "ddim", "euler-ancestral"])
def test_schedules_match_the_independent_torch_reference(pixart_bundle: Path, pixart_model, scheduler: str) -> None:
    pipeline = Pipeline(pixart_bundle)
    for schedule in _knob_schedules():
        options = GenerateOptions(prompt="an astronaut riding a horse", seed=5, guidance=4.5, scheduler=scheduler)
        executor = pipeline.executor(schedule)
        latents = pipeline.initial_latents(options.seed, executor.first_latent_shape())
        ours = pipeline.generate(options, latents=latents, schedule=schedule).latents
        reference = TorchReferenceExecutor(pixart_model, schedule, (16, 16))
        context = reference.encode(options.prompt, options.negative_prompt, options.guidance)
        theirs = reference.run(scheduler, latents, context, options.guidance, options.seed)
        diff = float(np.max(np.abs(ours - theirs)))
        print(f"{schedule.name} / {scheduler}: max abs {diff:.2e}, scale {np.abs(theirs).max():.1f}")
        assert diff <= latent_tolerance(theirs), schedule.name


def test_caches_change_the_result(pixart_bundle: Path) -> None:
    """postdiff-pixart is not the baseline in disguise: its latents differ from the baseline's."""
    pipeline = Pipeline(pixart_bundle)
    options = GenerateOptions(prompt="a red cube", seed=0, guidance=4.5)
    base = pipeline.generate(options, schedule=resolve_schedule("baseline")).latents
    ours = pipeline.generate(options, schedule=resolve_schedule("postdiff-pixart")).latents
    assert float(np.max(np.abs(base - ours))) > 1e-2


def test_a_local_pixart_folder_exports_as_the_builtin(tmp_path: Path, pixart_model, pixart_bundle: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A PixArtAlphaPipeline.save_pretrained folder (tokenizer.json inside: no sentencepiece needed) is recognised,
    loads, exports and generates what the built-in it was saved from generates (its default size is
    sample_size x the VAE's factor, 256 px here; exported at the built-in's 32 px).

    The same export checks the T5-XXL path (19 GB, over protobuf's 2 GB): with the threshold lowered, the
    text encoder's weights go to one `text_encoder.weights` file the manifest lists and hashes; generation is
    unchanged and a corrupted weights file is caught by verification."""
    import onnx

    import postdiff.exporter.export as export_module
    from postdiff.errors import BundleError
    from postdiff.exporter.options import source_layout
    from postdiff.exporter.torch_reference import pixart_pipeline
    from postdiff.runtime.manifest import bundle_files, load_manifest

    folder = tmp_path / "pixart-folder"
    pixart_pipeline(pixart_model).save_pretrained(folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        __import__("json").dumps(pixart_model.scheduler_config))
    assert source_layout(str(folder)) == "pixart"
    monkeypatch.setattr(export_module, "OWN_WEIGHTS_FILE_BYTES", 1)
    out = tmp_path / "bundle"
    export_module.export_bundle(export_module.ExportOptions(source=str(folder), out=out, resolution=(32, 32)),
                                progress=False)
    manifest = load_manifest(out)
    assert manifest.model.source == "pixart-folder"
    encoder = manifest.graph(names.TEXT_ENCODER)
    assert encoder.external_data == "text_encoder.weights" and "text_encoder.weights" in bundle_files(manifest)
    graph = onnx.load(str(out / "text_encoder.onnx"), load_external_data=False)
    external = [t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(len(t.raw_data) < 1024 for t in graph.graph.initializer)
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {"text_encoder.weights"}
    options = GenerateOptions(prompt="a red cube", seed=2, steps=4, guidance=4.5)
    ours = Pipeline(out).generate(options).latents
    builtin = Pipeline(pixart_bundle).generate(options).latents
    assert float(np.max(np.abs(ours - builtin))) <= 1e-5 * max(1.0, float(np.abs(builtin).max()))
    with open(out / "text_encoder.weights", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError, match="text_encoder.weights"):
        load_manifest(out)


def test_a_pixart_folder_missing_a_part_is_refused(tmp_path: Path) -> None:
    from postdiff.errors import ModelSourceError
    from postdiff.exporter.options import source_layout

    for name in ("transformer", "tokenizer", "vae", "scheduler"):
        (tmp_path / name).mkdir()
    with pytest.raises(ModelSourceError, match=r"PixArt-alpha folder .* lacks \['text_encoder'\]"):
        source_layout(str(tmp_path))


def test_architecture_macs_equal_the_exported_graphs_counts(pixart_bundle: Path) -> None:
    """tools/pixart_macs (meta device, no weights: what the real PixArt-alpha's figures in docs/pixart.md come
    from) counts every tiny-pixart variant of postdiff-pixart as the exporter's ONNX count does."""
    from postdiff.runtime.executor import concrete
    from postdiff.runtime.schedule import plan_steps
    from postdiff.tools.pixart_macs import PixArtMacs, _builtin_config

    manifest = Pipeline(pixart_bundle).manifest
    counter = PixArtMacs(*_builtin_config("random:tiny-pixart"), latent=manifest.model.latent)
    variants = {v for plan in plan_steps(resolve_schedule("postdiff-pixart")) for v in (plan.switch_from, plan.variant)
                if v is not None}
    for variant in variants:
        graph = manifest.graph(manifest.unet_graph(concrete(manifest, variant)))
        assert counter.variant(variant) == pytest.approx(graph.macs, rel=1e-3), graph.file


@pytest.mark.parametrize("graph,latent", [("unet-12x12-b2-deep1-write", (12, 12)), ("unet-16x16-b2", (16, 16))])
def test_each_exported_stage_graph_is_diffusers_at_its_resolution(pixart_bundle: Path, pixart_model, graph: str,
                                                                  latent: tuple[int, int]) -> None:
    """The exported ONNX graph of each stage of postdiff-pixart (3/4 and full) against diffusers'
    PixArtTransformer2DModel run at that stage's size with the pipeline's micro-conditions there, on a
    padded T5 mask: the position embedding, micro-conditions and epsilon half baked into the graph are
    diffusers' at that resolution."""
    import onnxruntime as ort

    generator = torch.Generator().manual_seed(7)
    sample = torch.randn(2, 4, *latent, generator=generator)
    context = torch.randn(2, 120, 32, generator=generator)
    mask = (torch.arange(120)[None, :] < torch.tensor([[5], [11]])).long()
    timestep = torch.tensor([321.0, 321.0])
    session = ort.InferenceSession(str(pixart_bundle / f"{graph}.onnx"), providers=["CPUExecutionProvider"])
    ours = session.run([names.NOISE_PRED], {names.SAMPLE: sample.numpy(), names.TIMESTEP: timestep.numpy(),
                                            names.CONTEXT: context.numpy(), names.ENCODER_MASK: mask.numpy()})[0]
    h, w = (side * pixart_model.vae_scale_factor for side in latent)
    added = {"resolution": torch.tensor([h, w]).repeat(2, 1).float(),
             "aspect_ratio": torch.tensor([float(h / w)]).repeat(2, 1)}
    with torch.no_grad():
        theirs = pixart_model.unet(sample, encoder_hidden_states=context, encoder_attention_mask=mask,
                                   timestep=timestep, added_cond_kwargs=added, return_dict=False)[0].chunk(2, dim=1)[0]
    assert float(np.max(np.abs(ours - theirs.numpy()))) <= 1e-4 * max(1.0, float(theirs.abs().max()))
