"""Torch-free numpy ports of the diffusers schedulers the runtime offers.

One file per scheduler, each mirroring one diffusers class (0.42.1) in float32:

* ``ddim``      -- :class:`DDIMScheduler`, ``diffusers.DDIMScheduler`` with eta = 0;
* ``dpmpp-2m``  -- :class:`DPMSolverPP2MScheduler`, ``diffusers.DPMSolverMultistepScheduler``
  with ``algorithm_type="dpmsolver++"``, ``solver_order=2``;
* ``euler``     -- :class:`EulerDiscreteScheduler`, ``diffusers.EulerDiscreteScheduler``.

A model's ``scheduler_config.json`` goes through :func:`normalize_config` once (at export); the
result is stored in the bundle and handed to :func:`make_scheduler` on the device. Any of the
three schedulers can be built from any model's config, as ``Cls.from_config(config)`` does in
diffusers: keys a scheduler does not use are ignored, and keys the config lacks take that
scheduler class's own defaults (so e.g. the default ``timestep_spacing`` differs per scheduler).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from postdiff.errors import InputError
from postdiff.runtime.schedulers.base import VALIDATORS, Scheduler, show
from postdiff.runtime.schedulers.ddim import DDIMScheduler
from postdiff.runtime.schedulers.dpmpp_2m import DPMSolverPP2MScheduler
from postdiff.runtime.schedulers.euler import EulerDiscreteScheduler

__all__ = [
    "CONFIG_KEYS",
    "SCHEDULERS",
    "DDIMScheduler",
    "DPMSolverPP2MScheduler",
    "EulerDiscreteScheduler",
    "Scheduler",
    "make_scheduler",
    "normalize_config",
]

_CLASSES: dict[str, type[Scheduler]] = {
    DDIMScheduler.name: DDIMScheduler,
    DPMSolverPP2MScheduler.name: DPMSolverPP2MScheduler,
    EulerDiscreteScheduler.name: EulerDiscreteScheduler,
}

#: Scheduler names accepted by :func:`make_scheduler`.
SCHEDULERS: tuple[str, ...] = ("ddim", "dpmpp-2m", "euler")

#: The diffusers scheduler-config keys these schedulers honour.
CONFIG_KEYS: frozenset[str] = frozenset(VALIDATORS)


def _must_be_off(key: str, value: Any, config: Mapping[str, Any]) -> str | None:
    return None if value in (None, False) else "false (this feature is not ported)"


def _timestep_type(key: str, value: Any, config: Mapping[str, Any]) -> str | None:
    if value in (None, "discrete"):
        return None
    if value == "continuous" and config.get("prediction_type", "epsilon") != "v_prediction":
        return None  # diffusers treats it as discrete unless the model predicts v
    return "'discrete' (continuous v-prediction timesteps are not ported)"


def _variance_type(key: str, value: Any, config: Mapping[str, Any]) -> str | None:
    if value in ("learned", "learned_range"):
        return "a fixed variance (learned-variance model outputs are not supported)"
    return None


def _anything(key: str, value: Any, config: Mapping[str, Any]) -> str | None:
    return None


# Keys of the three diffusers classes (and of the common SD configs) that we do not keep: each is
# checked to hold a value that changes nothing, then dropped. A check returns None when the value
# is harmless, else a description of what would be.
_DROPPED: dict[str, Callable[[str, Any, Mapping[str, Any]], str | None]] = {
    "thresholding": _must_be_off,
    "rescale_betas_zero_snr": _must_be_off,
    "use_karras_sigmas": _must_be_off,
    "use_exponential_sigmas": _must_be_off,
    "use_beta_sigmas": _must_be_off,
    "use_lu_lambdas": _must_be_off,
    "use_flow_sigmas": _must_be_off,
    "use_dynamic_shifting": _must_be_off,
    "timestep_type": _timestep_type,
    "variance_type": _variance_type,
    # Only used by features above that must be off:
    "dynamic_thresholding_ratio": _anything,
    "sample_max_value": _anything,
    "sigma_min": _anything,
    "sigma_max": _anything,
    "flow_shift": _anything,
    "time_shift_type": _anything,
    # The scheduler name decides these (dpmpp-2m is "dpmsolver++" of order 2):
    "algorithm_type": _anything,
    "solver_order": _anything,
    # PNDM-only:
    "skip_prk_steps": _anything,
}

# solver_type values that diffusers' DPM solver maps to its default "midpoint" (UniPC's names).
_MIDPOINT_ALIASES = ("logrho", "bh1", "bh2")


def normalize_config(diffusers_config: Mapping[str, Any]) -> dict[str, Any]:
    """Reduce a diffusers ``scheduler_config.json`` dict to the keys in :data:`CONFIG_KEYS`.

    Drops bookkeeping keys (``_class_name``, ``_diffusers_version``, ...), keys the three
    schedulers do not use (e.g. PNDM's ``skip_prk_steps``), and feature switches left off.
    Raises InputError, naming the key and value, for a setting that cannot be honoured
    (``thresholding``, ``use_karras_sigmas``, ``rescale_betas_zero_snr`` ... turned on, an
    unknown ``beta_schedule``/``prediction_type``/``timestep_spacing``, ...). The result is
    JSON-serialisable (lists, not arrays) and stable: normalising it again returns it unchanged.
    """
    if not isinstance(diffusers_config, Mapping):
        raise InputError(
            f"scheduler config is a {type(diffusers_config).__name__}; expected the dict of a "
            "diffusers scheduler_config.json; load the file with json.load"
        )
    out: dict[str, Any] = {}
    for key, value in diffusers_config.items():
        key = str(key)
        if key.startswith("_"):
            continue
        if key == "solver_type" and value in _MIDPOINT_ALIASES:
            continue  # diffusers' DPM solver reads these as "midpoint", the default
        if key == "lambda_min_clipped" and isinstance(value, float) and value == -math.inf:
            continue  # the default, and not valid JSON
        if key in VALIDATORS:
            out[key] = VALIDATORS[key](key, value)
        elif key in _DROPPED:
            problem = _DROPPED[key](key, value, diffusers_config)
            if problem is not None:
                raise InputError(
                    f"scheduler config '{key}' is {show(value)}; expected {problem}; set it to its "
                    "default in the model's scheduler_config.json (or choose a model that does "
                    "not need it)"
                )
        # Any other key belongs to another scheduler class: diffusers' from_config ignores it.
    return out


def make_scheduler(name: str, config: Mapping[str, Any]) -> Scheduler:
    """Build scheduler ``name`` (one of :data:`SCHEDULERS`) from a :func:`normalize_config` dict.

    Keys missing from ``config`` take the defaults of the mirrored diffusers class
    (DDIMScheduler / DPMSolverMultistepScheduler / EulerDiscreteScheduler), as
    ``Cls.from_config`` does. Raises InputError for an unknown name, an unknown key or a bad value.
    """
    cls = _CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise InputError(
            f"scheduler {name!r} is not available; expected one of {', '.join(SCHEDULERS)}; "
            "pick one of those names"
        )
    return cls(config)
