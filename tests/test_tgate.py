"""``--xattn-gate M`` is T-GATE's ``gate_step``: checked against an independent implementation of
T-GATE's semantics (tests/tgate_oracle.py), for both cached-map modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from postdiff.profiles.schedule_builder import ScheduleKnobs, build_schedule
from postdiff.runtime.jsonio import dumps
from postdiff.runtime.pipeline import GenerateOptions, Pipeline
from tgate_oracle import tgate_generate

STEPS, GATE = 8, 3


@pytest.fixture(scope="module")
def gated_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from postdiff.exporter.export import ExportOptions, export_bundle

    folder = tmp_path_factory.mktemp("tgate")
    schedules = {mode: build_schedule(ScheduleKnobs(steps=STEPS, xattn_gate=GATE, xattn_mode=mode), f"tgate-{mode}")
                 for mode in ("cond", "ave")}
    for mode, schedule in schedules.items():
        (folder / f"{mode}.json").write_text(dumps(schedule))
    out = folder / "bundle"
    export_bundle(ExportOptions(source="random:tiny-sd", out=out, schedules=(str(folder / "cond.json"),)),
                  progress=False)
    return out, schedules


@pytest.mark.parametrize("mode", ["cond", "ave"])
def test_xattn_gate_equals_tgate_gate_step(gated_bundle, tiny_model, mode: str) -> None:
    bundle, schedules = gated_bundle
    pipeline = Pipeline(bundle)
    options = GenerateOptions(prompt="a red cube", negative_prompt="blurry", seed=3, steps=STEPS, guidance=7.0,
                              scheduler="ddim")  # the oracle steps DDIM
    ours = pipeline.generate(options, schedule=schedules[mode])
    context = torch.cat([tiny_model.encode_ids(tiny_model.token_ids(text)) for text in ("blurry", "a red cube")])
    latents = pipeline.initial_latents(options.seed)
    theirs = tgate_generate(tiny_model.unet, tiny_model.scheduler_config, context, latents, STEPS, GATE, mode,
                            options.guidance)
    assert float(np.max(np.abs(ours.latents - theirs))) <= 1e-4
    # The oracle can tell the numbering apart: gating one step later is a different computation.
    later = tgate_generate(tiny_model.unet, tiny_model.scheduler_config, context, latents, STEPS, GATE + 1, mode,
                           options.guidance)
    assert float(np.max(np.abs(ours.latents - later))) > 1e-3
