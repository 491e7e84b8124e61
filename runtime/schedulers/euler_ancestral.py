"""Euler Ancestral: the Euler step of the probability-flow ODE plus fresh noise, numpy float32.

Mirrors ``diffusers.EulerAncestralDiscreteScheduler`` of diffusers 0.42.1 operation for operation in
float32 (timestep spacings, the ``init_noise_sigma`` rule, epsilon and v prediction). The noise
diffusers draws from a torch generator comes here from :attr:`Scheduler.noise`, by default
:func:`~postdiff.runtime.schedulers.base.step_noise` seeded by the generation seed, so a run is
reproducible across machines and independent of resets; with the same noise the two agree.
Not ported: zero-terminal-SNR rescaling.

Notation (Karras et al. 2022; k-diffusion's ``sample_euler_ancestral``): going from sigma to
sigma_next, the step splits sigma_next^2 = sigma_down^2 + sigma_up^2 with
sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2) (the DDPM ancestral variance,
eta = 1); the ODE is integrated down to sigma_down and noise of std sigma_up is added.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from postdiff.runtime.schedulers.base import COMMON_DEFAULTS
from postdiff.runtime.schedulers.euler import EulerDiscreteScheduler


class EulerAncestralDiscreteScheduler(EulerDiscreteScheduler):
    """Euler Ancestral sampler (stochastic: seeded noise every step)."""

    name = "euler-ancestral"
    diffusers_class = "EulerAncestralDiscreteScheduler"
    DEFAULTS: Mapping[str, Any] = {**COMMON_DEFAULTS, "timestep_spacing": "linspace"}
    UNPORTED = ("rescale_betas_zero_snr",)
    stochastic = True

    def __init__(self, config: Mapping[str, Any] | None = None, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.timesteps = self.timesteps.astype(np.float64)  # float64 until set_timesteps, as diffusers

    def _check_config(self) -> None:
        self._allowed("prediction_type", ("epsilon", "v_prediction"))

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> np.ndarray:
        """x_next = x + (x - x0) / sigma (sigma_down - sigma) + sigma_up z, z ~ N(0, I) from
        ``noise(index, shape)``."""
        model_output, sample = self._arrays("step", model_output, "model_output", sample, "sample")
        index = self.index_for_timestep(timestep)
        sigma = self.sigmas[index]
        sigma_next = self.sigmas[index + 1]
        x0 = self._x0(model_output, sigma, sample)
        sigma_up = np.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        sigma_down = np.sqrt(sigma_next**2 - sigma_up**2)
        derivative = (sample - x0) / sigma
        prev = sample + derivative * (sigma_down - sigma)
        noise = np.asarray(self.noise(index, sample.shape), dtype=np.float32)
        self._next_index = index + 1
        return (prev + noise * sigma_up).astype(np.float32, copy=False)
