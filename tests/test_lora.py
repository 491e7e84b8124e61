"""`postdiff export --lora`: a LoRA fused into the exported weights, as diffusers fuses it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from postdiff.exporter.lora import fuse_lora
from postdiff.exporter.models import load_model
from postdiff.errors import ModelSourceError

SCALE = 0.7
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-4, alpha-8 LoRA of tiny-sd's UNet (attention, projections and resnet convs), made with
    peft and saved by diffusers (PEFT key names, alpha in the adapter metadata)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    folder = tmp_path_factory.mktemp("lora")
    model = load_model("random:tiny-sd")
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=TARGETS)
    model.unet.add_adapter(config)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(model.unet),
                                              unet_lora_adapter_metadata=config.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


def diffusers_fused(lora: Path, scale: float):
    """tiny-sd with ``lora`` loaded and fused by diffusers itself (then the LoRA layers unloaded)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    model = load_model("random:tiny-sd")
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    model.unet = pipe.unet
    return model


def max_weight_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def test_fused_weights_equal_diffusers(lora_file: Path) -> None:
    ours = load_model("random:tiny-sd")
    assert fuse_lora(ours, lora_file, SCALE) == len(load_file(str(lora_file))) // 2
    theirs = diffusers_fused(lora_file, SCALE)
    assert max_weight_diff(ours.unet, theirs.unet) <= 1e-6
    assert max_weight_diff(ours.unet, load_model("random:tiny-sd").unet) > 1e-2  # the LoRA did change them


def test_kohya_names_fuse_the_same(lora_file: Path, tmp_path: Path) -> None:
    """The same LoRA under kohya / A1111 names (LCM-LoRA's format), alpha as a tensor per module."""
    kohya = {}
    for key, value in load_file(str(lora_file)).items():
        stem, factor = key.removeprefix("unet.").rsplit(".lora_", 1)
        module = "lora_unet_" + stem.replace(".", "_")
        kohya[f"{module}.lora_{'down' if factor.startswith('A') else 'up'}.weight"] = value
        kohya[f"{module}.alpha"] = torch.tensor(8.0)
    path = tmp_path / "kohya.safetensors"
    save_file(kohya, str(path))
    a, b = load_model("random:tiny-sd"), load_model("random:tiny-sd")
    fuse_lora(a, lora_file, SCALE)
    fuse_lora(b, path, SCALE)
    assert max_weight_diff(a.unet, b.unet) == 0.0


def test_export_with_lora_matches_diffusers(lora_file: Path, tmp_path: Path) -> None:
    from postdiff.exporter.export import ExportOptions, export_bundle
    from postdiff.exporter.torch_reference import diffusers_generate
    from postdiff.runtime.pipeline import GenerateOptions, Pipeline

    bundle = tmp_path / "bundle"
    export_bundle(ExportOptions(source="random:tiny-sd", out=bundle, lora=str(lora_file), lora_scale=SCALE),
                  progress=False)
    pipeline = Pipeline(bundle)
    assert pipeline.manifest.model.lora == f"{lora_file.name} x{SCALE:g}"
    options = GenerateOptions(prompt="a red cube", seed=2, steps=4, guidance=7.5, scheduler="ddim")
    latents = pipeline.initial_latents(options.seed)
    ours = pipeline.generate(options, latents=latents)
    theirs, _ = diffusers_generate(diffusers_fused(lora_file, SCALE), "ddim", options.prompt, "", 4, 7.5, latents,
                                   32, 32)
    diff = float(np.max(np.abs(ours.latents - theirs)))
    print(f"tiny-sd + LoRA (scale {SCALE}): final latents vs diffusers' fused pipeline max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_lora_errors(lora_file: Path, tmp_path: Path) -> None:
    model = load_model("random:tiny-sd")
    with pytest.raises(ModelSourceError, match="does not exist"):
        fuse_lora(model, tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_file({"unet.down_blocks.0.nothing_here.lora_A.weight": torch.zeros(4, 32),
               "unet.down_blocks.0.nothing_here.lora_B.weight": torch.zeros(32, 4)}, str(bad))
    with pytest.raises(ModelSourceError, match="unet.down_blocks.0.nothing_here is not a module"):
        fuse_lora(model, bad)
    odd = tmp_path / "odd.safetensors"
    save_file({"unet.conv_in.weight": torch.zeros(1)}, str(odd))
    with pytest.raises(ModelSourceError, match="'unet.conv_in.weight' is not a LoRA factor"):
        fuse_lora(model, odd)
