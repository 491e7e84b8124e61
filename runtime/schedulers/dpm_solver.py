"""DPM-Solver and DPM-Solver++ multistep, orders 1 to 3, in numpy float32.

Mirrors ``diffusers.DPMSolverMultistepScheduler`` of diffusers 0.42.1 operation for operation in
float32: ``algorithm_type`` "dpmsolver++" (data prediction, the default) and "dpmsolver" (noise
prediction), ``solver_order`` 1, 2 and 3, solver types "midpoint" and "heun", timestep spacings,
Karras sigmas, ``lower_order_final``, ``euler_at_final``, ``final_sigmas_type``,
``lambda_min_clipped``. Not ported: the SDE variants, exponential/beta/Lu/flow sigma schedules,
dynamic thresholding, learned variance.

Notation (Lu et al. 2022, "DPM-Solver" and "DPM-Solver++"): sigma_i, alpha_t, sigma_t and the half
log-SNR lambda_t as in ``base.MultistepScheduler``; h = lambda_t - lambda_s is a step in lambda. The
solver keeps the last ``solver_order`` converted model outputs m (x0 for "++", eps otherwise) as its
history.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from postdiff.runtime.schedulers.base import (
    COMMON_DEFAULTS,
    F32_HALF,
    F32_ONE,
    MultistepScheduler,
    exp_f32,
    karras_sigmas,
    sigma_to_t,
    sigmas_at,
    spaced_timesteps,
    unsupported,
)

ALGORITHM_TYPES = ("dpmsolver++", "dpmsolver")


class DPMSolverMultistepScheduler(MultistepScheduler):
    """DPM-Solver(++) multistep, deterministic."""

    name = "dpm-solver"
    diffusers_class = "DPMSolverMultistepScheduler"
    DEFAULTS: Mapping[str, Any] = {
        **COMMON_DEFAULTS,
        "solver_order": 2,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": float("-inf"),
        "timestep_spacing": "linspace",
    }
    UNPORTED = ("thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
                "variance_type", "rescale_betas_zero_snr", "use_dynamic_shifting")

    def _check_config(self) -> None:
        self._allowed("algorithm_type", ALGORITHM_TYPES)
        self._allowed("solver_order", (1, 2, 3))
        if self.config["solver_type"] in ("logrho", "bh1", "bh2"):
            self.config["solver_type"] = "midpoint"  # diffusers maps UniPC's names to its default
        if self.config["algorithm_type"] == "dpmsolver" and self.config["final_sigmas_type"] == "zero":
            raise unsupported(self.name, "final_sigmas_type", "zero",
                              "'sigma_min' with algorithm_type 'dpmsolver' (diffusers refuses 'zero' there too)")

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
        ts = spaced_timesteps(self.config["timestep_spacing"], n, big_t, last, self.config["steps_offset"])
        self.sigmas = sigmas_at(ts, self._train_sigmas, self.config["final_sigmas_type"])
        if self.config["use_karras_sigmas"]:
            # Karras et al. eq. 5 over the whole training range, mapped back to integer timesteps
            # (truncated, not rounded, for the cosine schedule, as diffusers does).
            sigmas = karras_sigmas(float(self._train_sigmas[0]), float(self._train_sigmas[-1]), n)
            t = sigma_to_t(sigmas, np.log(self._train_sigmas))
            ts = (t if self.config["beta_schedule"] == "squaredcos_cap_v2" else t.round()).astype(np.int64)
            self.sigmas = np.concatenate([sigmas, self.sigmas[-1:]]).astype(np.float32)
        self.num_inference_steps = len(ts)
        return ts.astype(np.int64)

    # -- formulas ------------------------------------------------------------------------------

    def _convert(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        if self.config["algorithm_type"] == "dpmsolver++":
            return self._x0(model_output, index, sample)
        return self._eps(model_output, index, sample)

    def _first_order(self, m0: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        """DPM-Solver(++)-1, which equals DDIM (DPM-Solver++ eq. 5 / DPM-Solver eq. 3.7):
        ++: x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0;
            x_t = (alpha_t / alpha_s) x_s - sigma_t (e^{h} - 1) eps."""
        alpha_t, sigma_t, lambda_t = self._lambda(index + 1)
        alpha_s, sigma_s, lambda_s = self._lambda(index)
        h = lambda_t - lambda_s
        if self.config["algorithm_type"] == "dpmsolver++":
            return (sigma_t / sigma_s) * sample - (alpha_t * (exp_f32(-h) - F32_ONE)) * m0
        return (alpha_t / alpha_s) * sample - (sigma_t * (exp_f32(h) - F32_ONE)) * m0

    def _second_order(self, index: int, sample: np.ndarray) -> np.ndarray:
        """Multistep second order (DPM-Solver++ algorithm 2; DPM-Solver's multistep analogue): with
        r0 = h_0 / h, D0 = m0 and D1 = (m0 - m1) / r0,
        ++ midpoint: x_t = (sigma_t / sigma_s0) x_s - alpha_t (e^{-h} - 1) (D0 + D1 / 2);
        ++ heun:     x_t = (sigma_t / sigma_s0) x_s - alpha_t (e^{-h} - 1) D0
                           + alpha_t ((e^{-h} - 1) / h + 1) D1;
           midpoint: x_t = (alpha_t / alpha_s0) x_s - sigma_t (e^{h} - 1) (D0 + D1 / 2);
           heun:     x_t = (alpha_t / alpha_s0) x_s - sigma_t (e^{h} - 1) D0
                           - sigma_t ((e^{h} - 1) / h - 1) D1."""
        m0, m1 = self._model_outputs[-1], self._model_outputs[-2]
        alpha_t, sigma_t, lambda_t = self._lambda(index + 1)
        alpha_s0, sigma_s0, lambda_s0 = self._lambda(index)
        _, _, lambda_s1 = self._lambda(index - 1)
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        d1 = (F32_ONE / r0) * (m0 - m1)
        midpoint = self.config["solver_type"] == "midpoint"
        if self.config["algorithm_type"] == "dpmsolver++":
            coeff = alpha_t * (exp_f32(-h) - F32_ONE)
            out = (sigma_t / sigma_s0) * sample - coeff * m0
            if midpoint:
                return out - (F32_HALF * coeff) * d1
            return out + (alpha_t * ((exp_f32(-h) - F32_ONE) / h + F32_ONE)) * d1
        coeff = sigma_t * (exp_f32(h) - F32_ONE)
        out = (alpha_t / alpha_s0) * sample - coeff * m0
        if midpoint:
            return out - (F32_HALF * coeff) * d1
        return out - (sigma_t * ((exp_f32(h) - F32_ONE) / h - F32_ONE)) * d1

    def _third_order(self, index: int, sample: np.ndarray) -> np.ndarray:
        """Multistep third order (DPM-Solver++ appendix; DPM-Solver-3 multistep): with
        r0 = h_0 / h, r1 = h_1 / h, D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1,
        D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1),
        ++: x_t = (sigma_t / sigma_s0) x_s - alpha_t (e^{-h} - 1) D0
                  + alpha_t ((e^{-h} - 1) / h + 1) D1 - alpha_t ((e^{-h} - 1 + h) / h^2 - 1/2) D2;
            x_t = (alpha_t / alpha_s0) x_s - sigma_t (e^{h} - 1) D0
                  - sigma_t ((e^{h} - 1) / h - 1) D1 - sigma_t ((e^{h} - 1 - h) / h^2 - 1/2) D2."""
        m0, m1, m2 = self._model_outputs[-1], self._model_outputs[-2], self._model_outputs[-3]
        alpha_t, sigma_t, lambda_t = self._lambda(index + 1)
        alpha_s0, sigma_s0, lambda_s0 = self._lambda(index)
        _, _, lambda_s1 = self._lambda(index - 1)
        _, _, lambda_s2 = self._lambda(index - 2)
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        d1_0, d1_1 = (F32_ONE / r0) * (m0 - m1), (F32_ONE / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (F32_ONE / (r0 + r1)) * (d1_0 - d1_1)
        if self.config["algorithm_type"] == "dpmsolver++":
            e = exp_f32(-h) - F32_ONE
            return ((sigma_t / sigma_s0) * sample - (alpha_t * e) * m0 + (alpha_t * (e / h + F32_ONE)) * d1
                    - (alpha_t * ((exp_f32(-h) - F32_ONE + h) / h**2 - F32_HALF)) * d2)
        e = exp_f32(h) - F32_ONE
        return ((alpha_t / alpha_s0) * sample - (sigma_t * e) * m0 - (sigma_t * (e / h - F32_ONE)) * d1
                - (sigma_t * ((exp_f32(h) - F32_ONE - h) / h**2 - F32_HALF)) * d2)

    # -- interface -----------------------------------------------------------------------------

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> np.ndarray:
        """One multistep step from ``timestep`` to the next timestep.

        The order is ``solver_order``, lowered while the history fills (after ``set_timesteps`` or
        ``reset``, or when the previous step was not at the preceding index); the last step is first
        order when ``final_sigmas_type`` is "zero", ``euler_at_final`` is set, or
        ``lower_order_final`` is set with < 15 steps, and the one before it at most second order in
        that last case.
        """
        model_output, sample, index = self._begin_step(model_output, timestep, sample)
        n = len(self.timesteps)
        short = self.config["lower_order_final"] and n < 15
        final_first_order = index == n - 1 and (
            self.config["euler_at_final"] or short or self.config["final_sigmas_type"] == "zero"
        )
        second_to_last = index == n - 2 and short
        m0 = self._convert(model_output, index, sample)
        self._model_outputs = [*self._model_outputs[1:], m0]
        # A final sigma of 0 makes lambda_t infinite: e^{-h} = 0 and 1/h = 0, as in diffusers.
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if self.order == 1 or self._lower_order_nums < 1 or final_first_order:
                prev = self._first_order(m0, index, sample)
            elif self.order == 2 or self._lower_order_nums < 2 or second_to_last:
                prev = self._second_order(index, sample)
            else:
                prev = self._third_order(index, sample)
        return self._end_step(index, prev)
