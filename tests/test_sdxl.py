"""SDXL: the bundle, the runtime's conditioning and every schedule against diffusers' StableDiffusionXLPipeline
and the torch reference; DeepCache branches numbered as DeepCache's own helper numbers them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deepcache_oracle import DeepCacheOracle
from postdiff.errors import InputError, ModelSourceError
from postdiff.exporter.layered_unet import LayeredUNet, LayerPlan, num_branches, xattn_modules
from postdiff.exporter.torch_reference import (DIFFUSERS_SCHEDULERS, TorchReferenceExecutor, diffusers_generate,
                                               sdxl_pipeline)
from postdiff.profiles.presets import resolve_schedule
from postdiff.runtime import names
from postdiff.runtime.conditioning import SizeConditioning
from postdiff.runtime.pipeline import GenerateOptions, Pipeline
from tolerances import latent_tolerance

SDXL_SCHEDULES = ("baseline", "postdiff-sdxl")


@pytest.fixture(scope="module")
def sdxl_model():
    from postdiff.exporter.models import load_model

    return load_model("random:tiny-sdxl")


@pytest.fixture(scope="module")
def sdxl_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sdxl (fp32, 32x32 px, 16x16 latent) with every graph of the baseline and postdiff-sdxl."""
    from postdiff.exporter.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-sdxl"
    export_bundle(ExportOptions(source="random:tiny-sdxl", out=out, schedules=SDXL_SCHEDULES), progress=False)
    return out


def test_manifest_carries_what_the_runtime_needs(sdxl_bundle: Path) -> None:
    manifest = Pipeline(sdxl_bundle).manifest
    assert manifest.sdxl is not None and manifest.sdxl.force_zeros_for_empty_prompt
    assert manifest.tokenizer_2 is not None and manifest.tokenizer_2.pad_id == 0  # SDXL's second pads with "!"
    encoder_2 = manifest.graph(names.TEXT_ENCODER_2)
    assert [t.name for t in encoder_2.outputs] == [names.HIDDEN_STATES, names.TEXT_EMBEDS]
    unet = manifest.graph("unet-16x16-b2")
    assert [t.name for t in unet.inputs] == [names.SAMPLE, names.TIMESTEP, names.CONTEXT, names.TEXT_EMBEDS,
                                             names.TIME_IDS]
    assert unet.input(names.CONTEXT).shape == (2, 77, 64) and unet.input(names.TIME_IDS).shape == (2, 6)
    # SDXL's first down block and last up block hold no attention: branch 0's shallow part has no attn2,
    # so its graph takes no context, but still the pooled embeddings and size ids (time embedding).
    shallow = manifest.graph("unet-16x16-b1-deep0-read-xattn-read")
    assert [t.name for t in shallow.inputs] == [names.SAMPLE, names.TIMESTEP, names.TEXT_EMBEDS, names.TIME_IDS,
                                                names.DEEP_FEATURE]


@pytest.mark.parametrize("scheduler,negative", [(s, "") for s in sorted(DIFFUSERS_SCHEDULERS)] + [("ddim", "blurry")])
def test_generation_matches_stable_diffusion_xl_pipeline(sdxl_bundle: Path, sdxl_model, scheduler: str,
                                                         negative: str) -> None:
    pipeline = Pipeline(sdxl_bundle)
    options = GenerateOptions(prompt="a red cube on a table", negative_prompt=negative, seed=3, steps=8,
                              guidance=5.0, scheduler=scheduler)
    latents = pipeline.initial_latents(options.seed)
    ours = pipeline.generate(options, latents=latents)
    theirs, image = diffusers_generate(sdxl_model, scheduler, options.prompt, options.negative_prompt, options.steps,
                                       options.guidance, latents, 32, 32, seed=options.seed)
    diff = float(np.max(np.abs(ours.latents - theirs)))
    print(f"tiny-sdxl / {scheduler} / negative {negative!r}: max abs {diff:.2e}, scale {np.abs(theirs).max():.1f}")
    assert diff <= latent_tolerance(theirs)
    assert int(np.max(np.abs(ours.image.astype(int) - image.astype(int)))) <= 1


def test_empty_negative_is_zeros_only_when_the_model_says_so(sdxl_bundle: Path, tmp_path: Path) -> None:
    import dataclasses
    import shutil

    pipeline = Pipeline(sdxl_bundle)
    zeroed = pipeline.conditioning(GenerateOptions(prompt="a cat", guidance=5.0))
    assert not zeroed.context[0].any() and not zeroed.text_embeds[0].any() and zeroed.context[1].any()
    copy = tmp_path / "no-zeros"
    shutil.copytree(sdxl_bundle, copy)
    from postdiff.runtime.manifest import MANIFEST_NAME, dump_manifest

    manifest = pipeline.manifest
    changed = dataclasses.replace(manifest, sdxl=dataclasses.replace(manifest.sdxl, force_zeros_for_empty_prompt=False))
    (copy / MANIFEST_NAME).write_text(dump_manifest(changed))
    encoded = Pipeline(copy).conditioning(GenerateOptions(prompt="a cat", guidance=5.0))
    assert encoded.context[0].any() and encoded.text_embeds[0].any()
    off = pipeline.conditioning(GenerateOptions(prompt="a cat", guidance=1.0))
    assert np.array_equal(off.context[0], off.context[1])


def test_size_conditioning_matches_diffusers(sdxl_bundle: Path, sdxl_model) -> None:
    """original_size / crops_coords_top_left / target_size reach the UNet as diffusers passes them."""
    pipeline = Pipeline(sdxl_bundle)
    sizes = SizeConditioning(original_size=(64, 48), crop_top_left=(8, 4), target_size=(40, 32))
    options = GenerateOptions(prompt="a red cube", negative_prompt="blurry", seed=1, steps=4, guidance=5.0,
                              scheduler="euler", sizes=sizes)
    latents = pipeline.initial_latents(options.seed)
    ours = pipeline.generate(options, latents=latents).latents
    pipe = sdxl_pipeline(sdxl_model, DIFFUSERS_SCHEDULERS["euler"].from_config(sdxl_model.scheduler_config))
    with torch.no_grad():
        theirs = pipe("a red cube", negative_prompt="blurry", height=32, width=32, num_inference_steps=4,
                      guidance_scale=5.0, latents=torch.from_numpy(latents), output_type="latent",
                      original_size=(64, 48), crops_coords_top_left=(8, 4), target_size=(40, 32)).images.numpy()
    plain = pipeline.generate(GenerateOptions(**{**options.__dict__, "sizes": SizeConditioning()}), latents=latents)
    assert float(np.max(np.abs(ours - theirs))) <= 1e-4
    assert float(np.max(np.abs(plain.latents - theirs))) > 1e-3  # the sizes do matter


def test_bad_sizes_are_refused(sdxl_bundle: Path) -> None:
    pipeline = Pipeline(sdxl_bundle)
    with pytest.raises(InputError, match="original size"):
        pipeline.generate(GenerateOptions(prompt="x", steps=1, sizes=SizeConditioning(original_size=(0, 32))))


# Every sampler is checked against diffusers' SDXL pipeline above and against the torch reference on
# SD schedules (test_postdiff_schedules); here one of each kind keeps the suite short: single-step,
# multistep (history reset at the switch) and stochastic.
@pytest.mark.parametrize("scheduler", ["ddim", "dpm-solver", "euler-ancestral"])
@pytest.mark.parametrize("preset", SDXL_SCHEDULES)
def test_runtime_matches_torch_reference(sdxl_bundle: Path, sdxl_model, preset: str, scheduler: str) -> None:
    schedule = resolve_schedule(preset)
    pipeline = Pipeline(sdxl_bundle)
    options = GenerateOptions(prompt="a blue sphere", negative_prompt="low quality", seed=5,
                              steps=len(schedule.steps), guidance=6.0, scheduler=scheduler)
    ours = pipeline.generate(options, schedule=schedule)
    reference = TorchReferenceExecutor(sdxl_model, schedule, pipeline.manifest.model.latent)
    latents = pipeline.initial_latents(options.seed, pipeline.executor(schedule).first_latent_shape())
    context = reference.encode(options.prompt, options.negative_prompt, options.guidance)
    theirs = reference.run(scheduler, latents, context, options.guidance, options.seed)
    diff = float(np.max(np.abs(ours.latents - theirs)))
    print(f"tiny-sdxl / {preset} / {scheduler}: runtime vs torch reference max abs {diff:.2e}, "
          f"scale {np.abs(theirs).max():.1f}")
    assert diff <= latent_tolerance(theirs)


def test_low_resolution_stage_carries_its_own_target_size(sdxl_bundle: Path) -> None:
    """docs/sdxl.md: at 3/4 the size ids are (full original, crop, the stage's own pixel size)."""
    pipeline = Pipeline(sdxl_bundle)
    conditioning = pipeline.conditioning(GenerateOptions(prompt="x"))
    assert conditioning.time_ids(2, (24, 24)).tolist() == [[32, 32, 0, 0, 24, 24]] * 2
    assert conditioning.time_ids(1, (32, 32)).tolist() == [[32, 32, 0, 0, 32, 32]]


# -- DeepCache on SDXL's layout -------------------------------------------------------------------------


def _unet_inputs(seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([801.0, 801.0]),
            torch.randn(2, 77, 64, generator=generator), torch.randn(2, 32, generator=generator),
            torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2))


def test_sdxl_layout_and_branch_count(sdxl_model) -> None:
    unet = sdxl_model.unet
    # conv_in + (2 resnets + downsampler) x 2 + 2 resnets = 9 skips, DeepCache ids 0..8.
    assert num_branches(unet) == 9
    names_ = xattn_modules(unet, LayerPlan())
    # depths (1, 1, 2) and a depth-2 mid block: 2x1 + 2x2 down, 2 mid, 3x2 + 3x1 up = 17 attn2 modules
    assert len(names_) == 17 and not any(n.startswith("down_blocks.0") or n.startswith("up_blocks.2") for n in names_)
    assert sum("mid_block" in n for n in names_) == 2
    assert xattn_modules(unet, LayerPlan(deep="read", branch=2)) == []  # no attention above the first downsampler


@pytest.mark.parametrize("branch", range(9))
def test_branches_are_numbered_as_deepcache_numbers_them(sdxl_model, branch: int) -> None:
    """A DeepCache read step fed the feature of a write step equals DeepCache's own cached step
    (the helper's skip rule, tests/deepcache_oracle.py) with the same cache_branch_id."""
    unet = sdxl_model.unet
    first, second = _unet_inputs(0), _unet_inputs(1)
    second = (second[0], torch.tensor([601.0, 601.0]), *first[2:])  # the prompt stays, sample and t move on
    oracle = DeepCacheOracle(unet, branch)
    kwargs = lambda x: dict(encoder_hidden_states=x[2], added_cond_kwargs={"text_embeds": x[3], "time_ids": x[4]})  # noqa: E731
    oracle.full(first[0], first[1], **kwargs(first))
    theirs = oracle.cached_step(second[0], second[1], **kwargs(second))
    write = LayeredUNet(unet, LayerPlan(deep="write", branch=branch))
    read = LayeredUNet(unet, LayerPlan(deep="read", branch=branch))
    with torch.no_grad():
        feature = write(*first)[1]
        feed = dict(zip([names.SAMPLE, names.TIMESTEP, names.CONTEXT, names.TEXT_EMBEDS, names.TIME_IDS], second))
        feed[names.DEEP_FEATURE] = feature
        ours = read(*(feed[n] for n in read.input_names))[0]
    full = unet(second[0], second[1], **kwargs(second)).sample
    assert float((ours - theirs).abs().max()) <= 1e-5
    assert float((theirs - full).abs().max()) > 1e-4  # the cached step really differs from a full one


@pytest.mark.parametrize("branch", [4, 5, 7])
def test_xattn_maps_replay_across_transformer_depths(sdxl_model, branch: int) -> None:
    """Shallow parts that hold transformers of SDXL's depths: replaying the written attn2 maps (one per
    transformer block, depth 1 or 2 here) gives what computing them gives."""
    unet = sdxl_model.unet
    inputs = dict(zip([names.SAMPLE, names.TIMESTEP, names.CONTEXT, names.TEXT_EMBEDS, names.TIME_IDS],
                      _unet_inputs(2)))
    write = LayeredUNet(unet, LayerPlan(deep="write", branch=branch, xattn="write"))
    with torch.no_grad():
        outputs = dict(zip(write.output_names, write(*(inputs[n] for n in write.input_names))))
        plain = LayeredUNet(unet, LayerPlan(deep="read", branch=branch))
        feed = {**inputs, **outputs}
        computed = plain(*(feed[n] for n in plain.input_names))[0]
        replay = LayeredUNet(unet, LayerPlan(deep="read", branch=branch, xattn="read"))
        replayed = replay(*(feed[n] for n in replay.input_names))[0]
    maps = [n for n in replay.input_names if n.startswith(names.XATTN_PREFIX)]
    assert maps and names.CONTEXT not in replay.input_names
    assert any(".transformer_blocks.1." in n for n in maps) == (branch >= 6)  # depth 2 from up_blocks.0 on
    assert float((replayed - computed).abs().max()) <= 1e-5


def test_sdxl_folder_round_trip(sdxl_model, tmp_path: Path) -> None:
    from postdiff.exporter.models import load_model

    folder = tmp_path / "sdxl"
    sdxl_pipeline(sdxl_model).save_pretrained(folder)
    loaded = load_model(str(folder))
    assert loaded.is_sdxl and loaded.force_zeros_for_empty_prompt
    assert torch.equal(loaded.unet.conv_in.weight, sdxl_model.unet.conv_in.weight)
    assert loaded.tokenizer_2.pad_token_id == sdxl_model.tokenizer_2.pad_token_id
    import shutil

    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(ModelSourceError, match="tokenizer_2"):
        load_model(str(folder))


def test_fp16_keeps_the_upcast_decoder_in_fp32(sdxl_model) -> None:
    from postdiff.exporter.export import fp32_roles
    from postdiff.exporter.models import load_model

    assert set(fp32_roles(sdxl_model)) == {names.TEXT_ENCODER, names.TEXT_ENCODER_2, names.VAE_DECODER}
    sdxl_model.vae.register_to_config(force_upcast=False)
    try:
        assert names.VAE_DECODER not in fp32_roles(sdxl_model)
    finally:
        sdxl_model.vae.register_to_config(force_upcast=True)
    assert names.VAE_DECODER not in fp32_roles(load_model("random:tiny-sd"))  # SD pipelines never upcast


def test_cli_size_flags(capsys, sdxl_bundle: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    from postdiff.cli import main

    out = tmp_path / "x.png"
    args = ["generate", "--prompt", "a cat", "--steps", "2", "--quiet", "--original-size", "64x48",
            "--crop-top-left", "0x8"]
    assert main([args[0], str(sdxl_bundle), *args[1:], "--out", str(out)]) == 0 and out.is_file()
    assert main([args[0], str(tiny_bundle), *args[1:], "--out", str(tmp_path / "sd.png")]) == 2
    assert "SDXL" in capsys.readouterr().err and not (tmp_path / "sd.png").exists()
    with pytest.raises(SystemExit) as exc:
        main([args[0], str(sdxl_bundle), "--prompt", "x", "--target-size", "big", "--out", str(tmp_path / "y.png")])
    assert exc.value.code == 2


def test_meta_device_macs_equal_the_exported_graphs(sdxl_bundle: Path) -> None:
    """tools/arch_macs (no weights, no export: what the full SDXL's figures come from) counts what the
    exporter counts on the ONNX graphs, variant by variant."""
    from postdiff.runtime.executor import concrete
    from postdiff.runtime.schedule import graph_variants
    from postdiff.tools.arch_macs import ArchMacs

    manifest = Pipeline(sdxl_bundle).manifest
    counter = ArchMacs("random:tiny-sdxl")
    variants = {v for name in SDXL_SCHEDULES for v in graph_variants(resolve_schedule(name))}
    assert len(variants) >= 10
    for variant in variants:
        exported = manifest.graph(manifest.unet_graph(concrete(manifest, variant))).macs
        assert counter.variant(variant) == exported, variant
