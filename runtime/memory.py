"""Memory budgets: which graphs are open in each phase of a generation, and what that costs.

Under ``--memory-budget`` a generation opens only the graphs of its current phase and releases the
rest (text encoder after encoding; each UNet graph after its last step, so the low-resolution graphs
go at the switch and the guided ones at the gate; the decoder after decoding). Before any compute
the largest phase is estimated from the manifest and refused if it cannot fit.

The estimate, per phase: what the process holds already (its resident memory when the check runs)
+ the weights its graphs hold (UNet graphs: the payloads of the shared weights file they name, each
distinct payload once when the weights are shared; other graphs: their file size, weights being
embedded) + the graph files themselves + every graph input and output tensor (manifest shapes).
Activations inside a graph are not in the manifest and come on top: the estimate is a floor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from postdiff.errors import InputError
from postdiff.runtime.manifest import GraphSpec, Manifest

MB = 2**20


@dataclass(frozen=True)
class Phase:
    """One stretch of a generation with a fixed set of open graphs."""

    label: str  # "encode", "steps 0-9", "decode"
    graphs: tuple[str, ...]


@dataclass(frozen=True)
class PhaseEstimate:
    """The estimated resident memory of one phase, in bytes, by part."""

    phase: Phase
    resident: int
    weights: int
    tensors: int

    @property
    def total(self) -> int:
        return self.resident + self.weights + self.tensors


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``; 0 where unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def tensor_bytes(spec: GraphSpec) -> int:
    """Bytes of every input and output tensor of a graph, from the manifest's static shapes."""
    return sum(int(np.prod(t.shape, dtype=np.int64)) * np.dtype(t.dtype).itemsize
               for t in (*spec.inputs, *spec.outputs))


def weight_parts(manifest: Manifest, bundle: Path, name: str, shared: bool) -> dict[str, int]:
    """What graph ``name`` holds in memory, keyed so that parts shared between graphs count once."""
    spec = manifest.graph(name)
    try:
        parts = {f"file:{spec.file}": (Path(bundle) / spec.file).stat().st_size}
    except OSError:
        parts = {f"file:{spec.file}": 0}  # a missing file is reported by verification, not here
    if spec.external_data:  # a > 2 GB text encoder's own weights file
        path = Path(bundle) / spec.external_data
        parts[f"file:{spec.external_data}"] = path.stat().st_size if path.is_file() else 0
    for key in spec.initializers.values():
        entry = manifest.weights.tensors.get(key)
        if entry is not None:
            parts[f"weights:{key}" if shared else f"weights:{name}:{key}"] = entry.length
    return parts


def estimate(manifest: Manifest, bundle: Path, phases: list[Phase], shared: bool,
             resident: int | None = None) -> list[PhaseEstimate]:
    """The estimate of every phase (see the module docstring for how)."""
    base = resident_bytes() if resident is None else resident
    out = []
    for phase in phases:
        parts: dict[str, int] = {}
        for name in phase.graphs:
            parts.update(weight_parts(manifest, bundle, name, shared))
        tensors = sum(tensor_bytes(manifest.graph(n)) for n in phase.graphs)
        out.append(PhaseEstimate(phase, base, sum(parts.values()), tensors))
    return out


def step_phases(per_step: list[list[str]]) -> list[Phase]:
    """Consecutive denoising steps with the same open graphs, merged into one phase each."""
    phases: list[Phase] = []
    start = 0
    for index in range(1, len(per_step) + 1):
        if index == len(per_step) or per_step[index] != per_step[start]:
            label = f"step {start}" if index - 1 == start else f"steps {start}-{index - 1}"
            phases.append(Phase(label, tuple(per_step[start])))
            start = index
    return phases


def check_budget(estimates: list[PhaseEstimate], budget_mb: float) -> PhaseEstimate:
    """The largest phase; InputError if it cannot fit ``budget_mb``."""
    if not budget_mb > 0:
        raise InputError(f"--memory-budget {budget_mb} is not a positive number of MB")
    worst = max(estimates, key=lambda e: e.total)
    if worst.total > budget_mb * MB:
        raise InputError(
            f"--memory-budget {budget_mb:g} MB cannot fit phase '{worst.phase.label}' "
            f"({', '.join(worst.phase.graphs)}): it needs at least {worst.total / MB:.0f} MB = "
            f"{worst.resident / MB:.0f} MB already resident + {worst.weights / MB:.0f} MB weights and graphs + "
            f"{worst.tensors / MB:.0f} MB graph inputs/outputs (activations inside the graphs come on top); "
            f"raise the budget to at least {np.ceil(worst.total / MB):.0f} MB or export the bundle with "
            "--precision fp16"
        )
    return worst
