"""LCM: multistep sampling of a latent consistency model, numpy float32.

Mirrors ``diffusers.LCMScheduler`` of diffusers 0.42.1 operation for operation in float32: the
timesteps picked from the ``original_inference_steps`` skipping schedule, the consistency-model
boundary scalings, epsilon/v/sample prediction, ``clip_sample``, ``set_alpha_to_one``. The noise
diffusers draws from a torch generator comes here from :attr:`Scheduler.noise`, by default
:func:`~postdiff.runtime.schedulers.base.step_noise` seeded by the generation seed. Not ported:
dynamic thresholding, zero-terminal-SNR rescaling, custom timesteps and ``strength``.

Method (Luo et al. 2023, "Latent Consistency Models", algorithm 3 "multistep latent consistency
sampling"): at step t the consistency function is f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t),
with c_skip = s^2 / ((k t)^2 + s^2), c_out = k t / sqrt((k t)^2 + s^2) (s = sigma_data = 0.5,
k = ``timestep_scaling``); then x is re-noised to the next timestep t':
x' = sqrt(abar_t') f + sqrt(1 - abar_t') z, z ~ N(0, I); the last step returns f itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from postdiff.errors import InputError
from postdiff.runtime.schedulers.base import (
    COMMON_DEFAULTS,
    F32_ONE,
    Scheduler,
    f32_pair,
    vp_add_noise,
)

SIGMA_DATA = np.float32(0.5)


class LCMScheduler(Scheduler):
    """Latent-consistency multistep sampler (stochastic between steps)."""

    name = "lcm"
    diffusers_class = "LCMScheduler"
    DEFAULTS: Mapping[str, Any] = {
        **COMMON_DEFAULTS,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "timestep_scaling": 10.0,
    }
    UNPORTED = ("thresholding", "rescale_betas_zero_snr")
    stochastic = True

    def __init__(self, config: Mapping[str, Any] | None = None, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.final_alpha_cumprod = F32_ONE if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.timesteps = np.arange(0, self.num_train_timesteps)[::-1].copy().astype(np.int64)

    @property
    def max_inference_steps(self) -> int:
        """At most ``original_inference_steps`` (the distillation schedule's length)."""
        return min(self.config["original_inference_steps"], self.num_train_timesteps)

    def _compute_timesteps(self, num_inference_steps: int) -> np.ndarray:
        n = num_inference_steps
        original = self.config["original_inference_steps"]
        if original > self.num_train_timesteps:
            raise InputError(
                f"scheduler config 'original_inference_steps' is {original}, more than the "
                f"{self.num_train_timesteps} training timesteps; expected at most that; fix the config"
            )
        k = self.num_train_timesteps // original
        # The distillation schedule: every k-th training timestep, k - 1, 2k - 1, ..., original * k - 1.
        origin = np.asarray(list(range(1, original + 1))) * k - 1
        if n > original or len(origin) // n < 1:
            raise InputError(
                f"num_inference_steps {n} is more than the LCM's original_inference_steps {original}; "
                f"expected at most {original} steps (LCMs are meant for 2-8); use fewer steps"
            )
        self.num_inference_steps = n
        origin = origin[::-1].copy()
        picks = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
        return origin[picks].astype(np.int64)

    # -- formulas ------------------------------------------------------------------------------

    def _scalings(self, t: int) -> tuple[np.float32, np.float32]:
        """(c_skip, c_out) of the consistency parameterisation at t (LCM eq. 9, s = 0.5)."""
        scaled = np.float32(t) * np.float32(self.config["timestep_scaling"])
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / np.sqrt(scaled**2 + SIGMA_DATA**2)
        return c_skip, c_out

    def _denoised(self, model_output: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        """f(x, t) = c_out x0_hat + c_skip x, x0_hat from the model output (clipped when asked)."""
        abar_t = self.alphas_cumprod[t]
        beta_t = F32_ONE - abar_t
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            x0 = (sample - np.sqrt(beta_t) * model_output) / np.sqrt(abar_t)
        elif kind == "sample":
            x0 = model_output
        else:
            x0 = np.sqrt(abar_t) * sample - np.sqrt(beta_t) * model_output
        if self.config["clip_sample"]:
            bound = np.float32(self.config["clip_sample_range"])
            x0 = np.clip(x0, -bound, bound)
        c_skip, c_out = self._scalings(t)
        return c_out * x0 + c_skip * sample

    # -- interface -----------------------------------------------------------------------------

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> np.ndarray:
        """One consistency step: f(x, t), re-noised to the next timestep unless this is the last."""
        model_output, sample = self._arrays("step", model_output, "model_output", sample, "sample")
        index = self.index_for_timestep(timestep)
        t = self._train_timestep(timestep)
        denoised = self._denoised(model_output, t, sample)
        self._next_index = index + 1
        if index == self.num_inference_steps - 1:
            return denoised.astype(np.float32, copy=False)
        t_prev = int(self.timesteps[index + 1])
        abar_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        noise = np.asarray(self.noise(index, sample.shape), dtype=np.float32)
        return (np.sqrt(abar_prev) * denoised + np.sqrt(F32_ONE - abar_prev) * noise).astype(np.float32, copy=False)

    def predict_x0(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> np.ndarray:
        """The consistency function's output f(x, t): the clean sample the step at ``timestep``
        re-noises (any training timestep)."""
        model_output, sample = f32_pair(model_output, "model_output", sample, "sample")
        return self._denoised(model_output, self._train_timestep(timestep), sample).astype(np.float32, copy=False)

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, timestep: Any) -> np.ndarray:
        """q(x_t | x0) sample: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (DDPM eq. 4)."""
        return vp_add_noise(self.alphas_cumprod[self._train_timestep(timestep)], x0, noise)
