"""Torch-free numpy ports of the diffusers schedulers the runtime offers.

One file per scheduler, each mirroring one diffusers class (0.42.1) in float32; :data:`SCHEDULERS`
is the registry (``--scheduler`` name -> class):

* ``ddim``            -- ``DDIMScheduler`` (eta = 0);
* ``pndm``            -- ``PNDMScheduler`` with ``skip_prk_steps`` (PLMS; what SD 1.x ships);
* ``euler``           -- ``EulerDiscreteScheduler`` (Karras sigmas included);
* ``euler-ancestral`` -- ``EulerAncestralDiscreteScheduler`` (seeded noise);
* ``dpm-solver``      -- ``DPMSolverMultistepScheduler`` (orders 1-3, dpmsolver / dpmsolver++, Karras);
* ``unipc``           -- ``UniPCMultistepScheduler``;
* ``lcm``             -- ``LCMScheduler`` (seeded noise).

A bundle's manifest holds the model's scheduler config (normalised by the exporter) and the
diffusers class it ships (``scheduler_class``); :func:`default_scheduler` maps that class to its
port, the sampler ``generate`` uses unless told otherwise. Any scheduler can be built from any
model's config, as ``Cls.from_config(config)`` does in diffusers: keys a scheduler does not use are
ignored, keys the config lacks take that scheduler class's defaults, and a key the scheduler's
diffusers class has but this port does not reproduce is an error for that scheduler only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from postdiff.errors import InputError
from postdiff.runtime.schedulers.base import Scheduler
from postdiff.runtime.schedulers.ddim import DDIMScheduler
from postdiff.runtime.schedulers.dpm_solver import DPMSolverMultistepScheduler
from postdiff.runtime.schedulers.euler import EulerDiscreteScheduler
from postdiff.runtime.schedulers.euler_ancestral import EulerAncestralDiscreteScheduler
from postdiff.runtime.schedulers.lcm import LCMScheduler
from postdiff.runtime.schedulers.pndm import PNDMScheduler
from postdiff.runtime.schedulers.unipc import UniPCMultistepScheduler

__all__ = [
    "SCHEDULERS",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "LCMScheduler",
    "PNDMScheduler",
    "Scheduler",
    "UniPCMultistepScheduler",
    "available_schedulers",
    "default_scheduler",
    "make_scheduler",
]

#: The registry: ``--scheduler`` name -> numpy port, in the order help texts list them.
SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.name: cls
    for cls in (DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
                DPMSolverMultistepScheduler, UniPCMultistepScheduler, LCMScheduler)
}

_BY_CLASS: dict[str, str] = {cls.diffusers_class: name for name, cls in SCHEDULERS.items()}


def supported_classes() -> str:
    """'DDIMScheduler (ddim), PNDMScheduler (pndm), ...' for error messages."""
    return ", ".join(f"{cls.diffusers_class} ({name})" for name, cls in SCHEDULERS.items())


def default_scheduler(diffusers_class: str) -> str:
    """The registry name of the port of ``diffusers_class`` (the class a model ships).

    Raises InputError naming the supported classes when there is no port: never a substitution.
    """
    if diffusers_class in _BY_CLASS:
        return _BY_CLASS[diffusers_class]
    shipped = f"ships {diffusers_class}" if diffusers_class else "records no scheduler class"
    raise InputError(
        f"this bundle's model {shipped}, which postdiff does not port; supported: {supported_classes()}; "
        "choose one with --scheduler NAME"
    )


def make_scheduler(name: str, config: Mapping[str, Any], seed: int = 0) -> Scheduler:
    """Build scheduler ``name`` (a key of :data:`SCHEDULERS`) from a manifest's scheduler config.

    Keys missing from ``config`` take the defaults of the mirrored diffusers class, as
    ``Cls.from_config`` does; ``seed`` seeds the noise of the stochastic samplers. Raises
    InputError for an unknown name, a bad value, or a setting this sampler does not port.
    """
    cls = SCHEDULERS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise InputError(
            f"scheduler {name!r} is not available; expected one of {', '.join(SCHEDULERS)}; "
            "pick one of those names"
        )
    return cls(config, seed)


def available_schedulers(config: Mapping[str, Any]) -> list[str]:
    """The registry names that can be built from ``config`` (the others refuse one of its settings)."""
    names = []
    for name in SCHEDULERS:
        try:
            make_scheduler(name, config)
        except InputError:
            continue
        names.append(name)
    return names
