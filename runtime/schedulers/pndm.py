"""PNDM with PLMS steps (``skip_prk_steps``), numpy float32: Stable Diffusion 1.x's shipped sampler.

Mirrors ``diffusers.PNDMScheduler`` of diffusers 0.42.1 with ``skip_prk_steps=True`` (what every SD
1.x/2.x checkpoint ships), operation for operation in float32: timestep spacings, the PLMS warm-up,
epsilon and v prediction, ``set_alpha_to_one``. Not ported: the Runge-Kutta (PRK) warm-up of
``skip_prk_steps=False``.

Method (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"): every step
moves x_t to x_{t-d} (d = T // n) with the transfer part of DDIM (eq. 11) fed an eps' that
combines the recent noise predictions linearly, as the Adams-Bashforth multistep method does:
eps' = e_0, then (3 e_0 - e_1) / 2, (23 e_0 - 16 e_1 + 5 e_2) / 12 and
(55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24 (e_0 the newest). diffusers' warm-up ("PLMS") makes the
first step a second-order Heun-like step: step 0 goes to t - d with e_0 alone, then the model is
evaluated there a second time (the schedule repeats that timestep) and the step is redone from x_t
with (e_0 + e_1) / 2. So ``n`` inference steps evaluate the model ``n + 1`` times.

After :meth:`reset` (a resolution switch), the history is empty and the warm-up is not repeated:
the next steps use the Adams-Bashforth formulas of order 1, 2, 3, then 4 as the history refills.
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
    unsupported,
    vp_add_noise,
)

F32_2, F32_3, F32_5, F32_9, F32_12 = (np.float32(v) for v in (2, 3, 5, 9, 12))
F32_16, F32_23, F32_37, F32_55, F32_59 = (np.float32(v) for v in (16, 23, 37, 55, 59))
F32_24TH = np.float32(1 / 24)


class PNDMScheduler(Scheduler):
    """PNDM's PLMS sampler (deterministic, multistep)."""

    name = "pndm"
    diffusers_class = "PNDMScheduler"
    DEFAULTS: Mapping[str, Any] = {
        **COMMON_DEFAULTS,
        "skip_prk_steps": False,
        "set_alpha_to_one": False,
        "timestep_spacing": "leading",
    }

    def __init__(self, config: Mapping[str, Any] | None = None, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.final_alpha_cumprod = F32_ONE if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.timesteps = np.zeros(0, dtype=np.int64)
        self._ets: list[np.ndarray] = []
        self._counter = 0
        self._cur_sample: np.ndarray | None = None
        self._warm_up = True

    def _check_config(self) -> None:
        if not self.config["skip_prk_steps"]:
            raise unsupported(self.name, "skip_prk_steps", False,
                              "true (the Runge-Kutta warm-up of PNDM is not ported; SD checkpoints ship true)")
        self._allowed("prediction_type", ("epsilon", "v_prediction"))

    def num_inference_steps_for(self, count: int) -> int:
        """``count`` model evaluations are ``count - 1`` inference steps (the warm-up revisits one
        timestep); 1 is 1, and 2 cannot be had (InputError)."""
        if count == 2:
            raise InputError(
                "the pndm sampler cannot run 2 steps: n inference steps evaluate the model n + 1 times "
                "(1 step: once); use another step count or another sampler"
            )
        return 1 if count <= 1 else count - 1

    def _compute_timesteps(self, num_inference_steps: int) -> np.ndarray:
        n = num_inference_steps
        big_t = self.num_train_timesteps
        spacing = self.config["timestep_spacing"]
        self.num_inference_steps = n
        if spacing == "linspace":
            ts = np.linspace(0, big_t - 1, n).round().astype(np.int64)
        elif spacing == "leading":
            ts = (np.arange(0, n) * (big_t // n)).round() + self.config["steps_offset"]
        else:  # trailing
            ts = np.round(np.arange(big_t, 0, -big_t / n))[::-1].astype(np.int64) - 1
        # Ascending ts; the second-highest is visited twice (the warm-up), then all in descending order.
        return np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].copy().astype(np.int64)

    def reset(self) -> None:
        """Empty the history; the next step is first order and the warm-up is not repeated."""
        super().reset()
        self._ets = []
        self._counter = 0
        self._cur_sample = None
        self._warm_up = False

    def set_timesteps(self, num_inference_steps: int) -> None:
        super().set_timesteps(num_inference_steps)
        self._warm_up = True

    # -- formulas ------------------------------------------------------------------------------

    def _prev_sample(self, sample: np.ndarray, t: int, t_prev: int, eps: np.ndarray) -> np.ndarray:
        """PNDM eq. 11 (DDIM's transfer from t to t_prev for a given eps):
        x_prev = sqrt(abar_prev / abar_t) x_t - (abar_prev - abar_t) eps
                 / (abar_t sqrt(1 - abar_prev) + sqrt(abar_t (1 - abar_t) abar_prev))."""
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        beta_t = F32_ONE - abar_t
        beta_prev = F32_ONE - abar_prev
        if self.config["prediction_type"] == "v_prediction":
            # eps = sqrt(abar) v + sqrt(1 - abar) x_t
            eps = np.sqrt(abar_t) * eps + np.sqrt(beta_t) * sample
        sample_coeff = np.sqrt(abar_prev / abar_t)
        denom = abar_t * np.sqrt(beta_prev) + np.sqrt(abar_t * beta_t * abar_prev)
        return sample_coeff * sample - (abar_prev - abar_t) * eps / denom

    # -- interface -----------------------------------------------------------------------------

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> np.ndarray:
        """One PLMS step from ``timestep`` (see the module docstring for the warm-up)."""
        model_output, sample = self._arrays("step", model_output, "model_output", sample, "sample")
        if self._ets and self._ets[-1].shape != sample.shape:
            raise InputError(
                f"pndm step got a sample of shape {list(sample.shape)} but its history holds shape "
                f"{list(self._ets[-1].shape)}; expected the same latent size between steps; call "
                "reset() after a resolution switch"
            )
        t = self._train_timestep(timestep)
        d = self.num_train_timesteps // self.num_inference_steps
        t_prev = t - d
        redo = self._warm_up and self._counter == 1
        if redo:
            # The repeated timestep: redo the first step from the saved sample with (e_0 + e_1) / 2.
            t_prev, t = t, t + d
        else:
            self._ets = [*self._ets[-3:], model_output]
        ets = self._ets
        if redo:
            eps = (model_output + ets[-1]) / F32_2
            sample = self._cur_sample
            self._cur_sample = None
        elif len(ets) == 1:
            eps = model_output
            if self._warm_up:
                self._cur_sample = sample
        elif len(ets) == 2:
            eps = (F32_3 * ets[-1] - ets[-2]) / F32_2
        elif len(ets) == 3:
            eps = (F32_23 * ets[-1] - F32_16 * ets[-2] + F32_5 * ets[-3]) / F32_12
        else:
            eps = F32_24TH * (F32_55 * ets[-1] - F32_59 * ets[-2] + F32_37 * ets[-3] - F32_9 * ets[-4])
        self._counter += 1
        index = self._counter  # position of the next timestep
        self._next_index = index if index < len(self.timesteps) else None
        return self._prev_sample(sample, t, t_prev, eps).astype(np.float32, copy=False)

    def _x0_eps(self, model_output: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        abar_t = self.alphas_cumprod[t]
        one_minus = F32_ONE - abar_t
        if self.config["prediction_type"] == "epsilon":
            return (sample - np.sqrt(one_minus) * model_output) / np.sqrt(abar_t)
        return np.sqrt(abar_t) * sample - np.sqrt(one_minus) * model_output

    def predict_x0(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> np.ndarray:
        """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (v: sqrt(abar_t) x_t - sqrt(1 - abar_t) v)."""
        model_output, sample = f32_pair(model_output, "model_output", sample, "sample")
        return self._x0_eps(model_output, self._train_timestep(timestep), sample).astype(np.float32, copy=False)

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, timestep: Any) -> np.ndarray:
        """q(x_t | x0) sample: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (DDPM eq. 4)."""
        return vp_add_noise(self.alphas_cumprod[self._train_timestep(timestep)], x0, noise)
