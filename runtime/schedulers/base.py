"""What the numpy schedulers share: the config schema, the noise schedules, the base class.

The ports are written to reproduce diffusers 0.42.1 (run with torch 2.13 on CPU) in float32, in the
same order of operations, so a trajectory stepped here stays within ~1e-6 of the same trajectory
stepped by diffusers. Two places need more than the textbook formula to get there:

* ``torch.linspace`` in float32 evaluates every point as ``start + step * i`` (the upper half as
  ``end - step * (n - 1 - i)``) with a fused multiply-add, so each point is rounded once.
  :func:`torch_linspace_f32` does the same in exact arithmetic.
* ``torch.cumprod`` of a float32 tensor on the CPU accumulates in float64 and rounds each partial
  product to float32; :func:`alphas_cumprod_from_betas` does the same.

Everything else is plain IEEE float32 arithmetic on numpy scalars and arrays. The one remaining
source of difference is that torch's float32 ``sqrt``/``log``/``exp`` (MKL and SLEEF kernels) are
not always correctly rounded, while these ports round correctly: scalar coefficients can differ
from diffusers' by one unit in the last place.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np

from postdiff.errors import InputError

# float32 constants: written out so that no expression silently widens to float64 (numpy < 2
# promotes float32 scalars combined with Python floats by value).
F32_ZERO = np.float32(0.0)
F32_ONE = np.float32(1.0)
F32_HALF = np.float32(0.5)

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
INTERPOLATION_TYPES = ("linear",)
# Every solver_type a diffusers multistep solver accepts; each sampler maps the other family's names
# onto its own default, as diffusers does (DPM-Solver: bh1/bh2/logrho -> midpoint; UniPC: the reverse).
SOLVER_TYPES = ("midpoint", "heun", "logrho", "bh1", "bh2")

_FIX = "fix the model's scheduler_config.json and re-export, or pick another sampler with --scheduler"


# --------------------------------------------------------------------------------------------
# Config values
# --------------------------------------------------------------------------------------------


def show(value: Any) -> str:
    """repr() of a value, numpy scalars shown as the plain Python number they hold."""
    if isinstance(value, np.generic):
        value = value.item()
    return repr(value)


def _bad(key: str, value: Any, expected: str) -> InputError:
    return InputError(f"scheduler config '{key}' is {show(value)}; expected {expected}; {_FIX}")


def _int_at_least(minimum: int) -> Callable[[str, Any], int]:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, Integral) or int(value) < minimum:
            raise _bad(key, value, f"an integer >= {minimum}")
        return int(value)

    return check


def _check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise _bad(key, value, "true or false")
    return bool(value)


def _check_beta(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= float(value) < 1.0:
        raise _bad(key, value, "a number in [0, 1)")
    return float(value)


def _check_positive(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not float(value) > 0.0 \
            or not math.isfinite(float(value)):
        raise _bad(key, value, "a finite number > 0")
    return float(value)


def _check_lambda_min(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(float(value)) \
            or float(value) == math.inf:
        raise _bad(key, value, "a number or -inf")
    return float(value)


def _check_optional_positive(key: str, value: Any) -> float | None:
    return None if value is None else _check_positive(key, value)


def _check_str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _bad(key, value, "a string")
    return value


def _check_int_list(key: str, value: Any) -> list[int]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (Sequence, np.ndarray)) or any(
            isinstance(v, bool) or not isinstance(v, Integral) for v in value):
        raise _bad(key, value, "a list of step indices")
    return [int(v) for v in value]


def _one_of(choices: Sequence[str]) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        if value not in choices:
            raise _bad(key, value, "one of " + ", ".join(repr(c) for c in choices))
        return str(value)

    return check


def _check_trained_betas(key: str, value: Any) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (Sequence, np.ndarray)):
        raise _bad(key, type(value).__name__, "null or a list of numbers")
    betas = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, Real) or not 0.0 <= float(item) < 1.0:
            raise _bad(key, f"a list containing {item!r}", "null or a list of numbers in [0, 1)")
        betas.append(float(item))
    if not betas:
        raise _bad(key, "an empty list", "null or a list of numbers in [0, 1)")
    return betas


# Every key a scheduler built here understands, with its check/normaliser. A key that one
# scheduler does not use (clip_sample for Euler, say) is accepted and ignored by it, exactly as
# diffusers' from_config() ignores it.
VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    "num_train_timesteps": _int_at_least(1),
    "beta_start": _check_beta,
    "beta_end": _check_beta,
    "beta_schedule": _one_of(BETA_SCHEDULES),
    "trained_betas": _check_trained_betas,
    "prediction_type": _one_of(PREDICTION_TYPES),
    "timestep_spacing": _one_of(TIMESTEP_SPACINGS),
    "steps_offset": _int_at_least(0),
    "set_alpha_to_one": _check_bool,
    "clip_sample": _check_bool,
    "clip_sample_range": _check_positive,
    "lower_order_final": _check_bool,
    "euler_at_final": _check_bool,
    "final_sigmas_type": _one_of(FINAL_SIGMAS_TYPES),
    "lambda_min_clipped": _check_lambda_min,
    "solver_type": _one_of(SOLVER_TYPES),
    "interpolation_type": _one_of(INTERPOLATION_TYPES),
    "solver_order": _int_at_least(1),
    "algorithm_type": _check_str,  # each solver checks the values it ports
    "use_karras_sigmas": _check_bool,
    "sigma_min": _check_optional_positive,
    "sigma_max": _check_optional_positive,
    "skip_prk_steps": _check_bool,
    "predict_x0": _check_bool,
    "disable_corrector": _check_int_list,
    "original_inference_steps": _int_at_least(1),
    "timestep_scaling": _check_positive,
}


def _off(key: str, value: Any, config: Mapping[str, Any]) -> str | None:
    return None if value in (None, False) else "false (not ported)"


def _timestep_type(key: str, value: Any, config: Mapping[str, Any]) -> str | None:
    if value in (None, "discrete"):
        return None
    if value == "continuous" and config.get("prediction_type", "epsilon") != "v_prediction":
        return None  # diffusers treats it as discrete unless the model predicts v
    return "'discrete' (continuous v-prediction timesteps are not ported)"


def _variance_type(key: str, value: Any, config: Mapping[str, Any]) -> str | None:
    if value in ("learned", "learned_range"):
        return "a fixed variance (learned-variance model outputs are not ported)"
    return None


def _interpolation(key: str, value: Any, config: Mapping[str, Any]) -> str | None:
    return None if value in (None, "linear") else "'linear' ('log_linear' is not ported)"


#: Keys of the mirrored diffusers classes whose non-default values these ports do not reproduce.
#: A sampler lists the ones its diffusers class has (``UNPORTED``); a config that turns one on is
#: an error for that sampler only. A check returns None when the value is harmless, else what
#: would be. Keys a sampler's class does not have are ignored, as ``from_config`` ignores them.
UNPORTED_CHECKS: dict[str, Callable[[str, Any, Mapping[str, Any]], str | None]] = {
    "thresholding": _off,
    "rescale_betas_zero_snr": _off,
    "use_karras_sigmas": _off,
    "use_exponential_sigmas": _off,
    "use_beta_sigmas": _off,
    "use_lu_lambdas": _off,
    "use_flow_sigmas": _off,
    "use_dynamic_shifting": _off,
    "shift_terminal": _off,
    "timestep_type": _timestep_type,
    "variance_type": _variance_type,
    "interpolation_type": _interpolation,
}

# Defaults every diffusers scheduler class we mirror shares.
COMMON_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
}


def resolve_config(config: Mapping[str, Any], defaults: Mapping[str, Any], unported: Sequence[str],
                   name: str) -> dict[str, Any]:
    """The values of the keys in ``defaults`` (validated, or the default where ``config`` lacks them).

    ``config`` is the scheduler configuration a bundle's manifest holds (the model's
    scheduler_config.json as the exporter normalised it). Keys of ``unported`` must hold a value
    that changes nothing (else InputError naming key, value and sampler); every other key belongs
    to some other scheduler class and is ignored, as diffusers' ``from_config`` ignores it.
    """
    if not isinstance(config, Mapping):
        raise InputError(
            f"scheduler config is a {type(config).__name__}; expected a mapping of config keys "
            "(the manifest's 'scheduler' entry); re-export the bundle"
        )
    resolved = dict(defaults)
    for key, value in config.items():
        key = str(key)
        if key in defaults:
            resolved[key] = VALIDATORS[key](key, value)
        elif key in unported:
            problem = UNPORTED_CHECKS[key](key, value, config)
            if problem is not None:
                raise unsupported(name, key, value, problem)
    betas = resolved.get("trained_betas")
    if betas is not None and len(betas) != resolved["num_train_timesteps"]:
        raise InputError(
            f"scheduler config 'trained_betas' has {len(betas)} values but 'num_train_timesteps' "
            f"is {resolved['num_train_timesteps']}; expected one beta per training timestep; {_FIX}"
        )
    return resolved


def unsupported(name: str, key: str, value: Any, expected: str) -> InputError:
    """The error for a config value sampler ``name`` does not port: names key, value and sampler."""
    return InputError(
        f"scheduler config '{key}' is {show(value)}, which the {name} sampler does not support; "
        f"expected {expected}; set it to its default in the model's scheduler_config.json and "
        "re-export, or pick another sampler with --scheduler"
    )


# --------------------------------------------------------------------------------------------
# Noise schedule
# --------------------------------------------------------------------------------------------


def _round_to_f32(exact: Fraction) -> np.float32:
    """Round a rational number to the nearest float32 (ties to even), in one rounding."""
    guess = np.float32(float(exact))
    candidates = (np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf)))
    return min(
        candidates,
        key=lambda c: (abs(Fraction(float(c)) - exact), int(np.asarray(c).view(np.uint32)) & 1),
    )


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` as torch computes it on CPU.

    start, end and the step ``(end - start) / (steps - 1)`` are float32. Point i is
    ``start + step * i`` for i < steps // 2 and ``end - step * (steps - 1 - i)`` above that,
    each evaluated as a fused multiply-add (one rounding), which is what the compiled kernel does.
    """
    lo = np.float32(start)
    hi = np.float32(end)
    if steps == 1:
        return np.array([lo], dtype=np.float32)
    step = (hi - lo) / np.float32(steps - 1)
    out = np.empty(steps, dtype=np.float32)
    half = steps // 2
    exact_step = Fraction(float(step))
    exact_lo, exact_hi = Fraction(float(lo)), Fraction(float(hi))
    # Fast path: the product step*i is exact in float64 (i < 2**29), and so is the sum whenever
    # its error term (Knuth's TwoSum) is zero; then one float64->float32 rounding is correct.
    idx = np.arange(steps, dtype=np.float64)
    prod = np.where(idx < half, float(step) * idx, float(step) * (steps - 1 - idx))
    base = np.where(idx < half, float(lo), float(hi))
    sign = np.where(idx < half, 1.0, -1.0)
    total = base + sign * prod
    virtual = total - base
    err = (base - (total - virtual)) + (sign * prod - virtual)
    out[:] = total.astype(np.float32)
    for i in np.flatnonzero(err != 0.0):
        if i < half:
            out[i] = _round_to_f32(exact_lo + exact_step * int(i))
        else:
            out[i] = _round_to_f32(exact_hi - exact_step * int(steps - 1 - i))
    return out


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the "squaredcos_cap_v2" schedule (Nichol & Dhariwal 2021, eq. 17):
    abar(t) = cos^2(((t + s) / (1 + s)) * pi / 2) with s = 0.008, and
    beta_i = min(1 - abar((i + 1) / T) / abar(i / T), max_beta), computed in float64."""

    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - abar((i + 1) / num_train_timesteps) / abar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return np.asarray(betas, dtype=np.float64).astype(np.float32)


def make_betas(config: Mapping[str, Any]) -> np.ndarray:
    """The float32 beta_1..beta_T of a resolved config."""
    n = config["num_train_timesteps"]
    if config["trained_betas"] is not None:
        return np.asarray(config["trained_betas"], dtype=np.float64).astype(np.float32)
    schedule = config["beta_schedule"]
    if schedule == "linear":
        return torch_linspace_f32(config["beta_start"], config["beta_end"], n)
    if schedule == "scaled_linear":
        # Latent-diffusion schedule: linear in sqrt(beta), then squared (in float32).
        roots = torch_linspace_f32(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n)
        return roots * roots
    return cosine_betas(n)


def alphas_cumprod_from_betas(betas: np.ndarray) -> np.ndarray:
    """abar_t = prod_{s<=t} (1 - beta_s) (DDPM, Ho et al. 2020, eq. 4), float32, each partial
    product accumulated in float64 and rounded to float32 as torch.cumprod does on CPU."""
    alphas = F32_ONE - betas.astype(np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def ve_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """VE noise level sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) of every training timestep,
    in float32 as diffusers computes it (Karras et al. 2022, eq. for VP -> VE)."""
    return np.sqrt((F32_ONE - alphas_cumprod) / alphas_cumprod)


def sigmas_at(timesteps: np.ndarray, train_sigmas: np.ndarray, final_sigmas_type: str) -> np.ndarray:
    """sigma at each (possibly fractional) timestep by linear interpolation in float64, then the final
    sigma -- the smallest training sigma for ``"sigma_min"``, else 0 -- all cast to float32."""
    sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
    last = train_sigmas[0] if final_sigmas_type == "sigma_min" else 0.0
    return np.concatenate([sigmas, [last]]).astype(np.float32)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """The n noise levels of Karras et al. 2022, eq. 5 with rho = 7, from sigma_max down to
    sigma_min: (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho, in float64."""
    rho = 7.0
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of each sigma: linear interpolation in log sigma between
    the two neighbouring training sigmas (``log_train_sigmas``: float32 logs, ascending), float64."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    dists = log_sigma[None, :] - log_train_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_train_sigmas.shape[0] - 2)
    high = low + 1
    lo_log, hi_log = log_train_sigmas[low], log_train_sigmas[high]
    w = np.clip((lo_log - log_sigma) / (lo_log - hi_log), 0, 1)
    return (1 - w) * low + w * high


def step_noise(seed: int, index: int, shape: tuple[int, ...]) -> np.ndarray:
    """The Gaussian noise a stochastic sampler adds at step ``index`` of a run seeded ``seed``:
    numpy PCG64 seeded with (seed, 2, index), so a run reproduces on any machine, whatever the
    order of calls and however often the solver is reset (the resolution switch uses stream 1)."""
    return np.random.default_rng([seed, 2, index]).standard_normal(shape, dtype=np.float32)


def exp_f32(x: np.float32) -> np.float32:
    """float32 exp, correctly rounded in all but vanishingly rare cases (evaluated in float64)."""
    try:
        return np.float32(math.exp(float(x)))
    except OverflowError:
        return np.float32(np.inf)


def log_f32(x: np.float32) -> np.float32:
    """float32 log, correctly rounded in all but vanishingly rare cases; log(0) = -inf."""
    value = float(x)
    if value == 0.0:
        return np.float32(-np.inf)
    if not value > 0.0:
        return np.float32(np.nan)
    return np.float32(math.log(value))


# --------------------------------------------------------------------------------------------
# Array and timestep arguments
# --------------------------------------------------------------------------------------------


def as_f32(array: Any, name: str) -> np.ndarray:
    """``array`` as a float32 numpy array (no copy when it already is one)."""
    arr = np.asarray(array)
    if arr.dtype.kind not in "fiu":
        raise InputError(
            f"scheduler argument '{name}' has dtype {arr.dtype}; expected a real floating array "
            "(float32 preferred); pass the latent as a numpy array"
        )
    return arr.astype(np.float32, copy=False)


def check_same_shape(a: np.ndarray, a_name: str, b: np.ndarray, b_name: str) -> None:
    if a.shape != b.shape:
        raise InputError(
            f"scheduler argument '{a_name}' has shape {list(a.shape)} but '{b_name}' has shape "
            f"{list(b.shape)}; expected the same shape; pass the tensors of one latent"
        )


def f32_pair(a: Any, a_name: str, b: Any, b_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Two array arguments (e.g. model output and sample) as float32 arrays of one shape."""
    a, b = as_f32(a, a_name), as_f32(b, b_name)
    check_same_shape(a, a_name, b, b_name)
    return a, b


def timestep_scalar(timestep: Any) -> np.generic:
    """``timestep`` as a numpy scalar (int or float), or InputError."""
    arr = np.asarray(timestep)
    if arr.size != 1 or arr.dtype.kind not in "fiu":
        raise InputError(
            f"timestep {show(timestep)} is not a single number; expected one value of the "
            "scheduler's timesteps; pass scheduler.timesteps[i]"
        )
    value = arr.reshape(()).item()
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"timestep {value!r} is not finite; pass scheduler.timesteps[i]")
    return arr.reshape(())[()]


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------


class Scheduler(ABC):
    """A deterministic diffusion sampler over numpy float32 arrays.

    Usage mirrors diffusers: ``set_timesteps(n)``, then for each ``t`` in ``timesteps``:
    ``x_in = scale_model_input(x, t)``, run the model on ``x_in``, ``x = step(out, t, x)``.
    The initial latent is ``noise * init_noise_sigma``.

    Step position: every call that needs the position in the schedule (``step``,
    ``scale_model_input``, ``predict_x0``, ``add_noise`` of the sigma-based schedulers) finds it
    from the timestep's value in ``timesteps``. A scheduler also remembers the index it expects
    next; that memory only decides between repeated timestep values, and :meth:`reset` forgets
    it. So after a resolution switch one may ``reset()`` and carry on at any ``timesteps[i]``.
    """

    #: The registry name (``--scheduler``) of :func:`postdiff.runtime.schedulers.make_scheduler`.
    name: ClassVar[str]
    #: The diffusers class this ports (a scheduler_config.json's ``_class_name``).
    diffusers_class: ClassVar[str]
    #: Config keys this scheduler uses, with the defaults of the diffusers class it mirrors.
    DEFAULTS: ClassVar[Mapping[str, Any]]
    #: Keys of the diffusers class that are not ported: they must keep a harmless value.
    UNPORTED: ClassVar[tuple[str, ...]] = ()
    #: Whether ``step`` draws fresh noise (from :func:`step_noise`, seeded by ``seed``).
    stochastic: ClassVar[bool] = False

    timesteps: np.ndarray
    init_noise_sigma: float
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    num_inference_steps: int | None

    def __init__(self, config: Mapping[str, Any] | None = None, seed: int = 0) -> None:
        """Build the scheduler from a manifest's scheduler config (missing keys: defaults).

        ``seed`` seeds the noise of stochastic samplers (Euler Ancestral, LCM); the others ignore it.
        """
        self.config: dict[str, Any] = resolve_config(
            {} if config is None else config, self.DEFAULTS, self.UNPORTED, self.name
        )
        self._check_config()
        self.seed = int(seed)
        #: Noise source of stochastic samplers: (step index, shape) -> float32 array.
        self.noise: Callable[[int, tuple[int, ...]], np.ndarray] = lambda index, shape: step_noise(
            self.seed, index, shape)
        self.num_train_timesteps: int = self.config["num_train_timesteps"]
        self.betas = make_betas(self.config)
        self.alphas_cumprod = alphas_cumprod_from_betas(self.betas)
        if not self.alphas_cumprod[-1] > 0.0:
            source = (
                "trained_betas" if self.config["trained_betas"] is not None
                else f"{self.config['beta_schedule']} betas from {self.config['beta_start']} to "
                f"{self.config['beta_end']}"
            )
            raise InputError(
                f"scheduler config ({source}, {self.num_train_timesteps} training steps) drives "
                f"abar to {show(self.alphas_cumprod[-1])} in float32; expected abar > 0 at every "
                "training timestep; fix the betas"
            )
        self.num_inference_steps = None
        self._next_index: int | None = None

    # -- schedule ------------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose ``num_inference_steps`` timesteps (1..num_train_timesteps) and reset history."""
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, Integral) or not 1 <= int(n) <= self.num_train_timesteps:
            raise InputError(
                f"num_inference_steps is {show(n)}; expected an integer from 1 to "
                f"{self.num_train_timesteps} (the model's num_train_timesteps); pass a step count "
                "in that range"
            )
        timesteps = self._compute_timesteps(int(n))
        if timesteps.size == 0 or timesteps.min() < 0 or timesteps.max() > self.num_train_timesteps - 1:
            raise InputError(
                f"num_inference_steps {n} with timestep_spacing '{self.config.get('timestep_spacing')}'"
                f" and steps_offset {self.config['steps_offset']} gives timesteps outside "
                f"[0, {self.num_train_timesteps - 1}]; expected a schedule inside the trained range; "
                "use fewer steps or steps_offset 0"
            )
        self.timesteps = timesteps
        self.reset()

    def _check_config(self) -> None:
        """Reject ported keys whose value this sampler cannot honour (InputError via unsupported())."""

    def _allowed(self, key: str, choices: Sequence[Any]) -> None:
        if self.config[key] not in choices:
            raise unsupported(self.name, key, self.config[key], "one of " + ", ".join(repr(c) for c in choices))

    @property
    def max_inference_steps(self) -> int:
        """The most ``num_inference_steps`` this sampler accepts."""
        return self.num_train_timesteps

    def num_inference_steps_for(self, count: int) -> int:
        """The ``num_inference_steps`` for which ``set_timesteps`` yields ``count`` timesteps (one
        per model evaluation): ``count`` itself, except for samplers that revisit a timestep."""
        return count

    @abstractmethod
    def _compute_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """Set ``num_inference_steps`` and any per-schedule state; return the timesteps."""

    def reset(self) -> None:
        """Forget multistep history and the remembered step position; keep the timesteps."""
        self._next_index = None

    def _require_timesteps(self, what: str) -> None:
        if self.num_inference_steps is None:
            raise InputError(
                f"{self.name}.{what}() called before set_timesteps(); expected a schedule; "
                "call set_timesteps(num_inference_steps) first"
            )

    def _arrays(self, what: str, a: Any, a_name: str, b: Any, b_name: str) -> tuple[np.ndarray, np.ndarray]:
        """The two array arguments of ``what`` (``step``, ``predict_x0``, ``add_noise``) as float32 arrays
        of one shape, once ``set_timesteps`` has run (InputError naming the argument otherwise)."""
        self._require_timesteps(what)
        return f32_pair(a, a_name, b, b_name)

    def index_for_timestep(self, timestep: Any) -> int:
        """Position of ``timestep`` in ``timesteps`` (see the class docstring)."""
        value = timestep_scalar(timestep)
        matches = np.flatnonzero(self.timesteps == value)
        if matches.size == 0:
            shown = np.array2string(self.timesteps, threshold=12, separator=", ")
            raise InputError(
                f"timestep {show(value)} is not one of this {self.name} scheduler's timesteps "
                f"{shown}; expected a value taken from scheduler.timesteps; pass timesteps[i]"
            )
        if self._next_index is not None and self._next_index in matches:
            return self._next_index
        # A repeated value, no expectation: diffusers starts at the second occurrence.
        return int(matches[1] if matches.size > 1 else matches[0])

    def _train_timestep(self, timestep: Any) -> int:
        """``timestep`` as a training timestep (an integer in [0, num_train_timesteps)), for the samplers
        that take any training timestep, not only one of ``timesteps`` (DDIM, PNDM, LCM)."""
        value = timestep_scalar(timestep)
        if float(value) != int(value) or not 0 <= int(value) < self.num_train_timesteps:
            raise InputError(
                f"timestep {show(value)} is not an integer in [0, {self.num_train_timesteps - 1}]; "
                f"expected a {self.name} timestep; pass scheduler.timesteps[i]"
            )
        return int(value)

    # -- sampling ------------------------------------------------------------------------------

    def scale_model_input(self, sample: np.ndarray, timestep: Any) -> np.ndarray:
        """The model input for ``sample`` at ``timestep`` (identity unless overridden)."""
        return as_f32(sample, "sample")

    @abstractmethod
    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> np.ndarray:
        """Advance ``sample`` from ``timestep`` to the next timestep; returns float32."""

    @abstractmethod
    def predict_x0(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> np.ndarray:
        """The clean-sample estimate the step at ``timestep`` uses (float32)."""

    @abstractmethod
    def add_noise(self, x0: np.ndarray, noise: np.ndarray, timestep: Any) -> np.ndarray:
        """Forward-noise ``x0`` to ``timestep``, in this scheduler's sample space (float32)."""


def vp_add_noise(abar_t: np.float32, x0: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """q(x_t | x0) sample of a variance-preserving schedule at cumulative alpha ``abar_t``:
    sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (DDPM eq. 4), in float32."""
    x0, noise = f32_pair(x0, "x0", noise, "noise")
    return (np.sqrt(abar_t) * x0 + np.sqrt(F32_ONE - abar_t) * noise).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# Multistep solvers in DPM-Solver's notation (DPM-Solver++, UniPC)
# --------------------------------------------------------------------------------------------


def spaced_timesteps(spacing: str, n: int, num_train_timesteps: int, last: int, steps_offset: int) -> np.ndarray:
    """The ``n`` integer timesteps of DPM-Solver's and UniPC's ``timestep_spacing``, highest first,
    over the training range [0, ``last`` - 1] (``last`` < num_train_timesteps when the top is clipped):
    linspace = n + 1 points rounded, highest n kept; leading = multiples of last // (n + 1) plus
    ``steps_offset``; trailing = every num_train_timesteps / n down from ``last``, minus 1."""
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    return np.arange(last, 0, -num_train_timesteps / n).round().copy().astype(np.int64) - 1


class MultistepScheduler(Scheduler):
    """What DPM-Solver(++) and UniPC share: VE sigmas per step, (alpha_t, sigma_t, lambda_t), a history
    of the last ``order`` converted model outputs, and the checks at the start of every step.

    Notation (Lu et al. 2022, "DPM-Solver"): sigma_i = sqrt((1 - abar) / abar) is the
    variance-exploding noise level of step i; alpha_t = 1 / sqrt(1 + sigma^2), sigma_t = sigma alpha_t
    (so x_t = alpha_t x0 + sigma_t eps); lambda_t = log(alpha_t / sigma_t) is the half log-SNR.
    """

    def __init__(self, config: Mapping[str, Any] | None = None, seed: int = 0) -> None:
        super().__init__(config, seed)
        self._train_sigmas = ve_sigmas(self.alphas_cumprod)
        self.sigmas = self._train_sigmas.copy()
        self.init_noise_sigma = 1.0
        n = self.num_train_timesteps
        self.timesteps = np.linspace(0, n - 1, n, dtype=np.float32)[::-1].copy()
        self.order: int = self.config["solver_order"]
        self.reset()

    def reset(self) -> None:
        """Forget the stored model outputs: the next step is first order, like a fresh solver's."""
        super().reset()
        self._model_outputs: list[np.ndarray | None] = [None] * self.order
        self._lower_order_nums = 0
        self._last_index: int | None = None

    @staticmethod
    def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
        """VE sigma -> VP (alpha_t, sigma_t): alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t."""
        alpha_t = F32_ONE / np.sqrt(sigma * sigma + F32_ONE)
        return alpha_t, sigma * alpha_t

    def _lambda(self, index: int) -> tuple[np.float32, np.float32, np.float32]:
        """(alpha_t, sigma_t, lambda_t) of step ``index``; lambda = log(alpha_t) - log(sigma_t)."""
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[index])
        return alpha_t, sigma_t, log_f32(alpha_t) - log_f32(sigma_t)

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

    def _eps(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        """Noise prediction eps_theta at step ``index``."""
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            return model_output.copy()
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[index])
        if kind == "sample":
            # eps = (x_t - alpha_t x0) / sigma_t
            return (sample - alpha_t * model_output) / sigma_t
        # v-prediction: eps = alpha_t v + sigma_t x_t
        return alpha_t * model_output + sigma_t * sample

    def _begin_step(self, model_output: np.ndarray, timestep: Any,
                    sample: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """The checks every step starts with: (model_output, sample) as float32 of one shape, and the
        step's index. A step that is not the one after the previous forgets the history (reset); a
        sample of another shape than the history's (a resolution switch without reset) is refused."""
        model_output, sample = self._arrays("step", model_output, "model_output", sample, "sample")
        index = self.index_for_timestep(timestep)
        if self._last_index is not None and self._last_index != index - 1:
            self.reset()  # the stored outputs are not the previous steps': behave like a fresh solver
        previous = self._model_outputs[-1]
        if previous is not None and previous.shape != sample.shape:
            raise InputError(
                f"{self.name} step got a sample of shape {list(sample.shape)} but its history holds "
                f"shape {list(previous.shape)}; expected the same latent size between steps; call "
                "reset() after a resolution switch"
            )
        return model_output, sample, index

    def _end_step(self, index: int, prev: np.ndarray) -> np.ndarray:
        """Record that step ``index`` ran; returns its result ``prev`` as float32."""
        self._lower_order_nums = min(self._lower_order_nums + 1, self.order)
        self._last_index = index
        self._next_index = index + 1
        return prev.astype(np.float32, copy=False)

    def predict_x0(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> np.ndarray:
        """x0 at ``timestep`` (one of ``timesteps``), with alpha_t, sigma_t from the step's sigma."""
        model_output, sample = self._arrays("predict_x0", model_output, "model_output", sample, "sample")
        x0 = self._x0(model_output, self.index_for_timestep(timestep), sample)
        return x0.astype(np.float32, copy=False)

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, timestep: Any) -> np.ndarray:
        """alpha_t x0 + sigma_t noise at ``timestep`` (one of ``timesteps``), with alpha_t, sigma_t
        from the step's sigma as diffusers' add_noise does; equal to
        sqrt(abar_t) x0 + sqrt(1 - abar_t) noise up to float32 rounding."""
        x0, noise = self._arrays("add_noise", x0, "x0", noise, "noise")
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[self.index_for_timestep(timestep)])
        return (alpha_t * x0 + sigma_t * noise).astype(np.float32, copy=False)
