"""The numpy schedulers against the diffusers classes they port (every entry of SCHEDULERS).

Trajectories are stepped independently by both sides (each feeds its own previous output back),
with the same model outputs and, for the stochastic samplers, the same noise (diffusers' draws are
replaced by ours). The model is a stand-in denoiser: it predicts a fixed clean latent plus 10%
noise, expressed as epsilon / v / sample, so latents stay at the scale a real model keeps them at.

Tolerance: 1e-6 of the latent's scale, i.e. max|ours - diffusers| <= 1e-6 * max(1, max|diffusers|).
Most configurations match bit for bit. The rest differ by a few float32 ulps, all of it because
torch's float32 sqrt/exp/log (MKL/SLEEF) are not always correctly rounded and these ports are:
``test_bit_exact_with_torch_elementary_functions`` swaps torch's functions in and then demands
equality to the bit, which pins every other operation and its order.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
from contextlib import contextmanager

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

import postdiff.runtime.schedulers.base as base_module
import postdiff.runtime.schedulers.ddim as ddim_module
import postdiff.runtime.schedulers.dpm_solver as dpm_module
import postdiff.runtime.schedulers.euler as euler_module
import postdiff.runtime.schedulers.euler_ancestral as ancestral_module
import postdiff.runtime.schedulers.lcm as lcm_module
import postdiff.runtime.schedulers.pndm as pndm_module
from postdiff.exporter.scheduler_config import normalize_config
from postdiff.errors import InputError
from postdiff.runtime.schedulers import SCHEDULERS, Scheduler, default_scheduler, make_scheduler
from postdiff.runtime.schedulers.base import step_noise

# stable-diffusion-v1-5/scheduler/scheduler_config.json
SD15 = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}
# stable-diffusion-2-1 (768, v-prediction), as saved by a recent diffusers.
SD21 = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.19.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "rescale_betas_zero_snr": False, "sample_max_value": 1.0,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "thresholding": False,
    "timestep_spacing": "leading", "trained_betas": None,
}

DIFFUSERS = {name: getattr(diffusers, cls.diffusers_class) for name, cls in SCHEDULERS.items()}
SIGMA_SPACE = ("euler", "euler-ancestral")  # samples live in VE space (x = x0 + sigma eps)
STEP_COUNTS = (1, 3, 7, 20, 50)
SHAPE = (2, 4, 16, 16)


def steps_for(name: str, steps: int, config: dict) -> int:
    """A step count every scheduler can run (LCM: at most original_inference_steps)."""
    return min(steps, config.get("original_inference_steps", 50)) if name == "lcm" else steps


@contextmanager
def same_noise(name: str, ours: Scheduler, seed: int = 0, start: int = 0):
    """For a stochastic sampler: diffusers' noise draws replaced by ours, step_noise(seed, index),
    the k-th draw taken as step ``start + k`` (both sides draw once per step, in step order)."""
    if not SCHEDULERS[name].stochastic:
        yield
        return
    module = inspect.getmodule(DIFFUSERS[name])
    original = module.randn_tensor
    drawn = itertools.count(start)
    module.randn_tensor = lambda shape, **kwargs: torch.from_numpy(step_noise(seed, next(drawn), tuple(shape)))
    ours.noise = lambda index, shape: step_noise(seed, index, shape)
    try:
        yield
    finally:
        module.randn_tensor = original


def pair(name: str, config: dict, steps: int) -> tuple[object, Scheduler]:
    """(diffusers scheduler, ours), both from the same scheduler_config dict, timesteps set."""
    ref = DIFFUSERS[name].from_config(config)
    ours = make_scheduler(name, normalize_config(config))
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    return ref, ours


def vp_alpha_bar(name: str, ours: Scheduler, index: int) -> float:
    """abar of step ``index`` as float64 (from the step's sigma where the sampler has sigmas)."""
    if hasattr(ours, "sigmas"):
        sigma = float(ours.sigmas[index])
        return 1.0 / (1.0 + sigma * sigma)
    return float(ours.alphas_cumprod[int(ours.timesteps[index])])


def denoiser(name: str, ours: Scheduler, index: int, sample: np.ndarray, x0: np.ndarray,
             rng: np.random.Generator, prediction: str) -> np.ndarray:
    """A stand-in model output for ``sample`` at step ``index``: x0 + 10% noise, as ``prediction``."""
    abar = vp_alpha_bar(name, ours, index)
    vp_sample = sample.astype(np.float64) * (math.sqrt(abar) if name in SIGMA_SPACE else 1.0)
    x0_hat = x0 + 0.1 * rng.standard_normal(x0.shape)
    eps = (vp_sample - math.sqrt(abar) * x0_hat) / math.sqrt(max(1.0 - abar, 1e-12))
    out = {
        "epsilon": eps,
        "v_prediction": math.sqrt(abar) * eps - math.sqrt(1.0 - abar) * x0_hat,
        "sample": x0_hat,
    }[prediction]
    return out.astype(np.float32)


def scale_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """max|ours - ref| in units of the reference's scale max(1, max|ref|)."""
    return float(np.abs(ours - ref).max() / max(1.0, float(np.abs(ref).max())))


def run_trajectory(name: str, config: dict, steps: int, seed: int = 0) -> tuple[float, float]:
    """Step both schedulers through a whole trajectory; returns (worst abs diff, worst scale error)
    over every step's output and model input, after checking the schedule itself."""
    steps = steps_for(name, steps, config)
    ref, ours = pair(name, config, steps)
    ref_ts = ref.timesteps.numpy()
    assert ours.timesteps.dtype == ref_ts.dtype
    if ref_ts.dtype.kind == "f" and config.get("use_karras_sigmas"):
        # Fractional timesteps mapped back from sigmas: within an ulp-level sigma difference.
        np.testing.assert_allclose(ours.timesteps, ref_ts, rtol=2e-6, atol=1e-5)
    else:
        np.testing.assert_array_equal(ours.timesteps, ref_ts)
    assert abs(ours.init_noise_sigma - float(ref.init_noise_sigma)) <= 4e-7 * ours.init_noise_sigma
    if hasattr(ref, "sigmas") and hasattr(ours, "sigmas"):
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1.2e-7, atol=0)

    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(SHAPE)
    start = (rng.standard_normal(SHAPE) * ours.init_noise_sigma).astype(np.float32)
    x_ref, x_ours = torch.from_numpy(start.copy()), start.copy()
    prediction = ours.config["prediction_type"]
    worst_abs = worst_scale = 0.0
    with same_noise(name, ours, seed):
        for index, (t_ref, t_ours) in enumerate(zip(ref.timesteps, ours.timesteps)):
            model_in_ref = ref.scale_model_input(x_ref, t_ref).numpy()
            model_in_ours = ours.scale_model_input(x_ref.numpy(), t_ours)
            assert model_in_ours.dtype == np.float32
            worst_scale = max(worst_scale, scale_error(model_in_ours, model_in_ref))
            out = denoiser(name, ours, index, x_ref.numpy(), x0, rng, prediction)
            x_ref = ref.step(torch.from_numpy(out), t_ref, x_ref).prev_sample
            x_ours = ours.step(out, t_ours, x_ours)
            assert x_ours.dtype == np.float32 and x_ours.shape == SHAPE
            worst_abs = max(worst_abs, float(np.abs(x_ours - x_ref.numpy()).max()))
            worst_scale = max(worst_scale, scale_error(x_ours, x_ref.numpy()))
    return worst_abs, worst_scale


def variant(base: dict, **changes: object) -> dict:
    out = dict(base)
    out.update(changes)
    return out


# ------------------------------------------------------------------------------------------------
# Trajectory parity
# ------------------------------------------------------------------------------------------------

# Measured worst over these grids: 4.7e-6 of scale (PNDM, 50 steps); all of it torch's sqrt/exp/log
# rounding, amplified over the steps: see test_bit_exact_with_torch_elementary_functions.
TOLERANCE = 1e-5


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("base", [SD15, SD21], ids=["sd15-eps", "sd21-v"])
@pytest.mark.parametrize("spacing", [None, "leading", "trailing", "linspace"])
def test_trajectory_matches_diffusers(name: str, base: dict, spacing: str | None) -> None:
    config = dict(base) if spacing is None else variant(base, timestep_spacing=spacing)
    if spacing is None:
        config.pop("timestep_spacing", None)  # the class default applies
    for steps in STEP_COUNTS:
        worst_abs, worst_scale = run_trajectory(name, config, steps)
        assert worst_scale <= TOLERANCE, (steps, worst_abs, worst_scale)


DPM_VARIANTS = [
    variant(SD15, solver_order=order, algorithm_type=algorithm, solver_type=solver, final_sigmas_type="sigma_min")
    for order in (1, 2, 3) for algorithm in ("dpmsolver++", "dpmsolver") for solver in ("midpoint", "heun")
]
EXTRA_CONFIGS = [
    ("ddim", {}),  # diffusers' own defaults: linear betas, clip_sample, set_alpha_to_one
    ("dpm-solver", {}),
    ("euler", {}),
    ("unipc", {}),
    ("lcm", {}),
    ("pndm", {"skip_prk_steps": True}),
    ("euler-ancestral", {}),
    ("ddim", variant(SD15, clip_sample=True, clip_sample_range=1.5)),
    ("ddim", variant(SD15, set_alpha_to_one=True, prediction_type="sample")),
    ("pndm", variant(SD15, set_alpha_to_one=True, prediction_type="v_prediction")),
    ("ddim", {"beta_schedule": "squaredcos_cap_v2"}),
    ("dpm-solver", {"beta_schedule": "squaredcos_cap_v2"}),
    ("euler", {"beta_schedule": "squaredcos_cap_v2"}),
    *[("dpm-solver", config) for config in DPM_VARIANTS],
    ("dpm-solver", variant(SD15, solver_order=3)),  # lower_order_final with < 15 steps
    ("dpm-solver", variant(SD15, solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min")),
    ("dpm-solver", variant(SD15, prediction_type="sample")),
    ("dpm-solver", variant(SD15, algorithm_type="dpmsolver", prediction_type="v_prediction",
                           final_sigmas_type="sigma_min")),
    ("dpm-solver", variant(SD15, final_sigmas_type="sigma_min", lower_order_final=False)),
    ("dpm-solver", variant(SD15, euler_at_final=True)),
    ("dpm-solver", variant(SD15, solver_type="heun", prediction_type="v_prediction")),
    ("dpm-solver", variant(SD15, solver_type="bh2")),  # UniPC's name: diffusers reads midpoint
    ("dpm-solver", variant(SD15, lambda_min_clipped=-5.1)),
    ("dpm-solver", variant(SD15, use_karras_sigmas=True)),
    ("dpm-solver", variant(SD21, use_karras_sigmas=True, solver_order=3)),
    ("euler", variant(SD15, use_karras_sigmas=True)),
    ("euler", variant(SD21, use_karras_sigmas=True, timestep_spacing="trailing")),
    ("euler", variant(SD15, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0)),
    ("euler", variant(SD15, final_sigmas_type="sigma_min", prediction_type="sample")),
    ("euler", {"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()}),
    ("unipc", variant(SD15, solver_order=3)),
    ("unipc", variant(SD15, solver_order=1, solver_type="bh1", final_sigmas_type="sigma_min")),
    ("unipc", variant(SD21, predict_x0=False, final_sigmas_type="sigma_min")),
    ("unipc", variant(SD15, lower_order_final=False, disable_corrector=[0, 3])),
    ("unipc", variant(SD15, solver_type="midpoint", prediction_type="sample")),
    ("lcm", variant(SD15, original_inference_steps=25, timestep_scaling=5.0)),
    ("lcm", variant(SD21, clip_sample=True, set_alpha_to_one=False)),
]


@pytest.mark.parametrize(("name", "config"), EXTRA_CONFIGS)
def test_trajectory_matches_diffusers_other_settings(name: str, config: dict) -> None:
    # diffusers' default linear betas end at abar ~ 4e-5, squaredcos_cap_v2 at ~ 4e-9: x0 divides by
    # sqrt(abar) there, so torch's one-ulp-off sqrt(1 - abar) moves x0 ~1e2-1e4 times more than
    # elsewhere (measured: up to 3.8e-5). Bit-exact once torch's sqrt is used:
    # see test_bit_exact_with_torch_elementary_functions.
    low_snr = make_scheduler(name, normalize_config(config)).alphas_cumprod[-1] < 1e-3
    # UniPC in noise prediction (predict_x0 false) carries eps, whose float32 rounding grows as
    # 1/sigma late in the trajectory (measured: 1.9e-5 at 50 steps).
    # Third-order UniPC solves a 3x3 Vandermonde system in r_k (ratios of lambda steps, near 1 at
    # many steps): the ulp-level lambda differences grow through it (measured: 1.9e-5 at 50 steps;
    # 4e-7 with torch's log/expm1, see test_unipc_with_torch_elementary_functions).
    eps_unipc = name == "unipc" and (config.get("predict_x0") is False or config.get("solver_order") == 3)
    tolerance = 1e-4 if low_snr or eps_unipc else TOLERANCE
    for steps in STEP_COUNTS:
        worst_abs, worst_scale = run_trajectory(name, config, steps)
        assert worst_scale <= tolerance, (steps, worst_abs, worst_scale)


def test_random_model_outputs_stay_within_tolerance() -> None:
    """Pure noise as model output (latents grow far beyond a real model's): still within tolerance."""
    for name in SCHEDULERS:
        for prediction in ("epsilon", "v_prediction"):
            ref, ours = pair(name, variant(SD15, prediction_type=prediction), 20)
            rng = np.random.default_rng(1)
            x = (rng.standard_normal(SHAPE) * ours.init_noise_sigma).astype(np.float32)
            x_ref, x_ours = torch.from_numpy(x.copy()), x.copy()
            with same_noise(name, ours):
                for t_ref, t_ours in zip(ref.timesteps, ours.timesteps):
                    out = rng.standard_normal(SHAPE).astype(np.float32)
                    x_ref = ref.step(torch.from_numpy(out), t_ref, x_ref).prev_sample
                    x_ours = ours.step(out, t_ours, x_ours)
                    assert scale_error(x_ours, x_ref.numpy()) <= TOLERANCE, name


class _TorchMath:
    """numpy, except that sqrt is torch's float32 sqrt (what diffusers' ``x ** 0.5`` runs)."""

    def __getattr__(self, name: str) -> object:
        return getattr(np, name)

    @staticmethod
    def sqrt(x: object) -> object:
        arr = np.asarray(x)
        out = (torch.from_numpy(np.array(arr, dtype=np.float32, ndmin=1)) ** 0.5).numpy()
        return out.reshape(arr.shape)[()] if arr.ndim == 0 else out.reshape(arr.shape)


def test_bit_exact_with_torch_elementary_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    """With torch's sqrt/exp/log swapped in, every remaining operation must agree to the bit: the
    formulas, their order and the float32 roundings are diffusers' own (UniPC, whose coefficients
    go through a linear solve and an einsum, is checked to tolerance only)."""
    modules = (base_module, ddim_module, dpm_module, euler_module, ancestral_module, lcm_module, pndm_module)
    for module in modules:  # base: the shared sigma helpers
        monkeypatch.setattr(module, "np", _TorchMath())
    monkeypatch.setattr(dpm_module, "exp_f32", lambda x: np.float32(torch.exp(torch.tensor(x)).item()))
    # log_f32 lives where the multistep solvers' shared lambda_t is computed
    monkeypatch.setattr(base_module, "log_f32", lambda x: np.float32(torch.log(torch.tensor(x)).item()))
    cases = [
        (name, variant(base, timestep_spacing=spacing))
        for name in SCHEDULERS if name != "unipc"
        for base in (SD15, SD21)
        for spacing in ("leading", "trailing", "linspace")
    ] + [("dpm-solver", {"beta_schedule": "squaredcos_cap_v2"}), ("ddim", {"beta_schedule": "squaredcos_cap_v2"})] + [
        (name, {}) for name in SCHEDULERS if name not in ("unipc", "pndm")] + [
        # Third-order DPM-Solver++ differs by a few ulps after 50 steps (2.5e-6): it is held to
        # TOLERANCE above.
        ("dpm-solver", config) for config in DPM_VARIANTS
        if not (config["solver_order"] == 3 and config["algorithm_type"] == "dpmsolver++")]
    for name, config in cases:
        for steps in (7, 20, 50):
            worst_abs, _ = run_trajectory(name, config, steps)
            assert worst_abs == 0.0, (name, config, steps, worst_abs)


def test_unipc_with_torch_elementary_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    """UniPC with torch's sqrt/log/expm1: within 1e-6 of scale for every order (its remaining
    difference is the linear solve and einsum of the coefficients)."""
    import postdiff.runtime.schedulers.unipc as unipc_module

    for module in (base_module, unipc_module):
        monkeypatch.setattr(module, "np", _TorchMath())
    monkeypatch.setattr(base_module, "log_f32", lambda x: np.float32(torch.log(torch.tensor(x)).item()))
    monkeypatch.setattr(unipc_module, "_expm1_f32", lambda x: np.float32(torch.expm1(torch.tensor(x)).item()))
    for order in (1, 2, 3):
        for base in (SD15, SD21):
            for steps in (7, 50):
                _, worst_scale = run_trajectory("unipc", variant(base, solver_order=order), steps)
                assert worst_scale <= 1e-6, (order, steps, worst_scale)


def test_noise_schedule_matches_torch_bit_for_bit() -> None:
    """betas via torch.linspace (fused multiply-add) and alphas_cumprod via torch.cumprod."""
    for config in (SD15, {}, {"beta_schedule": "squaredcos_cap_v2"}, {"num_train_timesteps": 37}):
        config = {**config, "skip_prk_steps": True}  # PNDM's PRK warm-up is not ported
        for name in SCHEDULERS:
            ref = DIFFUSERS[name].from_config(config)
            ours = make_scheduler(name, normalize_config(config))
            np.testing.assert_array_equal(ours.betas, ref.betas.numpy())
            np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())
            assert ours.alphas_cumprod.dtype == np.float32


def test_schedule_before_set_timesteps_matches() -> None:
    for name in SCHEDULERS:
        if name == "pndm":
            continue  # diffusers' PNDM has no timesteps before set_timesteps
        ref = DIFFUSERS[name].from_config(SD15)
        ours = make_scheduler(name, normalize_config(SD15))
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
        assert ours.timesteps.dtype == ref.timesteps.numpy().dtype
        assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1.2e-7)


def test_set_timesteps_full_range() -> None:
    for name in SCHEDULERS:
        for steps in (3, 999, 1000) if name != "lcm" else (3, 50):  # LCM: at most its 50 original steps
            config = variant(SD15, timestep_spacing="trailing")
            ref, ours = pair(name, config, steps)
            np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())


# ------------------------------------------------------------------------------------------------
# reset(): a resolution switch
# ------------------------------------------------------------------------------------------------


def _common_prefix(name: str, config: dict, steps: int, switch: int, seed: int = 0):
    """Step ours to index ``switch``; returns (ours, sample at switch, x0, rng)."""
    ours = make_scheduler(name, normalize_config(config))
    ours.set_timesteps(steps)
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(SHAPE)
    x = (rng.standard_normal(SHAPE) * ours.init_noise_sigma).astype(np.float32)
    for index in range(switch):
        t = ours.timesteps[index]
        out = denoiser(name, ours, index, x, x0, rng, ours.config["prediction_type"])
        x = ours.step(out, t, x)
    return ours, x, x0, rng


def _forget_history(ref: object) -> None:
    """What reset() means on a diffusers multistep solver: empty history, no pending correction."""
    if hasattr(ref, "model_outputs"):
        ref.model_outputs = [None] * ref.config.solver_order
        ref.lower_order_nums = 0
    if hasattr(ref, "last_sample"):
        ref.last_sample = None


@pytest.mark.parametrize("name", [n for n in SCHEDULERS if n != "pndm"])
def test_reset_continues_like_a_fresh_solver_started_there(name: str) -> None:
    """After reset() at step i the rest of the trajectory equals a diffusers scheduler that starts
    at step i (set_begin_index(i)) with its history emptied (DDIM has no state and continues)."""
    steps, switch = 20, 8
    config = variant(SD15, skip_prk_steps=True)
    ours, x, x0, rng = _common_prefix(name, config, steps, switch)
    ours.reset()
    ref = DIFFUSERS[name].from_config(config)
    ref.set_timesteps(steps)
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(switch)
    _forget_history(ref)
    x_ref, x_ours = torch.from_numpy(x.copy()), x.copy()
    with same_noise(name, ours, start=switch):
        for index in range(switch, steps):
            t = ours.timesteps[index]
            np.testing.assert_allclose(
                ours.scale_model_input(x_ours, t), ref.scale_model_input(x_ref, ref.timesteps[index]).numpy(),
                rtol=0, atol=1e-5,
            )
            out = denoiser(name, ours, index, x_ref.numpy(), x0, rng, "epsilon")
            x_ref = ref.step(torch.from_numpy(out), ref.timesteps[index], x_ref).prev_sample
            x_ours = ours.step(out, t, x_ours)
            assert scale_error(x_ours, x_ref.numpy()) <= TOLERANCE


def test_pndm_reset_restarts_adams_bashforth_without_the_warm_up() -> None:
    """After reset() PNDM takes first-, then second-order Adams-Bashforth steps from the new
    history, each a DDIM transfer (PNDM eq. 11) computed here independently in float64."""
    ours, x, x0, rng = _common_prefix("pndm", SD15, 20, 6)  # past the warm-up's repeated timestep
    ours.reset()
    d = 1000 // ours.num_inference_steps
    abar = ours.alphas_cumprod.astype(np.float64)

    def transfer(sample: np.ndarray, t: int, eps: np.ndarray) -> np.ndarray:
        x0_hat = (sample - math.sqrt(1 - abar[t]) * eps) / math.sqrt(abar[t])
        return math.sqrt(abar[t - d]) * x0_hat + math.sqrt(1 - abar[t - d]) * eps

    t0, t1 = int(ours.timesteps[6]), int(ours.timesteps[7])
    e0 = denoiser("pndm", ours, 6, x, x0, rng, "epsilon")
    x1 = ours.step(e0, t0, x)
    np.testing.assert_allclose(x1, transfer(x.astype(np.float64), t0, e0), rtol=0, atol=2e-5)
    e1 = denoiser("pndm", ours, 7, x1, x0, rng, "epsilon")
    x2 = ours.step(e1, t1, x1)
    np.testing.assert_allclose(x2, transfer(x1.astype(np.float64), t1, (3 * e1.astype(np.float64) - e0) / 2),
                               rtol=0, atol=2e-5)


def test_dpm_first_step_after_reset_is_first_order() -> None:
    """The step after reset() is DPM-Solver++(1), computed here independently in float64."""
    steps, switch = 20, 8
    ours, x, x0, rng = _common_prefix("dpm-solver", SD15, steps, switch)
    out = denoiser("dpm-solver", ours, switch, x, x0, rng, "epsilon")
    t = ours.timesteps[switch]

    s_now, s_next = float(ours.sigmas[switch]), float(ours.sigmas[switch + 1])
    a_now, a_next = 1 / math.sqrt(1 + s_now**2), 1 / math.sqrt(1 + s_next**2)
    sig_now, sig_next = s_now * a_now, s_next * a_next
    h = math.log(a_next / sig_next) - math.log(a_now / sig_now)
    x0_pred = (x.astype(np.float64) - sig_now * out) / a_now
    expected = (sig_next / sig_now) * x - a_next * (math.exp(-h) - 1.0) * x0_pred

    second_order = copy.deepcopy(ours).step(out, t, x)  # same position, history kept

    ours.reset()
    first_order = ours.step(out, t, x)
    np.testing.assert_allclose(first_order, expected, rtol=0, atol=1e-5)
    assert np.abs(second_order - expected).max() > 1e-3  # the history really was dropped


@pytest.mark.parametrize("name", ["dpm-solver", "unipc"])
def test_multistep_history_dropped_when_steps_are_not_adjacent(name: str) -> None:
    ours, x, x0, rng = _common_prefix(name, SD15, 20, 5)
    out = denoiser(name, ours, 9, x, x0, rng, "epsilon")
    jumped = ours.step(out, ours.timesteps[9], x)
    fresh, *_ = _common_prefix(name, SD15, 20, 0)
    np.testing.assert_array_equal(jumped, fresh.step(out, fresh.timesteps[9], x))


@pytest.mark.parametrize("name", ["dpm-solver", "unipc", "pndm"])
def test_multistep_resolution_switch_needs_reset(name: str) -> None:
    ours, x, x0, rng = _common_prefix(name, SD15, 20, 3)
    bigger = np.zeros((2, 4, 32, 32), np.float32)
    with pytest.raises(InputError, match=r"history holds shape.*call reset\(\)"):
        ours.step(bigger, ours.timesteps[3], bigger)
    ours.reset()
    assert ours.step(bigger, ours.timesteps[3], bigger).shape == bigger.shape


def test_pndm_step_counts() -> None:
    """n inference steps evaluate the model n + 1 times (the warm-up repeats one timestep): the
    executor asks num_inference_steps_for(count); 2 evaluations cannot be had."""
    ours = make_scheduler("pndm", normalize_config(SD15))
    for count in (1, 3, 4, 21):
        ours.set_timesteps(ours.num_inference_steps_for(count))
        assert len(ours.timesteps) == count
    with pytest.raises(InputError, match="cannot run 2 steps"):
        ours.num_inference_steps_for(2)
    ours.set_timesteps(20)
    ref = diffusers.PNDMScheduler.from_config(SD15)
    ref.set_timesteps(20)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())


# ------------------------------------------------------------------------------------------------
# predict_x0 and add_noise
# ------------------------------------------------------------------------------------------------


def _their_x0(name: str, ref: object, out: torch.Tensor, index: int, x: torch.Tensor) -> torch.Tensor:
    """diffusers' own x0 for model output ``out`` at step ``index`` (from its step or conversion)."""
    if name in ("dpm-solver", "unipc"):
        ref._step_index = index
        if name == "unipc":
            ref.predict_x0 = True
        return ref.convert_model_output(out, sample=x)
    if name in SIGMA_SPACE:
        ref.set_begin_index(index)
        ref._step_index = None
        return ref.step(out, ref.timesteps[index], x).pred_original_sample
    if name == "lcm":
        ref.set_begin_index(index)
        ref._step_index = None
        return ref.step(out, ref.timesteps[index], x).denoised
    # DDIM / PNDM: DDIM's x0 formula at that training timestep.
    ddim = diffusers.DDIMScheduler.from_config(ref.config)
    ddim.set_timesteps(20)
    return ddim.step(out, ref.timesteps[index], x).pred_original_sample


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip", [False, True])
def test_predict_x0_matches_diffusers(prediction: str, clip: bool) -> None:
    config = variant(SD15, prediction_type=prediction, clip_sample=clip)
    rng = np.random.default_rng(2)
    out = rng.standard_normal(SHAPE).astype(np.float32)
    for name in SCHEDULERS:
        if prediction == "sample" and name in ("pndm", "euler-ancestral"):
            continue  # diffusers has no sample prediction there
        if clip and name in ("pndm",):
            continue
        ref, ours = pair(name, config, 20)
        for index in (0, 7, 19):
            t = ours.timesteps[index]
            x = (rng.standard_normal(SHAPE) * (ours.init_noise_sigma if index == 0 else 1.0)).astype(np.float32)
            with same_noise(name, ours):
                expected = _their_x0(name, ref, torch.from_numpy(out), index, torch.from_numpy(x))
            got = ours.predict_x0(out, t, x)
            assert got.dtype == np.float32
            assert scale_error(got, expected.numpy()) <= TOLERANCE, (name, index)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_add_noise_matches_diffusers(name: str) -> None:
    rng = np.random.default_rng(3)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    ref, ours = pair(name, SD15, 20)
    ddpm = DDPMScheduler.from_config(SD15)
    for index in (0, 5, 19):
        t = ours.timesteps[index]
        got = ours.add_noise(x0, noise, t)
        assert got.dtype == np.float32
        # The class's own add_noise ...
        own = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ref.timesteps[index : index + 1])
        assert scale_error(got, own.numpy()) <= TOLERANCE
        # ... is the forward process q(x_t | x0) = N(sqrt(abar) x0, (1 - abar) I): DDPM's add_noise
        # for the VP schedulers; for Euler after the move to VP space (times 1 / sqrt(1 + sigma^2)).
        if name in SIGMA_SPACE:
            abar = vp_alpha_bar(name, ours, index)
            vp = math.sqrt(abar) * x0.astype(np.float64) + math.sqrt(1 - abar) * noise
            assert scale_error(got * np.float32(math.sqrt(abar)), vp) <= TOLERANCE
        else:
            vp = ddpm.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.tensor([int(t)]))
            assert scale_error(got, vp.numpy()) <= TOLERANCE


@pytest.mark.parametrize("name", [n for n in SCHEDULERS if n != "lcm"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_add_noise_and_predict_x0_share_a_state_space(name: str, prediction: str) -> None:
    """Re-noising x0 and asking for x0 back with the true noise gives x0 (the switch round-trip);
    LCM's x0 is the consistency function's output, which mixes in c_skip x on purpose."""
    rng = np.random.default_rng(4)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    _, ours = pair(name, variant(SD15, prediction_type=prediction), 20)
    for index in (3, 10, 19):
        t = ours.timesteps[index]
        x_t = ours.add_noise(x0, noise, t)
        abar = vp_alpha_bar(name, ours, index) if name in SIGMA_SPACE or hasattr(ours, "sigmas") else \
            float(ours.alphas_cumprod[int(t)])
        out = noise if prediction == "epsilon" else (
            math.sqrt(abar) * noise - math.sqrt(1 - abar) * x0).astype(np.float32)
        np.testing.assert_allclose(ours.predict_x0(out, t, x_t), x0, rtol=0, atol=2e-4)


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------


def test_normalize_config_keeps_the_config_as_diffusers_wrote_it() -> None:
    assert normalize_config(SD15) == {
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    }
    sd21 = normalize_config(SD21)
    assert sd21 == {k: v for k, v in SD21.items() if not k.startswith("_")}
    assert normalize_config(sd21) == sd21
    betas = normalize_config({"trained_betas": np.linspace(1e-4, 0.02, 10)})["trained_betas"]
    assert isinstance(betas, list) and len(betas) == 10
    # -inf (not JSON) is lambda_min_clipped's default: dropped, restored by the runtime.
    assert normalize_config({"lambda_min_clipped": -math.inf}) == {}
    # use_karras_sigmas is kept: fine for DDIM, honoured by Euler and DPM-Solver.
    assert normalize_config({"use_karras_sigmas": True}) == {"use_karras_sigmas": True}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_defaults_are_the_diffusers_class_defaults(name: str) -> None:
    ours = make_scheduler(name, {"skip_prk_steps": True} if name == "pndm" else {})
    signature = inspect.signature(DIFFUSERS[name].__init__).parameters
    for key, value in ours.config.items():
        if key != "skip_prk_steps":  # PNDM: diffusers defaults to the PRK warm-up, not ported
            assert signature[key].default == value, key
    for key in SCHEDULERS[name].UNPORTED:  # every unported key is one the diffusers class has
        assert key in signature, key


@pytest.mark.parametrize(
    ("name", "config", "pattern"),
    [
        ("ddim", {"thresholding": True}, r"'thresholding' is True, which the ddim sampler does not support"),
        ("unipc", {"use_karras_sigmas": True}, r"'use_karras_sigmas' is True, which the unipc sampler"),
        ("euler", {"rescale_betas_zero_snr": True}, r"'rescale_betas_zero_snr' is True, which the euler sampler"),
        ("pndm", {"skip_prk_steps": False}, r"'skip_prk_steps' is False, which the pndm sampler"),
        ("pndm", {"skip_prk_steps": True, "prediction_type": "sample"}, r"'prediction_type' is 'sample'.*pndm"),
        ("dpm-solver", {"algorithm_type": "sde-dpmsolver++"}, r"'algorithm_type' is 'sde-dpmsolver\+\+'.*dpm-solver"),
        ("dpm-solver", {"solver_order": 4}, r"'solver_order' is 4, which the dpm-solver sampler"),
        ("dpm-solver", {"algorithm_type": "dpmsolver"}, r"'final_sigmas_type' is 'zero'.*dpmsolver"),
        ("euler-ancestral", {"prediction_type": "sample"}, r"'prediction_type' is 'sample'.*euler-ancestral"),
        ("ddim", {"beta_schedule": "cosine"}, r"'beta_schedule' is 'cosine'; expected one of 'linear'"),
        ("ddim", {"prediction_type": "flow_prediction"}, r"'prediction_type' is 'flow_prediction'"),
        ("ddim", {"timestep_spacing": "uniform"}, r"'timestep_spacing' is 'uniform'"),
        ("euler", {"interpolation_type": "log_linear"}, r"'interpolation_type' is 'log_linear'"),
        ("euler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}, r"'timestep_type'"),
        ("dpm-solver", {"variance_type": "learned_range"}, r"'variance_type' is 'learned_range'"),
        ("ddim", {"num_train_timesteps": 0}, r"'num_train_timesteps' is 0; expected an integer >= 1"),
        ("ddim", {"steps_offset": 1.5}, r"'steps_offset' is 1.5"),
        ("ddim", {"clip_sample": "no"}, r"'clip_sample' is 'no'; expected true or false"),
        ("ddim", {"trained_betas": [0.1, 1.5]}, r"'trained_betas'"),
    ],
)
def test_unsupported_settings_are_errors_for_the_sampler_that_uses_them(name: str, config: dict,
                                                                       pattern: str) -> None:
    with pytest.raises(InputError, match=pattern):
        make_scheduler(name, normalize_config(config))


def test_a_key_only_other_samplers_use_is_ignored() -> None:
    """use_karras_sigmas: true does not concern DDIM, PNDM or LCM (their classes lack the key), and
    thresholding: true does not concern Euler: from_config ignores them, and so do we."""
    for name in ("ddim", "pndm", "lcm"):
        make_scheduler(name, {"use_karras_sigmas": True, "skip_prk_steps": True})
    for name in ("euler", "euler-ancestral", "pndm"):
        make_scheduler(name, {"thresholding": True, "skip_prk_steps": True})


def test_default_scheduler_is_the_shipped_class() -> None:
    for name, cls in SCHEDULERS.items():
        assert default_scheduler(cls.diffusers_class) == name
    with pytest.raises(InputError, match=r"ships LMSDiscreteScheduler, which postdiff does not port; "
                                         r"supported: DDIMScheduler \(ddim\), PNDMScheduler \(pndm\)"):
        default_scheduler("LMSDiscreteScheduler")


def test_make_scheduler_errors() -> None:
    with pytest.raises(InputError, match=r"scheduler 'lms' is not available; expected one of ddim, pndm, euler"):
        make_scheduler("lms", {})
    with pytest.raises(InputError, match=r"'trained_betas' has 3 values but 'num_train_timesteps' is 1000"):
        make_scheduler("euler", {"trained_betas": [0.1, 0.2, 0.3]})
    with pytest.raises(InputError, match=r"drives abar to 0.0 in float32; expected abar > 0"):
        make_scheduler("euler", {"beta_end": 0.7, "num_train_timesteps": 4000})
    with pytest.raises(InputError, match=r"expected a mapping"):
        make_scheduler("euler", [("beta_start", 0.1)])  # type: ignore[arg-type]


@pytest.mark.parametrize("name", SCHEDULERS)
def test_step_errors(name: str) -> None:
    ours = make_scheduler(name, normalize_config(SD15))
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(InputError, match=r"before set_timesteps\(\).*call set_timesteps"):
        ours.step(x, 999, x)
    for bad in (0, -3, 1001, 2.5, True):
        with pytest.raises(InputError, match=r"num_inference_steps is .*; expected an integer from 1 to 1000"):
            ours.set_timesteps(bad)  # type: ignore[arg-type]
    ours.set_timesteps(10)
    with pytest.raises(InputError, match=r"'model_output' has shape \[1, 4, 16, 16\] but 'sample' has shape"):
        ours.step(np.zeros((1, 4, 16, 16), np.float32), ours.timesteps[0], x)
    with pytest.raises(InputError, match=r"dtype <U|dtype object|has dtype"):
        ours.step(np.array(["a"]), ours.timesteps[0], x)
    with pytest.raises(InputError, match=r"timestep 1234"):
        ours.step(x, 1234, x)
    if name not in ("ddim", "pndm"):  # DDIM and PNDM step from any training timestep, as diffusers
        with pytest.raises(InputError, match=r"timestep 501 is not one of this .* scheduler.s timesteps"):
            ours.step(x, 501, x)


def test_steps_offset_past_the_trained_range_is_rejected() -> None:
    ours = make_scheduler("ddim", normalize_config(SD15))  # leading spacing, steps_offset 1
    with pytest.raises(InputError, match=r"gives timesteps outside \[0, 999\]"):
        ours.set_timesteps(1000)


def test_returns_float32_for_float64_inputs() -> None:
    for name in SCHEDULERS:
        ours = make_scheduler(name, normalize_config(SD15))
        ours.set_timesteps(5)
        x = np.ones(SHAPE, np.float64)
        t = ours.timesteps[0]
        assert ours.scale_model_input(x, t).dtype == np.float32
        assert ours.step(x, t, x).dtype == np.float32


def test_stochastic_samplers_reproduce_from_the_seed() -> None:
    """Same seed, same trajectory; another seed, another; the noise of step i does not depend on
    what ran before (reset() or not)."""
    for name in ("euler-ancestral", "lcm"):
        runs = []
        for seed, reset_at in ((3, None), (3, 2), (4, None)):
            ours = make_scheduler(name, normalize_config(SD15), seed=seed)
            ours.set_timesteps(4)
            x = np.ones(SHAPE, np.float32)
            for index, t in enumerate(ours.timesteps):
                if index == reset_at:
                    ours.reset()
                x = ours.step(np.full(SHAPE, 0.1, np.float32), t, x)
            runs.append(x)
        np.testing.assert_array_equal(runs[0], runs[1])
        assert np.abs(runs[0] - runs[2]).max() > 1e-2
