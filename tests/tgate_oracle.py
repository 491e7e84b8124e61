"""An independent implementation of T-GATE's cross-attention gating, the oracle for our xattn schedules.

Written from T-GATE 1.0.0's semantics (DESIGN §1; reference/paper-postdiff-deepcache-tgate.md §3),
not from postdiff: the plain diffusers UNet with an attention processor on every cross-attention
(attn2) module, diffusers' own scheduler and a loop of its own. With ``gate_step = G``:

* steps 0 … G−1 run with classifier-free guidance (batch 2) and compute cross-attention;
* at step G−1 the output of every attn2 module (after its output projection) is kept: the mean of
  the two halves ("ave", T-GATE) or the conditional half ("cond", PostDiff);
* from step G on, guidance is off (batch 1, conditional prompt) and every attn2 returns its kept
  output without computing anything.

Nothing here uses postdiff's schedules, executor, layered UNet or graphs.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import AttnProcessor


class _Gate:
    """State shared by the attn2 processors: what the current step does, and the kept outputs."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.phase = "compute"  # compute | keep | replay
        self.kept: dict[int, torch.Tensor] = {}


class _GatedCrossAttention:
    """attn2 processor: computes as diffusers does, keeps at the gate, replays after it."""

    def __init__(self, gate: _Gate) -> None:
        self.gate = gate
        self.plain = AttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if self.gate.phase == "replay":
            return self.gate.kept[id(attn)]
        out = self.plain(attn, hidden_states, encoder_hidden_states, attention_mask)
        if self.gate.phase == "keep":
            uncond, cond = out.chunk(2)
            self.gate.kept[id(attn)] = (uncond + cond) / 2 if self.gate.mode == "ave" else cond
        return out


@torch.no_grad()
def tgate_generate(unet, scheduler_config: dict, context: torch.Tensor, latents: np.ndarray, steps: int,
                   gate_step: int, mode: str, guidance: float) -> np.ndarray:
    """Final latents of a DDIM run with T-GATE's gating; ``context`` is [negative; positive] (2, L, D)."""
    gate = _Gate(mode)
    gated = _GatedCrossAttention(gate)
    original = dict(unet.attn_processors)
    unet.set_attn_processor({name: gated if name.endswith("attn2.processor") else AttnProcessor()
                             for name in unet.attn_processors})
    try:
        scheduler = DDIMScheduler.from_config(scheduler_config)
        scheduler.set_timesteps(steps)
        x = torch.from_numpy(latents) * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps):
            if i < gate_step:
                gate.phase = "keep" if i == gate_step - 1 else "compute"
                batch = scheduler.scale_model_input(torch.cat([x, x]), t)
                uncond, cond = unet(batch, t, encoder_hidden_states=context, return_dict=False)[0].chunk(2)
                eps = uncond + guidance * (cond - uncond)
            else:
                gate.phase = "replay"
                eps = unet(scheduler.scale_model_input(x, t), t, encoder_hidden_states=context[1:],
                           return_dict=False)[0]
            x = scheduler.step(eps, t, x, return_dict=False)[0]
        return x.numpy()
    finally:
        unet.set_attn_processor(original)
