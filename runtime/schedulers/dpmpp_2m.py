"""DPM-Solver++(2M): the second-order multistep solver in data (x0) prediction, numpy float32.

Mirrors ``diffusers.DPMSolverMultistepScheduler`` of diffusers 0.42.1 with
``algorithm_type="dpmsolver++"`` and ``solver_order=2`` (its defaults): timestep spacings,
``lower_order_final``, ``euler_at_final``, ``final_sigmas_type``, ``lambda_min_clipped``, solver
types "midpoint" (default) and "heun", operation for operation in float32. Not ported: orders 1
and 3, the SDE and non-"++" variants, Karras/exponential/beta/Lu/flow sigma schedules, dynamic
thresholding, learned variance.

Notation (Lu et al. 2022, "DPM-Solver++"): sigma_i = sqrt((1 - abar) / abar) is the
variance-exploding noise level of step i; alpha_t = 1 / sqrt(1 + sigma^2), sigma_t =
sigma * alpha_t (so x_t = alpha_t x0 + sigma_t eps); lambda_t = log(alpha_t / sigma_t) is the
half log-SNR; h = lambda_t - lambda_s is a step in lambda.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from postdiff.errors import InputError
from postdiff.runtime.schedulers.base import (
    COMMON_DEFAULTS,
    F32_HALF,
    F32_ONE,
    Scheduler,
    as_f32,
    check_same_shape,
    sigmas_at,
    ve_sigmas,
    exp_f32,
    log_f32,
)


class DPMSolverPP2MScheduler(Scheduler):
    """DPM-Solver++(2M), deterministic."""

    name = "dpmpp-2m"
    DEFAULTS: Mapping[str, Any] = {
        **COMMON_DEFAULTS,
        "lower_order_final": True,
        "euler_at_final": False,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": float("-inf"),
        "solver_type": "midpoint",
        "timestep_spacing": "linspace",
    }

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self._train_sigmas = ve_sigmas(self.alphas_cumprod)
        self.sigmas = self._train_sigmas.copy()
        self.init_noise_sigma = 1.0
        n = self.num_train_timesteps
        self.timesteps = np.linspace(0, n - 1, n, dtype=np.float32)[::-1].copy()
        self._model_outputs: list[np.ndarray | None] = [None, None]
        self._lower_order_nums = 0
        self._last_index: int | None = None

    def _compute_timesteps(self, num_inference_steps: int) -> np.ndarray:
        n = num_inference_steps
        big_t = self.num_train_timesteps
        # Timesteps whose lambda falls below lambda_min_clipped are cut from the top of the range.
        clipped = 0
        if self.config["lambda_min_clipped"] > -np.inf:
            alpha = np.sqrt(self.alphas_cumprod).astype(np.float64)
            sigma = np.sqrt(F32_ONE - self.alphas_cumprod).astype(np.float64)
            with np.errstate(divide="ignore"):
                lambdas = np.log(alpha).astype(np.float32) - np.log(sigma).astype(np.float32)
            clipped = int(np.searchsorted(lambdas[::-1], np.float32(self.config["lambda_min_clipped"])))
        last = big_t - clipped
        spacing = self.config["timestep_spacing"]
        if spacing == "linspace":
            # n + 1 points over [0, last - 1], rounded, highest n kept.
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif spacing == "leading":
            ratio = last // (n + 1)
            ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
            ts = ts + self.config["steps_offset"]
        else:  # trailing
            ratio = big_t / n
            ts = np.arange(last, 0, -ratio).round().copy().astype(np.int64) - 1
        self.sigmas = sigmas_at(ts, self._train_sigmas, self.config["final_sigmas_type"])
        self.num_inference_steps = len(ts)
        return ts.astype(np.int64)

    def reset(self) -> None:
        """Forget the stored model outputs: the next step is first order, like a fresh solver's."""
        super().reset()
        self._model_outputs = [None, None]
        self._lower_order_nums = 0
        self._last_index = None

    # -- formulas ------------------------------------------------------------------------------

    @staticmethod
    def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
        """VE sigma -> VP (alpha_t, sigma_t): alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t."""
        alpha_t = F32_ONE / np.sqrt(sigma * sigma + F32_ONE)
        return alpha_t, sigma * alpha_t

    @staticmethod
    def _lambda(alpha_t: np.float32, sigma_t: np.float32) -> np.float32:
        """Half log-SNR lambda = log(alpha_t) - log(sigma_t) (+inf at sigma_t = 0)."""
        return log_f32(alpha_t) - log_f32(sigma_t)

    def _x0(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        """Data prediction x_theta at step ``index``: the model output converted to x0."""
        kind = self.config["prediction_type"]
        if kind == "sample":
            return model_output.copy()  # kept as history: must not alias the caller's array
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[index])
        if kind == "epsilon":
            # x0 = (x_t - sigma_t eps) / alpha_t
            return (sample - sigma_t * model_output) / alpha_t
        # v-prediction: x0 = alpha_t x_t - sigma_t v
        return alpha_t * sample - sigma_t * model_output

    def _first_order(self, x0: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        """DPM-Solver++(1) (= DDIM): x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0
        (DPM-Solver++'s first-order update, which equals DDIM)."""
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[index + 1])
        alpha_s, sigma_s = self._alpha_sigma(self.sigmas[index])
        with np.errstate(divide="ignore", invalid="ignore"):
            h = self._lambda(alpha_t, sigma_t) - self._lambda(alpha_s, sigma_s)
            coeff = alpha_t * (exp_f32(-h) - F32_ONE)
            return (sigma_t / sigma_s) * sample - coeff * x0

    def _second_order(self, index: int, sample: np.ndarray) -> np.ndarray:
        """Multistep DPM-Solver++(2M) (DPM-Solver++ algorithm 2): with r0 = h_0 / h,
        D0 = m0 and D1 = (m0 - m1) / r0,
        midpoint: x_t = (sigma_t / sigma_s0) x_s - alpha_t (e^{-h} - 1) (D0 + D1 / 2);
        heun:     x_t = (sigma_t / sigma_s0) x_s - alpha_t (e^{-h} - 1) D0
                        + alpha_t ((e^{-h} - 1) / h + 1) D1."""
        m0, m1 = self._model_outputs[-1], self._model_outputs[-2]
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[index + 1])
        alpha_s0, sigma_s0 = self._alpha_sigma(self.sigmas[index])
        alpha_s1, sigma_s1 = self._alpha_sigma(self.sigmas[index - 1])
        with np.errstate(divide="ignore", invalid="ignore"):
            lambda_t = self._lambda(alpha_t, sigma_t)
            lambda_s0 = self._lambda(alpha_s0, sigma_s0)
            lambda_s1 = self._lambda(alpha_s1, sigma_s1)
            h = lambda_t - lambda_s0
            h_0 = lambda_s0 - lambda_s1
            r0 = h_0 / h
            d1 = (F32_ONE / r0) * (m0 - m1)
            expm1 = exp_f32(-h) - F32_ONE
            coeff = alpha_t * expm1
            out = (sigma_t / sigma_s0) * sample - coeff * m0
            if self.config["solver_type"] == "midpoint":
                return out - (F32_HALF * coeff) * d1
            return out + (alpha_t * (expm1 / h + F32_ONE)) * d1

    # -- interface -----------------------------------------------------------------------------

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> np.ndarray:
        """One DPM-Solver++(2M) step from ``timestep`` to the next timestep.

        The first step (after ``set_timesteps``/``reset``, or when the previous step was not at
        the preceding index) is first order; so is the last step when ``final_sigmas_type`` is
        "zero", ``euler_at_final`` is set, or ``lower_order_final`` is set with < 15 steps.
        """
        self._require_timesteps("step")
        model_output = as_f32(model_output, "model_output")
        sample = as_f32(sample, "sample")
        check_same_shape(model_output, "model_output", sample, "sample")
        index = self.index_for_timestep(timestep)
        if self._last_index is not None and self._last_index != index - 1:
            # The stored output is not the previous step's: behave like a fresh solver.
            self.reset()
        previous = self._model_outputs[-1]
        if previous is not None and previous.shape != sample.shape:
            raise InputError(
                f"dpmpp-2m step got a sample of shape {list(sample.shape)} but its history holds "
                f"shape {list(previous.shape)}; expected the same latent size between steps; call "
                "reset() after a resolution switch"
            )
        n = len(self.timesteps)
        final_first_order = index == n - 1 and (
            self.config["euler_at_final"]
            or (self.config["lower_order_final"] and n < 15)
            or self.config["final_sigmas_type"] == "zero"
        )
        x0 = self._x0(model_output, index, sample)
        self._model_outputs = [self._model_outputs[1], x0]
        if self._lower_order_nums < 1 or final_first_order:
            prev = self._first_order(x0, index, sample)
        else:
            prev = self._second_order(index, sample)
        self._lower_order_nums = min(self._lower_order_nums + 1, 2)
        self._last_index = index
        self._next_index = index + 1
        return prev.astype(np.float32, copy=False)

    def predict_x0(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> np.ndarray:
        """x0 as the step at ``timestep`` (one of ``timesteps``) computes it."""
        self._require_timesteps("predict_x0")
        model_output = as_f32(model_output, "model_output")
        sample = as_f32(sample, "sample")
        check_same_shape(model_output, "model_output", sample, "sample")
        x0 = self._x0(model_output, self.index_for_timestep(timestep), sample)
        return x0.astype(np.float32, copy=False)

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, timestep: Any) -> np.ndarray:
        """alpha_t x0 + sigma_t noise at ``timestep`` (one of ``timesteps``), with alpha_t, sigma_t
        from the step's sigma as diffusers' DPMSolverMultistepScheduler.add_noise does; equal to
        sqrt(abar_t) x0 + sqrt(1 - abar_t) noise up to float32 rounding."""
        self._require_timesteps("add_noise")
        x0 = as_f32(x0, "x0")
        noise = as_f32(noise, "noise")
        check_same_shape(x0, "x0", noise, "noise")
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[self.index_for_timestep(timestep)])
        return (alpha_t * x0 + sigma_t * noise).astype(np.float32, copy=False)
