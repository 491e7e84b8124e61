"""Guidance as a model input: the guidance-scale embedding of LCM-distilled UNets.

A latent consistency model distilled with guidance (Luo et al. 2023, "Latent Consistency Models",
sec. 4.2) takes the guidance scale w as a condition instead of running classifier-free guidance:
one conditional evaluation per step (batch 1), the UNet adding a projection of the embedding of w
to its time embedding. The embedding is the sinusoidal one of the timestep (Vaswani et al. 2017)
applied to 1000 w: with half = D / 2 and f_k = exp(-k log(10000) / (half - 1)), k = 0..half-1,
e(w) = [sin(1000 w f_k)..., cos(1000 w f_k)...] (zero-padded to odd D), computed in float32 as
diffusers' ``StableDiffusionPipeline.get_guidance_scale_embedding`` does. diffusers' pipelines
feed w = guidance_scale - 1; so does the runtime.
"""

from __future__ import annotations

import math

import numpy as np


def guidance_embedding(guidance_scale: float, dim: int) -> np.ndarray:
    """The (1, ``dim``) float32 embedding of w = ``guidance_scale`` - 1."""
    w = np.float32(guidance_scale - 1.0) * np.float32(1000.0)
    half = dim // 2
    step = np.float32(math.log(10000.0)) / np.float32(half - 1)
    freqs = np.exp(np.arange(half, dtype=np.float32) * -step)
    angles = w * freqs
    emb = np.concatenate([np.sin(angles), np.cos(angles)])
    if dim % 2 == 1:
        emb = np.concatenate([emb, np.zeros(1, np.float32)])
    return emb.astype(np.float32)[None, :]
