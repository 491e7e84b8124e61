"""The tuner's candidate space: which schedules `postdiff tune` compares (data; no torch).

PostDiff's question (DESIGN §1) is whether, at a fixed latency budget, it is better to run *fewer
denoising steps* or to keep the steps and make *each step cheaper*. The candidates therefore come
in two families:

``fewer steps``
    Plain schedules (full resolution, guidance on, no caching) with T in {4, 6, 8, 10, 12, 15, 20}
    (scaled proportionally when the full step count is not 20). T = 20 is the baseline every
    fidelity figure is measured against.

``cheaper steps``
    Schedules that keep T (20, and also 15 = 3/4 of it) and pull PostDiff's three per-step levers:

    ============  =============================================================================
    lever         options
    ============  =============================================================================
    low-res       none; 0.5:5; 0.5:10; 0.75:10; 0.5:5 + 0.75:5  (scale:steps stages)
    DeepCache     off; k=2 branch 0; k=2 branch 1; k=3 branch 1; non-uniform (c=10, p=1.4) k=3 b1
    xattn gate    none; m=5 Cond; m=10 Cond; m=5 Ave
    ============  =============================================================================

    Step counts, gate steps and the non-uniform centre scale with T (half up: 5 -> 4 and
    10 -> 8 at T = 15).

Structural pruning (before any profile is read). All 5 x 5 x 4 = 100 combinations per T would
mostly be near-duplicates; the space is instead "one knob at a time" around two anchors:

* around the **baseline** (every lever off): each lever alone through all its options
  (4 + 4 + 3 = 11 candidates at T = 20). They answer "what does this lever alone cost and buy";
* around **the paper's preset** (low-res 0.5:10, DeepCache k=2 branch 1, gate m=5 Cond): the
  preset itself and each lever moved through all its other options, including off, while the
  other two stay at the preset (1 + 4 + 4 + 3 = 12 candidates), at T = 20 and again at T = 15
  (scaled). Moving a lever to "off" gives the two-lever pairs of the preset; moving it to a more
  aggressive option gives the cheapest three-lever schedules, which reach the low budgets.

That is 7 + 11 + 12 + 12 = 42 candidates for T = 20.

Precision (``candidates(..., precision=True)``, ``postdiff tune --precision-space``) is a fourth lever,
off (``fp32``, every step at the run's precision, which the tuner sets to fp32) by default:

    ============  =============================================================================
    precision     fp32; bf16 on every step; bf16 below full resolution; bf16 on all but the last
                  quarter of the steps; bf16 on the DeepCache reads (profiles.schedule_builder.BF16_POLICIES)
    ============  =============================================================================

It moves through its options around both anchors like the other levers (an option that pins no step
to bf16 at that anchor -- low-res or reads where the anchor has none -- is left out), and bf16 on
every step is also added to each fewer-steps T, so that the frontier can be compared with and without
precision: 42 + 2 (baseline anchor: all, early) + 4 + 4 (paper at T = 20 and 15) + 6 (the other
fewer-steps T at bf16; T = 20 at bf16 is the baseline anchor's) = 58 candidates for T = 20. Those candidates are ``cheaper steps`` (a lever is on).

Models that take the guidance scale as an embedding (LCM) run no classifier-free guidance: their
space is the same construction with ``cfg=False`` on every step and ``steps_full`` =
:data:`LCM_STEPS_FULL` = 8, so the ``fewer steps`` family spans 2-8 steps and the ``cheaper steps``
family keeps 8 and 6 steps (levers scaled as above: low-res 0.5:4, DeepCache k=2 branch 1, gate
m=2 ...). Each lever still means what it means with guidance: the gate captures the
cross-attention maps of its step and later steps replay them.

Dominance pruning (:func:`prune_dominated`, once predicted latencies are known). Every lever is an
approximation: switching one more on can only move the images further from the baseline's, so it
is worth it only if it buys speed. Candidate A is *nested over* candidate B when both are in the
same family and at the same T, and A sets every lever B sets, to the same option, plus at least one
more. A is dropped when it is predicted no faster than such a B (within ``min_gain``, default 2 %):
it pays an extra approximation for (almost) nothing. This compares only schedules that differ by
added approximations -- not, say, "low-res alone" with "DeepCache + gate", whose fidelities are
not ordered -- so it removes candidates that are dominated on the device, never ones that merely
look slow. Lever sets are compared as sets of (lever, option) pairs, so a lever set to a different
option is not nested. The ``fewer steps`` family is never pruned: it is the reference curve.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from postdiff.errors import ScheduleError
from postdiff.runtime.schedule import Schedule, latent_size
from postdiff.profiles.schedule_builder import ScheduleKnobs, build_schedule

FEWER = "fewer steps"
CHEAPER = "cheaper steps"
FAMILIES = (FEWER, CHEAPER)
REFERENCE_STEPS = 20  # the step indices and counts below are written for a 20-step schedule
#: The baseline step count of the space for models that embed the guidance scale (LCM: 2-8 steps).
LCM_STEPS_FULL = 8

#: Step counts of the ``fewer steps`` family for a 20-step baseline.
FEWER_STEPS = (4, 6, 8, 10, 12, 15, 20)
#: Step counts of the ``cheaper steps`` family, as fractions of the baseline's.
CHEAPER_FRACTIONS = (1.0, 0.75)

# Lever options, written for T = 20; ``_scaled`` maps step indices and counts to other T.
# low-res: stages (scale, steps)
LOW_RES: dict[str, tuple[tuple[float, int], ...]] = {
    "none": (), "0.5:5": ((0.5, 5),), "0.5:10": ((0.5, 10),), "0.75:10": ((0.75, 10),),
    "0.5:5,0.75:5": ((0.5, 5), (0.75, 5)),
}
# DeepCache: (interval k, branch, non-uniform (centre, power) or None)
DEEPCACHE: dict[str, tuple[int, int, tuple[int, float] | None]] = {
    "off": (1, 0, None), "k2b0": (2, 0, None), "k2b1": (2, 1, None), "k3b1": (3, 1, None),
    "k3b1nu10,1.4": (3, 1, (10, 1.4)),
}
# cross-attention gate: (gate step m or None, mode)
XATTN: dict[str, tuple[int | None, str]] = {
    "none": (None, "cond"), "m5cond": (5, "cond"), "m10cond": (10, "cond"), "m5ave": (5, "ave"),
}
# precision: the steps pinned to bf16 (profiles.schedule_builder.BF16_POLICIES; "fp32" = "none": none)
PRECISION: dict[str, str] = {"fp32": "none", "bf16": "all", "bf16-lowres": "low-res", "bf16-early": "early",
                             "bf16-reads": "reads"}
LEVERS = ("low_res", "deepcache", "xattn", "precision")
OPTIONS: dict[str, Mapping[str, object]] = {"low_res": LOW_RES, "deepcache": DEEPCACHE, "xattn": XATTN,
                                            "precision": PRECISION}
OFF = {"low_res": "none", "deepcache": "off", "xattn": "none", "precision": "fp32"}
#: The paper's SD 1.5 setting (DESIGN §1), the second anchor of the space.
PAPER = {"low_res": "0.5:10", "deepcache": "k2b1", "xattn": "m5cond"}  # precision: off (fp32)
#: How much faster an extra lever must make a schedule to be worth its approximation.
MIN_GAIN = 0.02


@dataclass(frozen=True)
class Candidate:
    """One schedule the tuner may pick."""

    name: str
    family: str  # one of FAMILIES
    steps: int
    levers: tuple[tuple[str, str], ...]  # (lever, option) for every lever that is not off
    knobs: ScheduleKnobs

    def nested_over(self, other: Candidate) -> bool:
        """True when ``self`` is ``other`` plus at least one more lever (same family and T)."""
        return (self.family == other.family and self.steps == other.steps
                and set(other.levers) < set(self.levers))


def _scaled(index: int, steps: int) -> int:
    """A step index or count written for a REFERENCE_STEPS-step schedule, at ``steps`` steps (half up)."""
    return max(1, int(index * steps / REFERENCE_STEPS + 0.5))


def _knobs(steps: int, levers: Mapping[str, str], cfg: bool = True) -> ScheduleKnobs:
    low = tuple((scale, _scaled(count, steps)) for scale, count in LOW_RES[levers["low_res"]])
    interval, branch, nonuniform = DEEPCACHE[levers["deepcache"]]
    if nonuniform is not None:
        nonuniform = (_scaled(nonuniform[0], steps), nonuniform[1])
    gate, mode = XATTN[levers["xattn"]]
    return ScheduleKnobs(steps=steps, low_res=low, deepcache_interval=interval, deepcache_branch=branch,
                         deepcache_nonuniform=nonuniform,
                         xattn_gate=None if gate is None else _scaled(gate, steps), xattn_mode=mode, cfg=cfg,
                         bf16=PRECISION[levers.get("precision", "fp32")])


def _name(knobs: ScheduleKnobs) -> str:
    """A short name that spells out the knobs as built, e.g. ``t15-lr0.5:8-dck2b1-g4cond``."""
    parts = [f"t{knobs.steps}"]
    if knobs.low_res:
        parts.append("lr" + ",".join(f"{scale:g}:{count}" for scale, count in knobs.low_res))
    if knobs.deepcache_interval > 1:
        nonuniform = knobs.deepcache_nonuniform
        parts.append(f"dck{knobs.deepcache_interval}b{knobs.deepcache_branch}"
                     + (f"nu{nonuniform[0]},{nonuniform[1]:g}" if nonuniform else ""))
    if knobs.xattn_gate is not None:
        parts.append(f"g{knobs.xattn_gate}{knobs.xattn_mode}")
    if knobs.bf16 != "none":
        parts.append(f"bf16{'' if knobs.bf16 == 'all' else knobs.bf16}")
    return "-".join(parts)


def candidates(steps_full: int = 20, cfg: bool = True, precision: bool = False) -> list[Candidate]:
    """Every candidate of the space (see the module docstring), baseline first; with ``cfg`` False
    no step runs classifier-free guidance (models that embed the guidance scale, LCM); with
    ``precision`` the precision lever too (bf16 steps: OpenVINO on a CPU with native bfloat16).

    Names spell out the knobs as built (``t15-lr0.5:8-dck2b1-g4cond`` is the paper's preset scaled
    to 15 steps); ``levers`` keep the option names written for T = 20.

    Raises:
        ScheduleError: ``steps_full`` below 8 (too few steps to place the levers).
    """
    if steps_full < 8:
        raise ScheduleError(f"steps_full {steps_full} is too small for the tuning space; expected at least 8 "
                            "(20 is the paper's setting)")
    found: dict[str, Candidate] = {}

    levers_in_use = LEVERS if precision else tuple(lever for lever in LEVERS if lever != "precision")

    def add(steps: int, levers: Mapping[str, str]) -> None:
        knobs = _knobs(steps, levers, cfg)
        name = _name(knobs)
        if name in found:
            return
        if knobs.bf16 != "none" and "bf16" not in build_schedule(knobs, name).precisions:
            return  # a bf16 option with no step to apply to here (low-res or reads without them)
        on = tuple((lever, levers[lever]) for lever in LEVERS if levers.get(lever, OFF[lever]) != OFF[lever])
        found[name] = Candidate(name=name, family=CHEAPER if on else FEWER, steps=steps, levers=on, knobs=knobs)

    add(steps_full, OFF)  # the baseline
    fewer = sorted({_scaled(t, steps_full) for t in FEWER_STEPS}, reverse=True)
    for steps in fewer:
        add(steps, OFF)
    for fraction in CHEAPER_FRACTIONS:
        steps = _scaled(int(fraction * REFERENCE_STEPS), steps_full)
        anchors = [OFF, PAPER] if fraction == 1.0 else [PAPER]
        for anchor in anchors:
            add(steps, anchor)
            for lever in levers_in_use:
                for option in OPTIONS[lever]:
                    add(steps, {**anchor, lever: option})
    if precision:  # the fewer-steps curve again at bf16: does precision move it?
        for steps in fewer:
            add(steps, {**OFF, "precision": "bf16"})
    return list(found.values())




def build(candidate: Candidate) -> Schedule:
    """The validated schedule of ``candidate`` (its name is the candidate's)."""
    description = (f"postdiff tune candidate ({candidate.family}): {candidate.steps} steps"
                   + "".join(f", {lever} {option}" for lever, option in candidate.levers))
    return build_schedule(candidate.knobs, candidate.name, description)


def on_grid(schedule: Schedule, latent: tuple[int, int], multiple: int) -> bool:
    """Whether every scale of ``schedule`` gives a latent on a model's grid."""
    try:
        for scale in schedule.scales:
            latent_size(latent, scale, multiple)
    except ScheduleError:
        return False
    return True


def tuning_schedules(steps_full: int = 20, latent: tuple[int, int] | None = None,
                     multiple: int | None = None, cfg: bool = True, precision: bool = False) -> list[Schedule]:
    """Every candidate built (what ``postdiff export --tuning-space`` exports the variants of).

    With ``latent`` and ``multiple`` (a model's full latent size and grid), candidates whose
    low-resolution scales are off that grid are left out rather than failing the export.
    """
    schedules = [build(c) for c in candidates(steps_full, cfg, precision)]
    if latent is not None and multiple is not None:
        schedules = [s for s in schedules if on_grid(s, latent, multiple)]
    return schedules


def prune_dominated(pool: Sequence[Candidate], predicted_ms: Mapping[str, float],
                    min_gain: float = MIN_GAIN) -> tuple[list[Candidate], dict[str, str]]:
    """Drop candidates an added lever does not make faster (see the module docstring).

    Args:
        pool: candidates, each with a prediction in ``predicted_ms`` (by name).
        min_gain: the fraction by which an extra lever must cut the predicted latency.

    Returns:
        (kept candidates in their input order, {dropped name: name of the candidate dominating it}).
    """
    dropped: dict[str, str] = {}
    for a in pool:
        for b in pool:
            # a = b + more approximations, yet predicted no faster than (1 - min_gain) of b.
            if a.nested_over(b) and predicted_ms[a.name] >= (1.0 - min_gain) * predicted_ms[b.name]:
                dropped[a.name] = b.name
                break
    return [c for c in pool if c.name not in dropped], dropped
