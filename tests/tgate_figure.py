"""`python tests/tgate_figure.py MODEL STEPS GATE` (from the repository root): the T-GATE before/after figure: runtime schedules vs the independent T-GATE oracle (tests/tgate_oracle.py).
before = the old numbering (old --xattn-gate G == new --xattn-gate G+1); after = the new one."""
import sys
import tempfile
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tgate_oracle import tgate_generate
from postdiff.exporter.export import ExportOptions, export_bundle
from postdiff.exporter.models import load_model
from postdiff.profiles.schedule_builder import ScheduleKnobs, build_schedule
from postdiff.runtime.jsonio import dumps
from postdiff.runtime.pipeline import GenerateOptions, Pipeline

model_name, steps, gate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
prompt, negative = ("7", "") if model_name == "digits" else ("a red cube", "blurry")
tmp = Path(tempfile.mkdtemp())
scheds = {(m, g): build_schedule(ScheduleKnobs(steps=steps, xattn_gate=g, xattn_mode=m), f"g{g}{m}")
          for m in ("cond", "ave") for g in (gate, gate + 1)}
paths = []
for key, s in scheds.items():
    p = tmp / f"{s.name}.json"; p.write_text(dumps(s)); paths.append(str(p))
export_bundle(ExportOptions(source=model_name, out=tmp / "b", schedules=tuple(paths)), progress=False)
pipe = Pipeline(tmp / "b"); model = load_model(model_name)
guidance = pipe.manifest.model.default_guidance
opts = GenerateOptions(prompt=prompt, negative_prompt=negative, seed=0, steps=steps, guidance=guidance,
                       scheduler="ddim")  # the oracle runs DDIM
ctx = torch.cat([model.encode_ids(model.token_ids(t)) for t in (negative, prompt)])
lat = pipe.initial_latents(0)
for mode in ("ave", "cond"):
    theirs = tgate_generate(model.unet, model.scheduler_config, ctx, lat, steps, gate, mode, guidance)
    base = tgate_generate(model.unet, model.scheduler_config, ctx, lat, steps, steps, mode, guidance)  # no gate
    after = pipe.generate(opts, schedule=scheds[(mode, gate)]).latents
    before = pipe.generate(opts, schedule=scheds[(mode, gate + 1)]).latents
    print(f"{model_name} {steps} steps, T-GATE gate_step={gate}, mode {mode}: max abs vs T-GATE oracle: "
          f"old numbering {np.abs(before - theirs).max():.3g}, new numbering {np.abs(after - theirs).max():.2g}; "
          f"gated vs ungated baseline {np.abs(theirs - base).max():.3g}")
