"""Building schedules from the PostDiff knobs (the `postdiff schedule` flags and the tuner).

The rules follow DESIGN §1: mixed-resolution stages first; the cross-attention gate m is counted
as T-GATE counts its ``gate_step``: steps 0 … m−1 run with guidance, step m−1 writes the attn2
outputs, steps m … read them with guidance off, and a resolution switch after the gate re-writes
them (the maps are spatial); DeepCache writes its feature every k-th step (or on a non-uniform
pattern packed around a centre step) and additionally wherever a cached feature would be stale
(new scale, guidance turned off) or an xattn write needs the deep layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np

from postdiff.errors import ScheduleError
from postdiff.runtime.names import NONE, READ, WRITE
from postdiff.runtime.schedule import AUTO_PRECISION, FORMAT_VERSION, XATTN_MODES, Schedule, Step, validate

#: Where a schedule runs bf16 (``--bf16``); every other step is pinned to fp32 once any step is bf16.
#: ``none``: no step pinned (each runs at the run's --precision); ``all``: every step; ``low-res``: the
#: steps below full resolution (and the x̂0 evaluation of the switch, which belongs to them);
#: ``early``: all but the last quarter of the steps (the final detail at fp32); ``reads``: the DeepCache
#: read (shallow) steps.
BF16_POLICIES = ("none", "all", "low-res", "early", "reads")


@dataclass(frozen=True)
class ScheduleKnobs:
    """Every setting a schedule is built from."""

    steps: int = 20
    low_res: tuple[tuple[float, int], ...] = ()  # (scale, number of steps) stages before full resolution
    deepcache_interval: int = 1  # k; 1 = DeepCache off
    deepcache_branch: int = 0
    deepcache_nonuniform: tuple[int, float] | None = None  # (centre step c, power p)
    xattn_gate: int | None = None  # T-GATE's gate_step m: m guided steps, maps written at step m-1
    xattn_mode: str = "cond"
    # False: no step runs classifier-free guidance (models that take the guidance scale as an
    # embedding, LCM: one conditional evaluation per step, batch 1)
    cfg: bool = True
    bf16: str = "none"  # one of BF16_POLICIES: which steps run at bf16 (the others then pin fp32)


def build_schedule(knobs: ScheduleKnobs, name: str, description: str = "") -> Schedule:
    """Turn ``knobs`` into a validated schedule (ScheduleError naming the bad knob otherwise)."""
    _check_knobs(knobs)
    scales = [scale for scale, count in knobs.low_res for _ in range(count)]
    scales += [1.0] * (knobs.steps - len(scales))
    gate = knobs.xattn_gate
    refresh_at = _refresh_steps(knobs)
    steps: list[Step] = []
    last_write = None
    for i, scale in enumerate(scales):
        switch = i > 0 and scale != scales[i - 1]
        cfg = knobs.cfg and (gate is None or i < gate)
        if gate is None or i < gate - 1:
            xattn = NONE
        elif i == gate - 1 or switch:
            xattn = WRITE  # the last guided step, and a re-write after a switch (the maps are spatial)
        else:
            xattn = READ
        deep = NONE
        if knobs.deepcache_interval > 1:
            # forced: nothing cached yet, a new scale, the deep layers needed for an xattn write, or
            # the first step without guidance (batch 2 -> 1: the batch-2 feature no longer fits)
            forced = last_write is None or switch or xattn == WRITE or (gate is not None and i == gate)
            if forced or (i in refresh_at if refresh_at is not None
                          else i - last_write >= knobs.deepcache_interval):
                deep, last_write = WRITE, i
            else:
                deep = READ
        steps.append(Step(scale=scale, cfg=cfg, deep=deep, branch=knobs.deepcache_branch if deep != NONE else 0,
                          xattn=xattn, switch=switch, precision=_precision(knobs, i, scale, deep)))
    schedule = Schedule(format_version=FORMAT_VERSION, name=name, steps=tuple(steps), xattn_mode=knobs.xattn_mode,
                        description=description)
    validate(schedule)
    return schedule


def _precision(knobs: ScheduleKnobs, index: int, scale: float, deep: str) -> str:
    """Step ``index``'s precision under ``knobs.bf16`` (see BF16_POLICIES)."""
    if knobs.bf16 == "none":
        return AUTO_PRECISION
    low = {"all": True, "low-res": scale < 1.0, "early": index < knobs.steps - knobs.steps // 4,
           "reads": deep == READ}[knobs.bf16]
    return "bf16" if low else "fp32"


def _refresh_steps(knobs: ScheduleKnobs) -> set[int] | None:
    """Steps where non-uniform DeepCache writes its feature by its own pattern (forced writes come on
    top); None for the uniform pattern, which writes k steps after the previous write."""
    k, total = knobs.deepcache_interval, knobs.steps
    if knobs.deepcache_nonuniform is None:
        return None
    centre, power = knobs.deepcache_nonuniform
    count = math.ceil(total / k)
    # Non-uniform DeepCache: write (refresh) points x_j = c + sign(u_j)|u_j|^p for u_j evenly spaced between
    # -c^(1/p) and (T-1-c)^(1/p): with p > 1 they crowd around the centre step c.
    low, high = -(centre ** (1 / power)), (total - 1 - centre) ** (1 / power)
    u = np.linspace(low, high, count)
    points = np.rint(centre + np.sign(u) * np.abs(u) ** power).astype(int)
    return {0, *(int(p) for p in points if 0 <= p < total)}


def _check_knobs(knobs: ScheduleKnobs) -> None:
    if knobs.steps <= 0:
        raise ScheduleError(f"--steps {knobs.steps} is not positive; use at least 1")
    low_total = sum(count for _, count in knobs.low_res)
    if low_total >= knobs.steps:
        raise ScheduleError(f"--low-res stages take {low_total} of {knobs.steps} steps; at least the last step "
                            "must run at full resolution: lower the stage counts or raise --steps")
    previous = 0.0
    for scale, count in knobs.low_res:
        if not 0.0 < scale < 1.0 or scale <= previous:
            raise ScheduleError(f"--low-res scale {scale} must be in (0, 1) and larger than the previous stage's "
                                f"({previous:g}), e.g. --low-res 0.5:6 0.75:4")
        if count <= 0:
            raise ScheduleError(f"--low-res {scale}:{count}: the step count must be positive")
        previous = scale
    if knobs.deepcache_interval < 1:
        raise ScheduleError(f"--deepcache-interval {knobs.deepcache_interval} must be at least 1 (1 = off)")
    if knobs.deepcache_branch < 0:
        raise ScheduleError(f"--deepcache-branch {knobs.deepcache_branch} must be 0 or more")
    if knobs.deepcache_nonuniform is not None:
        centre, power = knobs.deepcache_nonuniform
        if not 0 <= centre < knobs.steps or power < 1.0:
            raise ScheduleError(f"--deepcache-nonuniform {centre},{power}: the centre must be a step index in "
                                f"[0, {knobs.steps}) and the power at least 1")
    if knobs.xattn_gate is not None and not 1 <= knobs.xattn_gate <= knobs.steps - 1:
        raise ScheduleError(f"--xattn-gate {knobs.xattn_gate} must be in [1, {knobs.steps - 1}]: it counts the guided "
                            "steps (T-GATE's gate_step), at least one to write the maps and at least one step "
                            "after it to read them")
    if knobs.xattn_mode not in XATTN_MODES:
        raise ScheduleError(f"--xattn-mode '{knobs.xattn_mode}' is not one of {list(XATTN_MODES)}")
    if knobs.bf16 not in BF16_POLICIES:
        raise ScheduleError(f"--bf16 '{knobs.bf16}' is not one of {list(BF16_POLICIES)}")


def knobs_from_flags(preset: str | None = None, steps: int | None = None, low_res: list[str] | None = None,
                     deepcache_interval: int | None = None, deepcache_branch: int | None = None,
                     deepcache_nonuniform: str | None = None, xattn_gate: int | None = None,
                     xattn_mode: str | None = None, guidance_embedding: bool = False,
                     bf16: str | None = None) -> tuple[ScheduleKnobs, str, str]:
    """Knobs from `postdiff schedule` flags, starting from ``preset``'s when given.

    Returns:
        (knobs, name, description); the name and description are the preset's, or "custom".
    """
    from postdiff.profiles.presets import PRESETS  # data, imported lazily

    if preset is not None and preset not in PRESETS:
        raise ScheduleError(f"--preset '{preset}' is unknown; presets: {', '.join(sorted(PRESETS))}")
    knobs, description = PRESETS[preset] if preset else (ScheduleKnobs(), "")
    changes: dict[str, object] = {}
    if steps is not None:
        changes["steps"] = steps
    if low_res is not None:
        changes["low_res"] = tuple(_parse_stage(text) for text in low_res)
    if deepcache_interval is not None:
        changes["deepcache_interval"] = deepcache_interval
    if deepcache_branch is not None:
        changes["deepcache_branch"] = deepcache_branch
    if deepcache_nonuniform is not None:
        changes["deepcache_nonuniform"] = _parse_pair(deepcache_nonuniform)
    if xattn_gate is not None:
        changes["xattn_gate"] = xattn_gate
    if xattn_mode is not None:
        changes["xattn_mode"] = xattn_mode
    if guidance_embedding and knobs.cfg:
        changes["cfg"] = False
    if bf16 is not None and bf16 != knobs.bf16:
        changes["bf16"] = bf16
    if changes:
        description = f"{preset} with {', '.join(f'{k}={v}' for k, v in changes.items())}" if preset else ""
    return replace(knobs, **changes), (preset if preset and not changes else "custom"), description


def _parse_stage(text: str) -> tuple[float, int]:
    try:
        scale, count = text.split(":")
        return float(Fraction(scale)), int(count)
    except ValueError:
        raise ScheduleError(f"--low-res '{text}' is not SCALE:STEPS, e.g. 0.5:10 or 3/4:4") from None


def _parse_pair(text: str) -> tuple[int, float]:
    try:
        centre, power = text.split(",")
        return int(centre), float(power)
    except ValueError:
        raise ScheduleError(f"--deepcache-nonuniform '{text}' is not C,P (centre step, power), e.g. 10,1.4") from None
