"""A model's ``scheduler_config.json`` -> what the bundle's manifest records about its sampler.

The exporter keeps the model's scheduler configuration as diffusers wrote it, minus bookkeeping,
in a form JSON can hold, plus the diffusers class it ships (``_class_name``): the runtime then
builds any of its samplers from it (``Cls.from_config`` semantics) and validates there, per
sampler, what that sampler uses. Nothing is dropped here because some sampler cannot honour it:
``use_karras_sigmas: true`` is fine for DDIM and an error only for a sampler that has the key but
does not port it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral, Real
from typing import Any

import numpy as np

from postdiff.errors import ModelSourceError

# Keys whose value at its diffusers default cannot be written as strict JSON: dropped, the
# runtime's per-sampler defaults restore them.
_NON_JSON_DEFAULTS = {"lambda_min_clipped": -math.inf}


def _json_value(key: str, value: Any) -> Any:
    """``value`` as plain JSON data (numpy arrays and scalars become lists and numbers)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real):
        if not math.isfinite(float(value)):
            raise ModelSourceError(
                f"scheduler config '{key}' is {value!r}; expected a finite number (JSON cannot hold it); "
                "fix the model's scheduler_config.json"
            )
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_json_value(key, v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_value(key, v) for k, v in value.items()}
    raise ModelSourceError(
        f"scheduler config '{key}' holds a {type(value).__name__}; expected JSON data (numbers, "
        "strings, lists); fix the model's scheduler_config.json"
    )


def normalize_config(diffusers_config: Mapping[str, Any]) -> dict[str, Any]:
    """The scheduler config a manifest records: every key of ``scheduler_config.json`` except the
    bookkeeping ones (``_class_name``, ``_diffusers_version``, ...), values as plain JSON, keys
    sorted. Stable: normalising the result again returns it unchanged.

    Raises ModelSourceError for a config that is not a mapping or holds non-JSON values.
    """
    if not isinstance(diffusers_config, Mapping):
        raise ModelSourceError(
            f"scheduler config is a {type(diffusers_config).__name__}; expected the dict of a "
            "diffusers scheduler_config.json; load the file with json.load"
        )
    out: dict[str, Any] = {}
    for key, value in sorted(diffusers_config.items(), key=lambda kv: str(kv[0])):
        key = str(key)
        if key.startswith("_"):
            continue
        if key in _NON_JSON_DEFAULTS and value == _NON_JSON_DEFAULTS[key]:
            continue
        out[key] = _json_value(key, value)
    return out


def scheduler_class(diffusers_config: Mapping[str, Any]) -> str:
    """The diffusers class the model ships (its ``_class_name``; "" when the config names none)."""
    name = diffusers_config.get("_class_name", "") if isinstance(diffusers_config, Mapping) else ""
    return name if isinstance(name, str) else ""
