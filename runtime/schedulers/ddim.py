"""DDIM, deterministic (eta = 0), in numpy float32.

Mirrors ``diffusers.DDIMScheduler`` of diffusers 0.42.1 (its defaults, its timestep spacings, its
``step`` with ``eta=0`` and ``use_clipped_model_output=False``), operation for operation in
float32. Not ported: dynamic thresholding, zero-terminal-SNR rescaling, eta > 0.

Notation (Song et al. 2021, "Denoising Diffusion Implicit Models"): abar_t is the cumulative
product of (1 - beta); a sample at t is x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from postdiff.runtime.schedulers.base import (
    COMMON_DEFAULTS,
    F32_ONE,
    Scheduler,
    f32_pair,
    vp_add_noise,
)


class DDIMScheduler(Scheduler):
    """Deterministic DDIM sampler (eta = 0)."""

    name = "ddim"
    diffusers_class = "DDIMScheduler"
    UNPORTED = ("thresholding", "rescale_betas_zero_snr")
    DEFAULTS: Mapping[str, Any] = {
        **COMMON_DEFAULTS,
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "timestep_spacing": "leading",
    }

    def __init__(self, config: Mapping[str, Any] | None = None, seed: int = 0) -> None:
        super().__init__(config, seed)
        # abar "before" the first training step, used when a step lands below t = 0.
        self.final_alpha_cumprod = F32_ONE if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.timesteps = np.arange(self.num_train_timesteps, dtype=np.int64)[::-1].copy()

    def _compute_timesteps(self, num_inference_steps: int) -> np.ndarray:
        n = num_inference_steps
        big_t = self.num_train_timesteps
        spacing = self.config["timestep_spacing"]
        self.num_inference_steps = n
        if spacing == "linspace":
            # n points spread over [0, T-1], rounded.
            return np.linspace(0, big_t - 1, n).round()[::-1].copy().astype(np.int64)
        if spacing == "leading":
            # Multiples of T // n from 0, shifted by steps_offset.
            ratio = big_t // n
            ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64)
            return ts + self.config["steps_offset"]
        # trailing: count down from T in steps of T / n, minus one.
        ratio = big_t / n
        return np.round(np.arange(big_t, 0, -ratio)).astype(np.int64) - 1

    # -- helpers -------------------------------------------------------------------------------

    def _x0_and_eps(self, model_output: np.ndarray, t: int, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """DDIM eq. 12's "predicted x0" and the matching epsilon, per prediction type."""
        abar_t = self.alphas_cumprod[t]
        one_minus_abar_t = F32_ONE - abar_t
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            # x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
            x0 = (sample - np.sqrt(one_minus_abar_t) * model_output) / np.sqrt(abar_t)
            eps = model_output
        elif kind == "sample":
            x0 = model_output
            eps = (sample - np.sqrt(abar_t) * x0) / np.sqrt(one_minus_abar_t)
        else:
            # v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022), so
            # x0 = sqrt(abar) x_t - sqrt(1 - abar) v and eps = sqrt(abar) v + sqrt(1 - abar) x_t.
            x0 = np.sqrt(abar_t) * sample - np.sqrt(one_minus_abar_t) * model_output
            eps = np.sqrt(abar_t) * model_output + np.sqrt(one_minus_abar_t) * sample
        if self.config["clip_sample"]:
            bound = np.float32(self.config["clip_sample_range"])
            x0 = np.clip(x0, -bound, bound)
        return x0, eps

    # -- interface -----------------------------------------------------------------------------

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> np.ndarray:
        """One DDIM step from ``timestep`` to ``timestep - T // n`` (DDIM eq. 12 with sigma_t = 0)."""
        model_output, sample = self._arrays("step", model_output, "model_output", sample, "sample")
        t = self._train_timestep(timestep)
        # As diffusers does, the previous timestep is t - T // n whatever the spacing.
        t_prev = t - self.num_train_timesteps // self.num_inference_steps
        abar_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        x0, eps = self._x0_and_eps(model_output, t, sample)
        # x_{t-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps
        direction = np.sqrt(F32_ONE - abar_prev) * eps
        return (np.sqrt(abar_prev) * x0 + direction).astype(np.float32, copy=False)

    def predict_x0(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> np.ndarray:
        """x0 as DDIM's step uses it (clipped when ``clip_sample``); any training timestep."""
        model_output, sample = f32_pair(model_output, "model_output", sample, "sample")
        x0, _ = self._x0_and_eps(model_output, self._train_timestep(timestep), sample)
        return x0.astype(np.float32, copy=False)

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, timestep: Any) -> np.ndarray:
        """q(x_t | x0) sample: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (DDPM eq. 4)."""
        return vp_add_noise(self.alphas_cumprod[self._train_timestep(timestep)], x0, noise)
