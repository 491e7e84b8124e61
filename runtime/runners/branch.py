"""One concrete UNet variant run through the merged UNet graph (``GraphSpec.merged``).

:class:`BranchRunner` looks, to the executor, exactly like the runner of the per-variant graph: its
``spec`` has that graph's input and output names and static shapes (from the manifest's
``ServedVariant``). Underneath it feeds the merged graph the branch selector, the inputs the branch
reads and a placeholder for every input it does not, and renames the outputs back.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from postdiff.runtime.manifest import DYNAMIC, GraphSpec, ServedVariant, TensorSpec
from postdiff.runtime.runners.base import Runner


def placeholder(spec: TensorSpec) -> np.ndarray:
    """What an input of the merged graph that the branch ignores is fed: zeros of ``spec``'s (static) shape."""
    if DYNAMIC in spec.shape:
        raise ValueError(f"placeholder {spec.name} needs a static shape, got {spec.shape}")  # a caller bug
    zeros = np.zeros(spec.shape, dtype=spec.dtype)
    zeros.flags.writeable = False  # the same array every call: a device runner may upload it once
    return zeros


def selector_value(index: int) -> np.ndarray:
    """The merged graph's selector input for branch ``index``: an int32 scalar."""
    return np.array(index, dtype=np.int32)


class BranchRunner(Runner):
    """Runs one served variant through a runner of the merged graph."""

    def __init__(self, merged: Runner, served: ServedVariant) -> None:
        info = merged.spec.merged
        if info is None:
            raise ValueError(f"{merged.spec.file} is not a merged UNet graph")  # a caller bug, not user input
        spec = GraphSpec(file=merged.spec.file, sha256=merged.spec.sha256, role=merged.spec.role,
                         inputs=served.inputs, outputs=served.outputs, precision=merged.spec.precision,
                         parity=served.parity, macs=served.macs, variant=served.variant)
        super().__init__(spec)
        self.merged = merged
        self.branch = info.branches[served.branch]
        self._fixed: dict[str, np.ndarray] = {t.name: placeholder(t) for t in served.placeholders}
        if info.selector:
            self._fixed[info.selector] = selector_value(served.branch)
        self._outputs = {info.output_names[t.name]: t.name for t in served.outputs}

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.merged.infer({**self._fixed, **feed})
        return {name: outputs[merged] for merged, name in self._outputs.items()}
