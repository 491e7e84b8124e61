"""Per-step cost of a schedule on a bundle: the `postdiff schedule --explain` table.

Costs are the MAC counts the exporter recorded per graph. The predicted compute ratio compares the
schedule's total with the plain baseline at the same step count (full resolution, guidance on).
With a device profile each evaluation also shows its measured median at the precision it runs at
(a step's own ``precision``, else the run's), and the table ends with the predicted latency of one
generation (:func:`postdiff.tools.profiler.predict_ms`). MACs do not depend on the precision; time does.
"""

from __future__ import annotations

from dataclasses import dataclass

from postdiff.errors import ScheduleError
from postdiff.profiles.device import DeviceProfile
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
    precision: str = "auto"  # the step's precision (auto: the run's --precision)
    graph: str | None = None  # the bundle's graph computing it (with a bundle)


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
            macs, latent, graph = None, "-", None
            if manifest is not None:
                wanted = concrete(manifest, variant)
                latent = f"{wanted.latent[0]}x{wanted.latent[1]}"
                graph = manifest.unet_graph(wanted)
                macs = manifest.graph(graph).macs
            label = variant_label(variant) + (" [x̂0 for switch]" if variant is plan.switch_from else "")
            rows.append(StepCost(plan.index, variant.scale, latent, label, variant.batch, macs, variant.precision,
                                 graph))
    return rows


def total_macs(schedule: Schedule, manifest: Manifest) -> int:
    """UNet multiply-accumulates of one generation of ``schedule`` on this bundle."""
    return sum(row.macs or 0 for row in step_costs(schedule, manifest))


def format_table(schedule: Schedule, manifest: Manifest | None, profile: DeviceProfile | None = None,
                 run_precision: str | None = None) -> str:
    """The explain table as text. With a bundle: latent sizes, MACs per row and the predicted compute
    speed-up; without one, only what the schedule itself says (no column of unknowns). A precision
    column appears when the schedule pins any step's precision; with ``profile`` (of this bundle) a
    column of measured ms per evaluation at its precision and the predicted latency
    (``run_precision``: the run's --precision, for the steps that pin none)."""
    rows = step_costs(schedule, manifest)
    pinned = schedule.precisions != ("auto",)
    prec = (lambda row: f"{row.precision:>9}  ") if pinned else (lambda row: "")
    prec_head = f"{'precision':>9}  " if pinned else ""
    lines = [f"schedule '{schedule.name}': {len(schedule.steps)} steps, xattn mode {schedule.xattn_mode}"]
    if manifest is None:
        lines.append(f"{'step':>4}  {'scale':>5}  {'batch':>5}  {prec_head}variant")
        lines += [f"{row.index:>4}  {row.scale:>5g}  {row.batch:>5}  {prec(row)}{row.variant}" for row in rows]
        lines.append("MACs and the predicted speed-up need --bundle BUNDLE (a bundle exported with this schedule)")
    else:
        timed = _row_ms(rows, profile, run_precision) if profile is not None else None
        ms_head = f"{'ms':>8}  " if timed else ""
        lines.append(f"{'step':>4}  {'scale':>5}  {'latent':>7}  {'batch':>5}  {'GMACs':>8}  {ms_head}{prec_head}variant")
        lines += [f"{row.index:>4}  {row.scale:>5g}  {row.latent:>7}  {row.batch:>5}  {row.macs / 1e9:8.2f}  "
                  + (f"{timed[i]:8.2f}  " if timed else "") + f"{prec(row)}{row.variant}"
                  for i, row in enumerate(rows)]
        total = sum(row.macs or 0 for row in rows)  # total_macs, from the rows already computed
        baseline = full_macs_per_sample(manifest) * 2 * len(schedule.steps)
        lines.append(f"total {total / 1e9:.2f} GMACs vs baseline {baseline / 1e9:.2f} GMACs "
                     f"({len(schedule.steps)} full steps with guidance): predicted compute speed-up "
                     f"{baseline / total:.2f}x")
        if profile is not None:
            from postdiff.tools.profiler import predict_ms

            predicted = predict_ms(profile, manifest, schedule, precision=run_precision)
            lines.append(f"predicted latency on the profiled device ({profile.machine.provider}, main precision "
                         f"{profile.machine.precision}): {predicted:.1f} ms per image (UNet calls "
                         f"{sum(timed):.1f} ms)")
    return "\n".join(lines)


def _row_ms(rows: list[StepCost], profile: DeviceProfile, run_precision: str | None) -> list[float]:
    """Each evaluation's measured median ms at its precision (InputError where the profile has none)."""
    from postdiff.tools.profiler import call_ms

    previous, out = None, []
    for row in rows:
        out.append(call_ms(profile, row.graph, row.precision, previous, run_precision))
        previous = row.graph
    return out
