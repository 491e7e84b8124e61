"""The numpy schedulers against the diffusers classes they port (DDIM, DPM-Solver++ 2M, Euler).

Trajectories are stepped independently by both sides (each feeds its own previous output back),
with the same model outputs. The model is a stand-in denoiser: it predicts a fixed clean latent
plus 10% noise, expressed as epsilon / v / sample, so latents stay at the scale a real model
keeps them at.

Tolerance: 1e-6 of the latent's scale, i.e. max|ours - diffusers| <= 1e-6 * max(1, max|diffusers|).
Most configurations match bit for bit. The rest differ by a few float32 ulps, all of it because
torch's float32 sqrt/exp/log (MKL/SLEEF) are not always correctly rounded and these ports are:
``test_bit_exact_with_torch_elementary_functions`` swaps torch's functions in and then demands
equality to the bit, which pins every other operation and its order.
"""

from __future__ import annotations

import copy
import inspect
import json
import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)

import postdiff.runtime.schedulers.base as base_module
import postdiff.runtime.schedulers.ddim as ddim_module
import postdiff.runtime.schedulers.dpmpp_2m as dpm_module
import postdiff.runtime.schedulers.euler as euler_module
from postdiff.errors import InputError
from postdiff.runtime.schedulers import (
    CONFIG_KEYS,
    SCHEDULERS,
    Scheduler,
    make_scheduler,
    normalize_config,
)

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

DIFFUSERS = {
    "ddim": DDIMScheduler,
    "dpmpp-2m": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}
STEP_COUNTS = (1, 2, 7, 20, 50)
SHAPE = (2, 4, 16, 16)


def pair(name: str, config: dict, steps: int) -> tuple[object, Scheduler]:
    """(diffusers scheduler, ours), both from the same scheduler_config dict, timesteps set."""
    ref = DIFFUSERS[name].from_config(config)
    ours = make_scheduler(name, normalize_config(config))
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    return ref, ours


def vp_alpha_bar(name: str, ours: Scheduler, index: int) -> float:
    """abar of step ``index`` as float64, and the factor taking the sample to VP space."""
    if name == "euler":
        sigma = float(ours.sigmas[index])
        return 1.0 / (1.0 + sigma * sigma)
    return float(ours.alphas_cumprod[int(ours.timesteps[index])])


def denoiser(name: str, ours: Scheduler, index: int, sample: np.ndarray, x0: np.ndarray,
             rng: np.random.Generator, prediction: str) -> np.ndarray:
    """A stand-in model output for ``sample`` at step ``index``: x0 + 10% noise, as ``prediction``."""
    abar = vp_alpha_bar(name, ours, index)
    vp_sample = sample.astype(np.float64) * (math.sqrt(abar) if name == "euler" else 1.0)
    x0_hat = x0 + 0.1 * rng.standard_normal(x0.shape)
    eps = (vp_sample - math.sqrt(abar) * x0_hat) / math.sqrt(1.0 - abar)
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
    ref, ours = pair(name, config, steps)
    ref_ts = ref.timesteps.numpy()
    assert ours.timesteps.dtype == ref_ts.dtype
    np.testing.assert_array_equal(ours.timesteps, ref_ts)
    assert abs(ours.init_noise_sigma - float(ref.init_noise_sigma)) <= 1.2e-7 * ours.init_noise_sigma
    if hasattr(ref, "sigmas") and name != "ddim":
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1.2e-7, atol=0)

    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(SHAPE)
    start = (rng.standard_normal(SHAPE) * ours.init_noise_sigma).astype(np.float32)
    x_ref, x_ours = torch.from_numpy(start.copy()), start.copy()
    prediction = ours.config["prediction_type"]
    worst_abs = worst_scale = 0.0
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

@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("base", [SD15, SD21], ids=["sd15-eps", "sd21-v"])
@pytest.mark.parametrize("spacing", [None, "leading", "trailing", "linspace"])
def test_trajectory_matches_diffusers(name: str, base: dict, spacing: str | None) -> None:
    config = dict(base) if spacing is None else variant(base, timestep_spacing=spacing)
    if spacing is None:
        config.pop("timestep_spacing", None)  # the class default applies
    for steps in STEP_COUNTS:
        worst_abs, worst_scale = run_trajectory(name, config, steps)
        assert worst_scale <= 1e-6, (steps, worst_abs, worst_scale)


EXTRA_CONFIGS = [
    ("ddim", {}),  # diffusers' own defaults: linear betas, clip_sample, set_alpha_to_one
    ("dpmpp-2m", {}),
    ("euler", {}),
    ("ddim", variant(SD15, clip_sample=True, clip_sample_range=1.5)),
    ("ddim", variant(SD15, set_alpha_to_one=True, prediction_type="sample")),
    ("ddim", {"beta_schedule": "squaredcos_cap_v2"}),
    ("dpmpp-2m", {"beta_schedule": "squaredcos_cap_v2"}),
    ("euler", {"beta_schedule": "squaredcos_cap_v2"}),
    ("dpmpp-2m", variant(SD15, prediction_type="sample")),
    ("dpmpp-2m", variant(SD15, final_sigmas_type="sigma_min", lower_order_final=False)),
    ("dpmpp-2m", variant(SD15, euler_at_final=True)),
    ("dpmpp-2m", variant(SD15, solver_type="heun", prediction_type="v_prediction")),
    ("dpmpp-2m", variant(SD15, lambda_min_clipped=-5.1)),
    ("euler", variant(SD15, final_sigmas_type="sigma_min", prediction_type="sample")),
    ("euler", {"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()}),
]


@pytest.mark.parametrize(("name", "config"), EXTRA_CONFIGS)
def test_trajectory_matches_diffusers_other_settings(name: str, config: dict) -> None:
    # squaredcos_cap_v2 ends at abar ~ 4e-9: DDIM divides by sqrt(abar) ~ 6e-5 there, so torch's
    # one-ulp-off sqrt(1 - abar) moves x0 ~1e4 times more than elsewhere (measured: 1.6e-6).
    # Bit-exact once torch's sqrt is used: see test_bit_exact_with_torch_elementary_functions.
    tolerance = 1e-5 if config.get("beta_schedule") == "squaredcos_cap_v2" else 1e-6
    for steps in STEP_COUNTS:
        worst_abs, worst_scale = run_trajectory(name, config, steps)
        assert worst_scale <= tolerance, (steps, worst_abs, worst_scale)


def test_random_model_outputs_stay_within_tolerance() -> None:
    """Pure noise as model output (latents grow far beyond a real model's): still 1e-6 of scale."""
    for name in SCHEDULERS:
        for prediction in ("epsilon", "v_prediction"):
            ref, ours = pair(name, variant(SD15, prediction_type=prediction), 20)
            rng = np.random.default_rng(1)
            x = (rng.standard_normal(SHAPE) * ours.init_noise_sigma).astype(np.float32)
            x_ref, x_ours = torch.from_numpy(x.copy()), x.copy()
            for t_ref, t_ours in zip(ref.timesteps, ours.timesteps):
                out = rng.standard_normal(SHAPE).astype(np.float32)
                x_ref = ref.step(torch.from_numpy(out), t_ref, x_ref).prev_sample
                x_ours = ours.step(out, t_ours, x_ours)
                assert scale_error(x_ours, x_ref.numpy()) <= 1e-6


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
    formulas, their order and the float32 roundings are diffusers' own."""
    for module in (base_module, ddim_module, dpm_module, euler_module):  # base: the shared sigma helpers
        monkeypatch.setattr(module, "np", _TorchMath())
    monkeypatch.setattr(dpm_module, "exp_f32", lambda x: np.float32(torch.exp(torch.tensor(x)).item()))
    monkeypatch.setattr(dpm_module, "log_f32", lambda x: np.float32(torch.log(torch.tensor(x)).item()))
    cases = [
        (name, variant(base, timestep_spacing=spacing))
        for name in SCHEDULERS
        for base in (SD15, SD21)
        for spacing in ("leading", "trailing", "linspace")
    ] + [("dpmpp-2m", {"beta_schedule": "squaredcos_cap_v2"}), ("ddim", {"beta_schedule": "squaredcos_cap_v2"})]
    for name, config in cases:
        for steps in (7, 20, 50):
            worst_abs, _ = run_trajectory(name, config, steps)
            assert worst_abs == 0.0, (name, config, steps, worst_abs)


def test_noise_schedule_matches_torch_bit_for_bit() -> None:
    """betas via torch.linspace (fused multiply-add) and alphas_cumprod via torch.cumprod."""
    for config in (SD15, {}, {"beta_schedule": "squaredcos_cap_v2"}, {"num_train_timesteps": 37}):
        for name in SCHEDULERS:
            ref = DIFFUSERS[name].from_config(config)
            ours = make_scheduler(name, normalize_config(config))
            np.testing.assert_array_equal(ours.betas, ref.betas.numpy())
            np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())
            assert ours.alphas_cumprod.dtype == np.float32


def test_schedule_before_set_timesteps_matches() -> None:
    for name in SCHEDULERS:
        ref = DIFFUSERS[name].from_config(SD15)
        ours = make_scheduler(name, normalize_config(SD15))
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
        assert ours.timesteps.dtype == ref.timesteps.numpy().dtype
        assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1.2e-7)


def test_set_timesteps_full_range() -> None:
    for name in SCHEDULERS:
        for steps in (3, 999, 1000):
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


@pytest.mark.parametrize("name", SCHEDULERS)
def test_reset_continues_like_a_fresh_solver_started_there(name: str) -> None:
    """After reset() at step i the rest of the trajectory equals a fresh diffusers scheduler that
    starts at step i (set_begin_index(i); DDIM has no state and just continues)."""
    steps, switch = 20, 8
    ours, x, x0, rng = _common_prefix(name, SD15, steps, switch)
    ours.reset()
    ref = DIFFUSERS[name].from_config(SD15)
    ref.set_timesteps(steps)
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(switch)
    x_ref, x_ours = torch.from_numpy(x.copy()), x.copy()
    for index in range(switch, steps):
        t = ours.timesteps[index]
        np.testing.assert_allclose(
            ours.scale_model_input(x_ours, t), ref.scale_model_input(x_ref, ref.timesteps[index]).numpy(),
            rtol=0, atol=1e-6,
        )
        out = denoiser(name, ours, index, x_ref.numpy(), x0, rng, "epsilon")
        x_ref = ref.step(torch.from_numpy(out), ref.timesteps[index], x_ref).prev_sample
        x_ours = ours.step(out, t, x_ours)
        assert scale_error(x_ours, x_ref.numpy()) <= 1e-6


def test_dpm_first_step_after_reset_is_first_order() -> None:
    """The step after reset() is DPM-Solver++(1), computed here independently in float64."""
    steps, switch = 20, 8
    ours, x, x0, rng = _common_prefix("dpmpp-2m", SD15, steps, switch)
    out = denoiser("dpmpp-2m", ours, switch, x, x0, rng, "epsilon")
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


def test_dpm_history_dropped_when_steps_are_not_adjacent() -> None:
    ours, x, x0, rng = _common_prefix("dpmpp-2m", SD15, 20, 5)
    out = denoiser("dpmpp-2m", ours, 9, x, x0, rng, "epsilon")
    jumped = ours.step(out, ours.timesteps[9], x)
    fresh, *_ = _common_prefix("dpmpp-2m", SD15, 20, 0)
    np.testing.assert_array_equal(jumped, fresh.step(out, fresh.timesteps[9], x))


def test_dpm_resolution_switch_needs_reset() -> None:
    ours, x, x0, rng = _common_prefix("dpmpp-2m", SD15, 20, 3)
    bigger = np.zeros((2, 4, 32, 32), np.float32)
    with pytest.raises(InputError, match=r"history holds shape.*call reset\(\)"):
        ours.step(bigger, ours.timesteps[3], bigger)
    ours.reset()
    assert ours.step(bigger, ours.timesteps[3], bigger).shape == bigger.shape


# ------------------------------------------------------------------------------------------------
# predict_x0 and add_noise
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip", [False, True])
def test_predict_x0_matches_diffusers(prediction: str, clip: bool) -> None:
    config = variant(SD15, prediction_type=prediction, clip_sample=clip)
    rng = np.random.default_rng(2)
    out = rng.standard_normal(SHAPE).astype(np.float32)
    for name in SCHEDULERS:
        ref, ours = pair(name, config, 20)
        for index in (0, 7, 19):
            t = ours.timesteps[index]
            x = (rng.standard_normal(SHAPE) * (ours.init_noise_sigma if index == 0 else 1.0)).astype(np.float32)
            if name == "dpmpp-2m":
                ref._step_index = index
                expected = ref.convert_model_output(torch.from_numpy(out), sample=torch.from_numpy(x))
            else:
                if name == "euler":
                    ref.set_begin_index(index)
                    ref._step_index = None
                expected = ref.step(torch.from_numpy(out), ref.timesteps[index], torch.from_numpy(x)).pred_original_sample
            got = ours.predict_x0(out, t, x)
            assert got.dtype == np.float32
            assert scale_error(got, expected.numpy()) <= 1e-6, (name, index)


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
        assert scale_error(got, own.numpy()) <= 1e-6
        # ... is the forward process q(x_t | x0) = N(sqrt(abar) x0, (1 - abar) I): DDPM's add_noise
        # for the VP schedulers; for Euler after the move to VP space (times 1 / sqrt(1 + sigma^2)).
        if name == "euler":
            abar = vp_alpha_bar(name, ours, index)
            vp = math.sqrt(abar) * x0.astype(np.float64) + math.sqrt(1 - abar) * noise
            assert scale_error(got * np.float32(math.sqrt(abar)), vp) <= 1e-6
        else:
            vp = ddpm.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.tensor([int(t)]))
            assert scale_error(got, vp.numpy()) <= 1e-6


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_add_noise_and_predict_x0_share_a_state_space(name: str, prediction: str) -> None:
    """Re-noising x0 and asking for x0 back with the true noise gives x0 (the switch round-trip)."""
    rng = np.random.default_rng(4)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    _, ours = pair(name, variant(SD15, prediction_type=prediction), 20)
    for index in (3, 10, 19):
        t = ours.timesteps[index]
        x_t = ours.add_noise(x0, noise, t)
        abar = vp_alpha_bar(name, ours, index)
        out = noise if prediction == "epsilon" else (
            math.sqrt(abar) * noise - math.sqrt(1 - abar) * x0).astype(np.float32)
        np.testing.assert_allclose(ours.predict_x0(out, t, x_t), x0, rtol=0, atol=2e-4)


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------


def test_normalize_config_keeps_only_what_we_honour() -> None:
    assert normalize_config(SD15) == {
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False,
        "steps_offset": 1, "trained_betas": None,
    }
    sd21 = normalize_config(SD21)
    assert set(sd21) <= CONFIG_KEYS
    assert sd21["prediction_type"] == "v_prediction" and sd21["timestep_spacing"] == "leading"
    assert "thresholding" not in sd21 and "skip_prk_steps" not in sd21
    json.dumps(sd21, allow_nan=False)
    assert normalize_config(sd21) == sd21
    betas = normalize_config({"trained_betas": np.linspace(1e-4, 0.02, 10)})["trained_betas"]
    assert isinstance(betas, list) and len(betas) == 10
    # Keys of other scheduler classes are ignored, as diffusers' from_config ignores them.
    assert normalize_config({"variance_type": "fixed_small", "skip_prk_steps": True}) == {}
    assert normalize_config({"solver_type": "bh2", "algorithm_type": "dpmsolver++"}) == {}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_defaults_are_the_diffusers_class_defaults(name: str) -> None:
    ours = make_scheduler(name, {})
    signature = inspect.signature(DIFFUSERS[name].__init__).parameters
    for key, value in ours.config.items():
        assert signature[key].default == value, key


@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        ({"thresholding": True}, r"'thresholding' is True; expected false"),
        ({"use_karras_sigmas": True}, r"'use_karras_sigmas' is True"),
        ({"rescale_betas_zero_snr": True}, r"'rescale_betas_zero_snr' is True"),
        ({"beta_schedule": "cosine"}, r"'beta_schedule' is 'cosine'; expected one of 'linear'"),
        ({"prediction_type": "flow_prediction"}, r"'prediction_type' is 'flow_prediction'"),
        ({"timestep_spacing": "uniform"}, r"'timestep_spacing' is 'uniform'"),
        ({"interpolation_type": "log_linear"}, r"'interpolation_type' is 'log_linear'"),
        ({"timestep_type": "continuous", "prediction_type": "v_prediction"}, r"'timestep_type'"),
        ({"variance_type": "learned_range"}, r"'variance_type' is 'learned_range'"),
        ({"num_train_timesteps": 0}, r"'num_train_timesteps' is 0; expected an integer >= 1"),
        ({"steps_offset": 1.5}, r"'steps_offset' is 1.5"),
        ({"clip_sample": "no"}, r"'clip_sample' is 'no'; expected true or false"),
        ({"trained_betas": [0.1, 1.5]}, r"'trained_betas'"),
    ],
)
def test_normalize_config_rejects_what_we_cannot_honour(config: dict, pattern: str) -> None:
    with pytest.raises(InputError, match=pattern):
        normalize_config(config)


def test_make_scheduler_errors() -> None:
    with pytest.raises(InputError, match=r"scheduler 'pndm' is not available; expected one of ddim, dpmpp-2m, euler"):
        make_scheduler("pndm", {})
    with pytest.raises(InputError, match=r"unknown keys \['skip_prk_steps'\].*normalize_config"):
        make_scheduler("ddim", {"skip_prk_steps": True})
    with pytest.raises(InputError, match=r"'trained_betas' has 3 values but 'num_train_timesteps' is 1000"):
        make_scheduler("euler", {"trained_betas": [0.1, 0.2, 0.3]})
    with pytest.raises(InputError, match=r"drives abar to 0.0 in float32; expected abar > 0"):
        make_scheduler("euler", {"beta_end": 0.7, "num_train_timesteps": 4000})
    with pytest.raises(InputError, match=r"expected a mapping"):
        make_scheduler("euler", [("beta_start", 0.1)])  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"expected the dict of a diffusers scheduler_config.json"):
        normalize_config("scheduler_config.json")  # type: ignore[arg-type]


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
    if name != "ddim":  # DDIM steps from any training timestep, as diffusers does
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
