"""Parity of an exported graph against the torch module it came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from postdiff.exporter.trace import GraphPlan
from postdiff.errors import ParityError
from postdiff.runtime.manifest import Parity, TensorSpec
from postdiff.runtime.runners.branch import placeholder, selector_value

# Max abs difference allowed, relative to max(1, max |reference|): float32 kernels differ in
# summation order between torch and ONNX Runtime, nothing more.
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 2e-2


def measure_parity(plan: GraphPlan, path: Path, tolerance: float) -> Parity:
    """Run ``plan``'s example inputs through torch and through ONNX Runtime (CPU); compare every
    output and report the worst.

    Raises:
        ParityError: if any output differs by more than ``tolerance`` (scaled by its magnitude).
    """
    feed = {name: tensor.numpy() for name, tensor in plan.inputs.items()}
    actual = _session(path).run(list(plan.outputs), feed)
    return _compare(plan, actual, tolerance, plan.name)


def measure_merged_parity(plan: GraphPlan, path: Path, placeholders: tuple[TensorSpec, ...], selector: str,
                          branch: int, output_names: dict[str, str], tolerance: float) -> Parity:
    """:func:`measure_parity` of the merged UNet graph at ``path`` running ``plan``'s variant: the branch
    selected, ``plan``'s example inputs fed and a placeholder for every other input (as the runtime
    feeds them, runners/branch.py); the outputs compared under their merged names.

    Raises:
        ParityError: as :func:`measure_parity`.
    """
    feed = {spec.name: placeholder(spec) for spec in placeholders}
    if selector:
        feed[selector] = selector_value(branch)
    feed.update({name: tensor.numpy() for name, tensor in plan.inputs.items()})
    actual = _session(path).run([output_names[name] for name in plan.outputs], feed)
    return _compare(plan, actual, tolerance, f"merged UNet (branch {branch}, as {plan.name})")


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _compare(plan: GraphPlan, actual: list[np.ndarray], tolerance: float, what: str) -> Parity:
    """Worst output difference of ``actual`` against ``plan``'s torch module; ParityError past ``tolerance``."""
    with torch.no_grad():
        reference = plan.module(*plan.inputs.values())
    references = reference if isinstance(reference, tuple) else (reference,)
    worst = Parity(max_abs_diff=0.0, reference_max_abs=0.0, tolerance=tolerance)
    for name, ours, theirs in zip(plan.outputs, actual, references):
        expected = theirs.float().numpy()
        diff = float(np.max(np.abs(ours.astype(np.float32) - expected)))
        magnitude = float(np.max(np.abs(expected)))
        if not diff <= tolerance * max(1.0, magnitude):  # also catches NaN
            raise ParityError(
                f"graph {what}, output {name}: ONNX differs from torch by {diff:.3g} (allowed "
                f"{tolerance * max(1.0, magnitude):.3g}); the export is wrong for this model: report it with its config"
            )
        if diff >= worst.max_abs_diff:
            worst = Parity(max_abs_diff=diff, reference_max_abs=magnitude, tolerance=tolerance)
    return worst
