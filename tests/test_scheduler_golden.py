"""diffusers' own scheduler-test golden numbers, reproduced by the numpy ports.

Each case is a ``full_loop`` of diffusers' tests/schedulers (0.42-era): the same config, the
deterministic dummy sample (arange / n, laid out as (3, 8, 8, 4) then permuted to (4, 3, 8, 8)),
the dummy model ``sample * t / (t + 1)`` and, for the stochastic samplers, the noise of
``torch.manual_seed(0)`` fed in through ``Scheduler.noise``. The expected figures are diffusers'
published constants (sum and/or mean of |sample|, tolerances as diffusers asserts them).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from postdiff.runtime.schedulers import make_scheduler

LINEAR_1000 = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
LINEAR_1100 = {**LINEAR_1000, "num_train_timesteps": 1100}
DPM = {**LINEAR_1000, "solver_order": 2, "prediction_type": "epsilon", "thresholding": False,
       "sample_max_value": 1.0, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
       "lower_order_final": False, "euler_at_final": False, "variance_type": None, "final_sigmas_type": "sigma_min"}
UNIPC = {**LINEAR_1000, "solver_order": 2, "solver_type": "bh2", "final_sigmas_type": "sigma_min"}
LCM = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.0120, "beta_schedule": "scaled_linear",
       "prediction_type": "epsilon"}


def dummy_sample_deter() -> np.ndarray:
    n = 4 * 3 * 8 * 8
    return (np.arange(n, dtype=np.float32) / np.float32(n)).reshape(3, 8, 8, 4).transpose(3, 0, 1, 2).copy()


def dummy_model(sample: np.ndarray, t: np.generic) -> np.ndarray:
    t32 = np.float32(t)
    return sample * t32 / (t32 + np.float32(1))


def full_loop(name: str, config: dict, steps: int, scaled: bool) -> np.ndarray:
    """diffusers' full_loop: with ``scaled`` (the sigma-space tests) the sample is multiplied by
    init_noise_sigma first and replaced by scale_model_input's output each step, as they do."""
    scheduler = make_scheduler(name, config)
    generator = torch.manual_seed(0)
    scheduler.noise = lambda index, shape: torch.randn(shape, generator=generator).numpy()
    scheduler.set_timesteps(steps)
    sample = dummy_sample_deter()
    if scaled:
        sample = sample * np.float32(scheduler.init_noise_sigma)
    for t in scheduler.timesteps:
        if scaled:
            sample = scheduler.scale_model_input(sample, t)
        sample = scheduler.step(dummy_model(sample, t), t, sample)
    return sample


GOLDEN = [
    # (test in diffusers, sampler, config, steps, scaled, expected sum, expected mean)
    ("euler_ancestral full_loop_no_noise", "euler-ancestral", LINEAR_1100, 10, True, 152.3192, 0.1983),
    ("euler_ancestral full_loop_with_v_prediction", "euler-ancestral",
     {**LINEAR_1100, "prediction_type": "v_prediction"}, 10, True, 108.4439, 0.1412),
    ("euler full_loop_device_karras_sigmas", "euler", {**LINEAR_1100, "use_karras_sigmas": True}, 10, True,
     124.52299499511719, 0.16213932633399963),
    ("dpm_multi full_loop_no_noise", "dpm-solver", DPM, 10, False, None, 0.3301),
    ("dpm_multi full_loop_with_v_prediction", "dpm-solver", {**DPM, "prediction_type": "v_prediction"}, 10,
     False, None, 0.2251),
    ("dpm_multi full_loop_with_karras_and_v_prediction", "dpm-solver",
     {**DPM, "prediction_type": "v_prediction", "use_karras_sigmas": True}, 10, False, None, 0.2096),
    ("unipc full_loop_no_noise", "unipc", UNIPC, 10, False, None, 0.2464),
    ("unipc full_loop_with_v_prediction", "unipc", {**UNIPC, "prediction_type": "v_prediction"}, 10, False,
     None, 0.1014),
    ("lcm full_loop_onestep", "lcm", LCM, 1, False, 18.7097, 0.0244),
    ("lcm full_loop_multistep", "lcm", LCM, 10, False, 197.7616, 0.2575),
]


@pytest.mark.parametrize(("test", "name", "config", "steps", "scaled", "total", "mean"), GOLDEN,
                         ids=[case[0] for case in GOLDEN])
def test_diffusers_golden_numbers(test: str, name: str, config: dict, steps: int, scaled: bool,
                                  total: float | None, mean: float) -> None:
    sample = np.abs(full_loop(name, config, steps, scaled).astype(np.float64))
    if total is not None:
        assert abs(sample.sum() - total) < 1e-2, sample.sum()
    assert abs(sample.mean() - mean) < 1e-3, sample.mean()
