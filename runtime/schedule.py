"""Static denoising schedules: what runs at every step, decided before generation starts.

A schedule is data (JSON, ``format_version`` 2). Each step says at which latent scale it runs,
whether classifier-free guidance is on (batch 2) or off (batch 1, conditional half only), and what
it does with the two caches of PostDiff's hybrid module caching (DESIGN §1, docs/cache-roles.md).
Both caches use one vocabulary, the role of the step's graph in the cache's dataflow:

- ``deep``: DeepCache feature reuse. ``write`` runs the full UNet and keeps the feature entering
  up-layer ``branch`` (DeepCache's full/refresh step); ``read`` runs only the shallow layers fed
  that feature (DeepCache's cached step); ``none`` runs the plain full UNet.
- ``xattn``: cross-attention output caching. ``write`` computes every attn2 module and keeps its
  output (the conditional half, or the mean of both halves, per ``xattn_mode``): T-GATE's step
  ``gate_step - 1``; ``read`` feeds the kept outputs instead of computing cross-attention (guidance
  must be off).

A step whose scale differs from the previous step's is a resolution switch (``switch: true``):
the clean sample x̂0 is predicted from the previous resolution's state with a model evaluation at
this step's timestep, upsampled bilinearly and re-noised to the same timestep (DESIGN §1).

Timesteps are not stored: they follow from the scheduler chosen at generation time (DDIM, DPM++
and Euler place them differently); step ``i`` runs at the scheduler's ``i``-th timestep.

Format history: version 1 (postdiff 0.1) named the actions refresh/reuse and capture/reuse and its
builder counted the cross-attention gate one step later than T-GATE's ``gate_step``; version-1
files are refused with a message saying how to rebuild them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from postdiff.errors import ScheduleError
from postdiff.runtime.jsonio import OMIT_DEFAULT, load_versioned
from postdiff.runtime.names import CACHE_ROLES

FORMAT_VERSION = 2
#: What a cross-attention write keeps of a guided batch: the conditional half (PostDiff's "Cond")
#: or the mean of both halves (T-GATE's "Ave").
XATTN_MODES = ("cond", "ave")
#: A step's inference precision: ``auto`` follows the run's ``--precision``; ``fp32`` and ``bf16`` pin
#: it for that step (bf16 runs on OpenVINO only, where the CPU has native bfloat16).
AUTO_PRECISION = "auto"
STEP_PRECISIONS = (AUTO_PRECISION, "fp32", "bf16")


@dataclass(frozen=True)
class Step:
    """One denoising step."""

    scale: float = 1.0  # latent side length relative to the bundle's full resolution
    cfg: bool = True  # classifier-free guidance: batch 2 when on, batch 1 (conditional) when off
    deep: str = "none"  # DeepCache role of this step's graph, one of CACHE_ROLES
    branch: int = 0  # DeepCache branch (DeepCache's cache_branch_id, 0 = shallowest) for write/read
    xattn: str = "none"  # cross-attention cache role, one of CACHE_ROLES
    switch: bool = False  # first step at a new scale: x̂0 -> upsample -> re-noise before it runs
    # Inference precision of this step's UNet evaluation, one of STEP_PRECISIONS. Added to format 2
    # after files of it existed: left out of the JSON while "auto", so those files stay byte for byte.
    precision: str = field(default=AUTO_PRECISION, metadata={OMIT_DEFAULT: True})


@dataclass(frozen=True)
class Schedule:
    """A whole denoising schedule."""

    format_version: int
    name: str
    steps: tuple[Step, ...]
    xattn_mode: str = "cond"  # what an xattn write keeps of a guided batch, one of XATTN_MODES
    description: str = ""

    @property
    def scales(self) -> tuple[float, ...]:
        """The distinct scales in order of use."""
        seen: list[float] = []
        for step in self.steps:
            if not seen or seen[-1] != step.scale:
                seen.append(step.scale)
        return tuple(seen)

    @property
    def precisions(self) -> tuple[str, ...]:
        """The distinct step precisions in order of use (``("auto",)`` for a schedule that pins none)."""
        return tuple(dict.fromkeys(step.precision for step in self.steps))


def load_schedule(path: Path) -> Schedule:
    """Read and validate a schedule JSON file (ScheduleError on any problem)."""
    schedule = load_versioned(Schedule, path, FORMAT_VERSION, ScheduleError,
                              "version 1 counted --xattn-gate one step later than T-GATE's gate_step and "
                              "named the cache actions refresh/reuse, capture/reuse; rebuild the file with "
                              "`postdiff schedule` from this postdiff (--xattn-gate M now means M guided steps)")
    validate(schedule)
    return schedule


def validate(schedule: Schedule) -> None:
    """Check that ``schedule`` is executable on its own terms (no bundle needed).

    Raises:
        ScheduleError: naming the first offending step, what is wrong and how to fix it.
    """
    if not schedule.steps:
        raise ScheduleError(f"schedule '{schedule.name}' has no steps; it needs at least one")
    if schedule.xattn_mode not in XATTN_MODES:
        raise ScheduleError(f"xattn_mode '{schedule.xattn_mode}' is not one of {list(XATTN_MODES)}")
    if schedule.steps[-1].scale != 1.0:
        raise ScheduleError(
            f"schedule '{schedule.name}' ends at scale {schedule.steps[-1].scale}; the last step must run at "
            "full resolution (scale 1.0) so the decoder gets a full-size latent"
        )
    deep_cache: tuple[float, bool, int] | None = None  # (scale, cfg, branch) of the stored feature
    xattn_scale: float | None = None  # scale of the stored attn2 outputs
    previous: Step | None = None
    for index, step in enumerate(schedule.steps):
        where = f"schedule '{schedule.name}' step {index}"
        _check_fields(step, where)
        changed_scale = previous is not None and step.scale != previous.scale
        if previous is not None and step.scale < previous.scale:
            raise ScheduleError(f"{where}: scale goes down from {previous.scale} to {step.scale}; "
                                "scales may only increase (low resolution first)")
        if step.switch != changed_scale:
            raise ScheduleError(
                f"{where}: switch is {step.switch} but the scale {'changes' if changed_scale else 'does not change'} "
                f"here; set switch true exactly on the first step at a new scale"
            )
        if changed_scale or (previous is not None and step.cfg != previous.cfg):
            deep_cache = None  # spatial size or batch changed: the feature is stale
        if changed_scale:
            xattn_scale = None if step.xattn != "write" else xattn_scale
        deep_cache = _check_deep(step, deep_cache, where, schedule.name)
        xattn_scale = _check_xattn(step, xattn_scale, where)
        previous = step


def _check_fields(step: Step, where: str) -> None:
    if not 0.0 < step.scale <= 1.0:
        raise ScheduleError(f"{where}: scale {step.scale} is outside (0, 1]")
    if step.deep not in CACHE_ROLES:
        raise ScheduleError(f"{where}: deep '{step.deep}' is not one of {list(CACHE_ROLES)}")
    if step.xattn not in CACHE_ROLES:
        raise ScheduleError(f"{where}: xattn '{step.xattn}' is not one of {list(CACHE_ROLES)}")
    if step.branch < 0:
        raise ScheduleError(f"{where}: branch {step.branch} is negative")
    if step.precision not in STEP_PRECISIONS:
        raise ScheduleError(f"{where}: precision '{step.precision}' is not one of {list(STEP_PRECISIONS)}")


def _check_deep(step: Step, cache: tuple[float, bool, int] | None, where: str,
                name: str) -> tuple[float, bool, int] | None:
    if step.deep == "write":
        return (step.scale, step.cfg, step.branch)
    if step.deep == "read":
        if cache is None:
            raise ScheduleError(
                f"{where}: DeepCache read without a valid cached feature (none was written since the last "
                "resolution switch or guidance change); make this step a deep write"
            )
        if cache[2] != step.branch:
            raise ScheduleError(f"{where}: reads branch {step.branch} but the cached feature is from branch "
                                f"{cache[2]}; use the same branch as the write")
    return cache


def _check_xattn(step: Step, cached_scale: float | None, where: str) -> float | None:
    if step.xattn == "write":
        if step.deep == "read":
            raise ScheduleError(f"{where}: a cross-attention write must compute every attn2 module, but a "
                                "DeepCache read step skips the deep ones; make it a deep write or a plain step")
        return step.scale
    if step.xattn == "read":
        if step.cfg:
            raise ScheduleError(f"{where}: cross-attention read needs guidance off (cfg false): the cached "
                                "maps carry one condition only")
        if cached_scale is None:
            raise ScheduleError(
                f"{where}: cross-attention read without written maps at scale {step.scale} (the maps are "
                "spatial: a resolution switch after the gate needs a re-write); make this step an xattn write"
            )
    return cached_scale


def plain_schedule(steps: int, cfg: bool = True) -> Schedule:
    """Plain generation as a schedule: ``steps`` full-resolution steps without caching, with guidance
    (batch 2) or, ``cfg`` False, without (batch 1, the conditional row alone: guidance off, or a model
    that takes the guidance scale as an embedding)."""
    if steps <= 0:
        raise ScheduleError(f"--steps {steps} is not positive; use a step count of at least 1")
    return Schedule(format_version=FORMAT_VERSION, name="plain", steps=(Step(cfg=cfg),) * steps)


# --- Resolving a schedule into graph evaluations --------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """The UNet graph one evaluation needs (scale-relative; ``executor.at_latent`` makes it concrete)."""

    scale: float
    batch: int  # 2 with guidance, 1 without
    deep: str = "none"  # a CACHE_ROLE: write = full UNet emitting the feature, read = shallow part taking it
    branch: int = 0
    xattn: str = "none"  # a CACHE_ROLE: write = emits the attn2 outputs, read = takes them
    precision: str = AUTO_PRECISION  # one of STEP_PRECISIONS: the same graph, compiled at this precision


PLAIN = Variant(scale=1.0, batch=2)  # plain generation's evaluation: full resolution, guidance batch, no caches
PLAIN_UNGUIDED = Variant(scale=1.0, batch=1)  # ...without guidance (off, or embedded as in LCM): one row


@dataclass(frozen=True)
class StepPlan:
    """What the executor does at one step: an optional switch evaluation at the previous scale
    (for x̂0), then the step's own evaluation."""

    index: int
    variant: Variant
    switch_from: Variant | None = None


def plan_steps(schedule: Schedule) -> tuple[StepPlan, ...]:
    """The graph evaluations of every step, in order (the schedule must be valid)."""
    plans = []
    xattn_scale: float | None = None  # scale at which attn2 outputs are held
    previous: Step | None = None
    for index, step in enumerate(schedule.steps):
        batch = 2 if step.cfg else 1
        switch_from = None
        if step.switch and previous is not None:
            # x̂0 comes from a plain evaluation at the old scale and this step's guidance setting,
            # reading the written cross-attention maps when guidance is already off.
            # It belongs to the old resolution's phase: it runs at the previous step's precision.
            reads = not step.cfg and xattn_scale == previous.scale
            switch_from = Variant(scale=previous.scale, batch=batch, xattn="read" if reads else "none",
                                  precision=previous.precision)
        branch = step.branch if step.deep != "none" else 0
        plans.append(StepPlan(index, Variant(step.scale, batch, step.deep, branch, step.xattn, step.precision),
                              switch_from))
        if step.xattn == "write":
            xattn_scale = step.scale
        previous = step
    return tuple(plans)


def graph_variants(schedule: Schedule) -> tuple[Variant, ...]:
    """Every distinct UNet variant the schedule evaluates, in first-use order."""
    seen: dict[Variant, None] = {}
    for plan in plan_steps(schedule):
        if plan.switch_from is not None:
            seen.setdefault(plan.switch_from)
        seen.setdefault(plan.variant)
    return tuple(seen)


def latent_size(full: tuple[int, int], scale: float, multiple: int) -> tuple[int, int]:
    """Latent (h, w) at ``scale`` of the full latent size; ScheduleError if off the model's grid."""
    height, width = full[0] * scale, full[1] * scale
    if height != int(height) or width != int(width) or int(height) % multiple or int(width) % multiple:
        valid = sorted({m / full[0] for m in range(multiple, full[0] + 1, multiple)
                        if (full[1] * m / full[0]) % multiple == 0 and (full[1] * m) % full[0] == 0})
        raise ScheduleError(
            f"scale {scale} gives a {height:g}x{width:g} latent, off this model's grid (sides must be whole "
            f"multiples of {multiple} for a {full[0]}x{full[1]} full latent); valid scales: "
            f"{', '.join(f'{v:g}' for v in valid)}"
        )
    return int(height), int(width)
