"""Euler sampler of the probability-flow ODE in sigma (k-diffusion style), numpy float32.

Mirrors ``diffusers.EulerDiscreteScheduler`` of diffusers 0.42.1 with its deterministic defaults
(``s_churn = 0``, ``interpolation_type="linear"``, discrete timesteps), operation for operation
in float32: timestep spacings, ``final_sigmas_type``, the ``init_noise_sigma`` rule, Karras sigmas
(``use_karras_sigmas`` with ``sigma_min``/``sigma_max``). Not ported: churn noise,
exponential/beta sigmas, "log_linear" interpolation, continuous timesteps, zero-terminal-SNR
rescaling.

Notation (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models"): samples live in the variance-exploding space x = x0 + sigma eps with
sigma = sqrt((1 - abar) / abar); the model sees x / sqrt(sigma^2 + 1), the VP-space sample.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from postdiff.runtime.schedulers.base import (
    COMMON_DEFAULTS,
    F32_ONE,
    Scheduler,
    as_f32,
    karras_sigmas,
    sigma_to_t,
    sigmas_at,
    ve_sigmas,
)


class EulerDiscreteScheduler(Scheduler):
    """Deterministic Euler sampler over a discrete sigma schedule."""

    name = "euler"
    diffusers_class = "EulerDiscreteScheduler"
    DEFAULTS: Mapping[str, Any] = {
        **COMMON_DEFAULTS,
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "final_sigmas_type": "zero",
        "timestep_spacing": "linspace",
    }
    UNPORTED = ("use_exponential_sigmas", "use_beta_sigmas", "timestep_type", "rescale_betas_zero_snr")

    def __init__(self, config: Mapping[str, Any] | None = None, seed: int = 0) -> None:
        super().__init__(config, seed)
        self._train_sigmas = ve_sigmas(self.alphas_cumprod)
        n = self.num_train_timesteps
        # Before set_timesteps: every training timestep, highest first, then sigma = 0.
        self.sigmas = np.concatenate([self._train_sigmas[::-1], np.zeros(1, np.float32)])
        self.timesteps = np.linspace(0, n - 1, n, dtype=np.float64)[::-1].astype(np.float32)
        self.init_noise_sigma = self._init_noise_sigma()

    def _init_noise_sigma(self) -> float:
        """Std of the initial latent: sigma_max, or sqrt(sigma_max^2 + 1) for "leading" spacing
        (diffusers' rule, kept for parity)."""
        sigma_max = self.sigmas.max()
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return float(sigma_max)
        return float(np.sqrt(sigma_max * sigma_max + F32_ONE))

    def _compute_timesteps(self, num_inference_steps: int) -> np.ndarray:
        n = num_inference_steps
        big_t = self.num_train_timesteps
        spacing = self.config["timestep_spacing"]
        if spacing == "linspace":
            ts = np.linspace(0, big_t - 1, n, dtype=np.float32)[::-1].copy()
        elif spacing == "leading":
            ratio = big_t // n
            ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.float32)
            ts += np.float32(self.config["steps_offset"])
        else:  # trailing
            ratio = big_t / n
            ts = np.arange(big_t, 0, -ratio).round().copy().astype(np.float32)
            ts -= F32_ONE
        # Euler Ancestral (a subclass) has neither key: final sigma 0, no Karras sigmas.
        self.sigmas = sigmas_at(ts, self._train_sigmas, self.config.get("final_sigmas_type", "zero"))
        if self.config.get("use_karras_sigmas"):
            # Karras et al. eq. 5 between the schedule's own end points (or the configured ones),
            # each sigma mapped back to a fractional training timestep.
            spaced = np.interp(ts, np.arange(0, len(self._train_sigmas)), self._train_sigmas)
            lo = self.config["sigma_min"] if self.config["sigma_min"] is not None else float(spaced[-1])
            hi = self.config["sigma_max"] if self.config["sigma_max"] is not None else float(spaced[0])
            sigmas = karras_sigmas(lo, hi, n)
            ts = sigma_to_t(sigmas, np.log(self._train_sigmas)).astype(np.float32)
            self.sigmas = np.concatenate([sigmas, self.sigmas[-1:]]).astype(np.float32)
        self.num_inference_steps = n
        self.init_noise_sigma = self._init_noise_sigma()
        return ts.astype(np.float32)

    # -- formulas ------------------------------------------------------------------------------

    def _x0(self, model_output: np.ndarray, sigma: np.float32, sample: np.ndarray) -> np.ndarray:
        """Denoised estimate D(x; sigma) from the model output, per prediction type."""
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            # x0 = x - sigma eps
            return sample - sigma * model_output
        if kind == "v_prediction":
            # With c = 1 / sqrt(sigma^2 + 1): x0 = -sigma c v + x / (sigma^2 + 1)
            var = sigma * sigma + F32_ONE
            return model_output * (-sigma / np.sqrt(var)) + sample / var
        return model_output

    # -- interface -----------------------------------------------------------------------------

    def scale_model_input(self, sample: np.ndarray, timestep: Any) -> np.ndarray:
        """x / sqrt(sigma^2 + 1): the VP-space sample the model expects (Karras c_in)."""
        self._require_timesteps("scale_model_input")
        sample = as_f32(sample, "sample")
        sigma = self.sigmas[self.index_for_timestep(timestep)]
        return (sample / np.sqrt(sigma * sigma + F32_ONE)).astype(np.float32, copy=False)

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> np.ndarray:
        """One Euler step of the ODE dx/dsigma = (x - x0) / sigma (Karras et al., sigma(t) = t;
        their algorithm 1 without the second-order correction, no churn):
        x_next = x + (x - x0) / sigma * (sigma_next - sigma)."""
        model_output, sample = self._arrays("step", model_output, "model_output", sample, "sample")
        index = self.index_for_timestep(timestep)
        sigma = self.sigmas[index]
        x0 = self._x0(model_output, sigma, sample)
        derivative = (sample - x0) / sigma
        dt = self.sigmas[index + 1] - sigma
        self._next_index = index + 1
        return (sample + derivative * dt).astype(np.float32, copy=False)

    def predict_x0(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> np.ndarray:
        """x0 as the step at ``timestep`` (one of ``timesteps``) computes it; ``sample`` is the
        unscaled (VE-space) sample."""
        model_output, sample = self._arrays("predict_x0", model_output, "model_output", sample, "sample")
        sigma = self.sigmas[self.index_for_timestep(timestep)]
        return np.array(self._x0(model_output, sigma, sample), dtype=np.float32)

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, timestep: Any) -> np.ndarray:
        """x0 + sigma_t noise at ``timestep`` (one of ``timesteps``): Euler's VE sample space."""
        x0, noise = self._arrays("add_noise", x0, "x0", noise, "noise")
        sigma = self.sigmas[self.index_for_timestep(timestep)]
        return (x0 + noise * sigma).astype(np.float32, copy=False)
