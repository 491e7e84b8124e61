"""One in-memory copy of the shared UNet weights for every ONNX Runtime session of a bundle.

The weights file is memory-mapped once; each tensor payload becomes one ``OrtValue`` that every
session referencing it receives through ``SessionOptions.add_initializer``. With weight prepacking
disabled, N UNet variants then cost one copy of the weights, not N.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from postdiff.runtime.manifest import GraphSpec, Manifest


class WeightPool:
    """Hands out shared ``OrtValue`` views of the bundle's weights file, created on first use."""

    def __init__(self, bundle: Path, manifest: Manifest) -> None:
        self._index = manifest.weights.tensors
        self._file = np.memmap(Path(bundle) / manifest.weights.file, dtype=np.uint8, mode="r")
        self._values: dict[str, ort.OrtValue] = {}

    def initializers(self, spec: GraphSpec) -> dict[str, ort.OrtValue]:
        """Initializer name -> shared value, for every externalized initializer of ``spec``."""
        return {name: self._value(key) for name, key in spec.initializers.items()}

    def _value(self, key: str) -> ort.OrtValue:
        if key not in self._values:
            entry = self._index[key]
            array = np.ndarray(entry.shape, dtype=entry.dtype, buffer=self._file, offset=entry.offset)
            self._values[key] = ort.OrtValue.ortvalue_from_numpy(array)
        return self._values[key]
