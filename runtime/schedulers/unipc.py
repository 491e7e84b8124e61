"""UniPC multistep (predictor UniP + corrector UniC), numpy float32.

Mirrors ``diffusers.UniPCMultistepScheduler`` of diffusers 0.42.1 operation for operation in float32:
``solver_order`` 1 to 3, ``solver_type`` "bh1"/"bh2", ``predict_x0`` (data or noise prediction),
``lower_order_final``, ``disable_corrector``, ``final_sigmas_type``, timestep spacings. Not ported:
``solver_p``, Karras/exponential/beta/flow sigmas, dynamic thresholding.

Method (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), in DPM-Solver's
notation (sigma, alpha_t, sigma_t, lambda, h: see ``dpm_solver``). With hh = -h for data prediction
(+h for noise prediction), phi_1 = e^{hh} - 1 and B(h) = hh ("bh1") or e^{hh} - 1 ("bh2"):
* UniP-p (algorithm 2): x_t = (sigma_t / sigma_s0) x_s - alpha_t phi_1 m0
  - alpha_t B(h) sum_k rho_k D1_k, with D1_k = (m_k - m0) / r_k, r_k = (lambda_{s_k} - lambda_s0) / h,
  and rho solving R rho = b (R_{ik} = r_k^(i-1), b_i = i! phi_{i+1}(hh) hh / B(h)); rho = 1/2 at
  order 2;
* UniC-p (algorithm 1), applied at the start of the next step once the model output m_t at the
  predicted x_t is known: the same update from the previous sample, plus rho_last (m_t - m0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from postdiff.runtime.schedulers.base import (
    COMMON_DEFAULTS,
    F32_HALF,
    F32_ONE,
    MultistepScheduler,
    sigmas_at,
    spaced_timesteps,
)


def _expm1_f32(x: np.float32) -> np.float32:
    """float32 e^x - 1 (torch.expm1), correctly rounded in all but vanishingly rare cases."""
    try:
        return np.float32(math.expm1(float(x)))
    except OverflowError:
        return np.float32(np.inf)


class UniPCMultistepScheduler(MultistepScheduler):
    """UniPC multistep, deterministic."""

    name = "unipc"
    diffusers_class = "UniPCMultistepScheduler"
    DEFAULTS: Mapping[str, Any] = {
        **COMMON_DEFAULTS,
        "solver_order": 2,
        "predict_x0": True,
        "solver_type": "bh2",
        "lower_order_final": True,
        "disable_corrector": [],
        "final_sigmas_type": "zero",
        "timestep_spacing": "linspace",
    }
    UNPORTED = ("thresholding", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                "use_flow_sigmas", "rescale_betas_zero_snr", "use_dynamic_shifting", "shift_terminal")

    def _check_config(self) -> None:
        self._allowed("solver_order", (1, 2, 3))
        if self.config["solver_type"] in ("midpoint", "heun", "logrho"):
            self.config["solver_type"] = "bh2"  # diffusers maps DPM-Solver's names to its default

    def _compute_timesteps(self, num_inference_steps: int) -> np.ndarray:
        n = num_inference_steps
        big_t = self.num_train_timesteps
        ts = spaced_timesteps(self.config["timestep_spacing"], n, big_t, big_t, self.config["steps_offset"])
        self.sigmas = sigmas_at(ts, self._train_sigmas, self.config["final_sigmas_type"])
        self.num_inference_steps = len(ts)
        return ts.astype(np.int64)

    def reset(self) -> None:
        """Forget the history and the pending correction: the next step is a first-order predictor."""
        super().reset()
        self._last_sample: np.ndarray | None = None
        self._this_order = 1

    # -- formulas ------------------------------------------------------------------------------

    def _convert(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        """The model output as x0 (``predict_x0``) or as eps, at step ``index``."""
        if self.config["predict_x0"]:
            return self._x0(model_output, index, sample)
        return self._eps(model_output, index, sample)

    def _update(self, x: np.ndarray, target: int, base: int, order: int,
                model_t: np.ndarray | None) -> np.ndarray:
        """The UniP (``model_t`` None) or UniC update of ``x`` (at step ``base``) to step ``target``,
        from the stored outputs m0 (at ``base``) and m_k (at ``base - k``)."""
        m0 = self._model_outputs[-1]
        alpha_t, sigma_t, lambda_t = self._lambda(target)
        alpha_s0, sigma_s0, lambda_s0 = self._lambda(base)
        h = lambda_t - lambda_s0
        rks, d1s = [], []
        for i in range(1, order):
            _, _, lambda_si = self._lambda(base - i)
            rk = (lambda_si - lambda_s0) / h
            rks.append(rk)
            d1s.append((self._model_outputs[-(i + 1)] - m0) / rk)
        rks.append(F32_ONE)
        r = np.array(rks, dtype=np.float32)
        hh = -h if self.config["predict_x0"] else h
        h_phi_1 = _expm1_f32(hh)  # h phi_1(h) = e^h - 1
        h_phi_k = h_phi_1 / hh - F32_ONE
        b_h = hh if self.config["solver_type"] == "bh1" else _expm1_f32(hh)
        factorial = 1
        rows, b = [], []
        for i in range(1, order + 1):
            rows.append(r ** np.float32(i - 1))
            b.append(h_phi_k * np.float32(factorial) / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - np.float32(1 / factorial)
        big_r = np.stack(rows).astype(np.float32)
        b_vec = np.array(b, dtype=np.float32)
        if self.config["predict_x0"]:
            scale_x, head, tail = sigma_t / sigma_s0, alpha_t * h_phi_1, alpha_t * b_h
        else:
            scale_x, head, tail = alpha_t / alpha_s0, sigma_t * h_phi_1, sigma_t * b_h
        x_t = scale_x * x - head * m0
        if model_t is None:  # predictor
            if not d1s:
                return x_t - tail * np.float32(0)
            rhos = np.array([F32_HALF]) if order == 2 else np.linalg.solve(big_r[:-1, :-1], b_vec[:-1])
            res = sum(np.float32(rho) * d for rho, d in zip(rhos.astype(np.float32), d1s))
            return x_t - tail * res
        rhos = np.array([F32_HALF]) if order == 1 else np.linalg.solve(big_r, b_vec)
        rhos = rhos.astype(np.float32)
        corr = sum(rho * d for rho, d in zip(rhos[:-1], d1s)) if d1s else np.float32(0)
        return x_t - tail * (corr + rhos[-1] * (model_t - m0))

    # -- interface -----------------------------------------------------------------------------

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> np.ndarray:
        """Correct ``sample`` with UniC (when the previous step was the preceding index), then
        predict the next sample with UniP; orders rise with the history as in diffusers."""
        model_output, sample, index = self._begin_step(model_output, timestep, sample)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            converted = self._convert(model_output, index, sample)
            if index > 0 and (index - 1) not in self.config["disable_corrector"] and self._last_sample is not None:
                sample = self._update(self._last_sample, index, index - 1, self._this_order, converted)
            self._model_outputs = [*self._model_outputs[1:], converted]
            order = self.order
            if self.config["lower_order_final"]:
                order = min(order, len(self.timesteps) - index)
            self._this_order = min(order, self._lower_order_nums + 1)
            self._last_sample = sample
            prev = self._update(sample, index + 1, index, self._this_order, None)
        return self._end_step(index, prev)
