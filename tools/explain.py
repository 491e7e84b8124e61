"""Per-step cost of a schedule on a bundle: the `postdiff schedule --explain` table.

Costs are the MAC counts the exporter recorded per graph. The predicted compute ratio compares the
schedule's total with the plain baseline at the same step count (full resolution, guidance on).
"""

from __future__ import annotations

from dataclasses import dataclass

from postdiff.errors import ScheduleError
from postdiff.runtime.executor import concrete
from postdiff.runtime.manifest import Manifest
from postdiff.runtime.names import NONE
from postdiff.runtime.schedule import Schedule, Variant, plan_steps



@dataclass(frozen=True)
class StepCost:
    """One row of the explain table."""

    index: int
    scale: float
    latent: str
    variant: str
    batch: int
    macs: int | None


def variant_label(variant: Variant) -> str:
    """Human-readable variant in the cache-role vocabulary, e.g. ``plain``, ``deep1-write`` or
    ``deep1-read xattn-read``."""
    parts = ([f"deep{variant.branch}-{variant.deep}"] if variant.deep != NONE else []) + \
        ([f"xattn-{variant.xattn}"] if variant.xattn != NONE else [])
    return " ".join(parts) or "plain"


def full_macs_per_sample(manifest: Manifest) -> int:
    """MACs of one full-resolution, full-depth UNet evaluation of one latent (no guidance batch)."""
    for graph in manifest.graphs.values():
        v = graph.variant
        if v is not None and v.latent == manifest.model.latent and v.deep != "read" and v.xattn != "read":
            return graph.macs // v.batch
    raise ScheduleError("the bundle has no full-resolution, full-depth UNet graph to compare against; "
                        "re-export it including the baseline schedule")


def step_costs(schedule: Schedule, manifest: Manifest | None) -> list[StepCost]:
    """One row per evaluation (a switch step has two: the x̂0 evaluation, then the step's own)."""
    rows = []
    for plan in plan_steps(schedule):
        for variant in (plan.switch_from, plan.variant):
            if variant is None:
                continue
            macs, latent = None, "-"
            if manifest is not None:
                wanted = concrete(manifest, variant)
                latent = f"{wanted.latent[0]}x{wanted.latent[1]}"
                macs = manifest.graph(manifest.unet_graph(wanted)).macs
            label = variant_label(variant) + (" [x̂0 for switch]" if variant is plan.switch_from else "")
            rows.append(StepCost(plan.index, variant.scale, latent, label, variant.batch, macs))
    return rows


def total_macs(schedule: Schedule, manifest: Manifest) -> int:
    """UNet multiply-accumulates of one generation of ``schedule`` on this bundle."""
    return sum(row.macs or 0 for row in step_costs(schedule, manifest))


def format_table(schedule: Schedule, manifest: Manifest | None) -> str:
    """The explain table as text. With a bundle: latent sizes, MACs per row and the predicted compute
    speed-up; without one, only what the schedule itself says (no column of unknowns)."""
    rows = step_costs(schedule, manifest)
    lines = [f"schedule '{schedule.name}': {len(schedule.steps)} steps, xattn mode {schedule.xattn_mode}"]
    if manifest is None:
        lines.append(f"{'step':>4}  {'scale':>5}  {'batch':>5}  variant")
        lines += [f"{row.index:>4}  {row.scale:>5g}  {row.batch:>5}  {row.variant}" for row in rows]
        lines.append("MACs and the predicted speed-up need --bundle BUNDLE (a bundle exported with this schedule)")
    else:
        lines.append(f"{'step':>4}  {'scale':>5}  {'latent':>7}  {'batch':>5}  {'GMACs':>8}  variant")
        lines += [f"{row.index:>4}  {row.scale:>5g}  {row.latent:>7}  {row.batch:>5}  {row.macs / 1e9:8.2f}  "
                  f"{row.variant}" for row in rows]
        total = sum(row.macs or 0 for row in rows)  # total_macs, from the rows already computed
        baseline = full_macs_per_sample(manifest) * 2 * len(schedule.steps)
        lines.append(f"total {total / 1e9:.2f} GMACs vs baseline {baseline / 1e9:.2f} GMACs "
                     f"({len(schedule.steps)} full steps with guidance): predicted compute speed-up "
                     f"{baseline / total:.2f}x")
    return "\n".join(lines)
