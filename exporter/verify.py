"""Parity of an exported graph against the torch module it came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from postdiff.exporter.trace import GraphPlan
from postdiff.runtime.errors import ParityError
from postdiff.runtime.manifest import Parity

# Max abs difference allowed, relative to max(1, max |reference|): float32 kernels differ in
# summation order between torch and ONNX Runtime, nothing more.
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 2e-2


def measure_parity(plan: GraphPlan, path: Path, tolerance: float) -> Parity:
    """Run ``plan``'s example inputs through torch and through ONNX Runtime (CPU) and compare.

    Raises:
        ParityError: if the difference exceeds ``tolerance`` (scaled by the output magnitude).
    """
    with torch.no_grad():
        reference = plan.module(*plan.inputs.values()).float().numpy()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {name: tensor.numpy() for name, tensor in plan.inputs.items()}
    actual = session.run([plan.outputs[0]], feed)[0].astype(np.float32)
    diff = float(np.max(np.abs(actual - reference)))
    scale = max(1.0, float(np.max(np.abs(reference))))
    if not diff <= tolerance * scale:  # also catches NaN
        raise ParityError(
            f"graph {plan.name}: ONNX output differs from torch by {diff:.3g} (allowed {tolerance * scale:.3g}); "
            "the export is wrong for this model: report it with the model's config"
        )
    return Parity(max_abs_diff=diff, reference_max_abs=float(np.max(np.abs(reference))), tolerance=tolerance)
