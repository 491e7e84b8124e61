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
    """Hands out shared ``OrtValue`` views of the bundle's weights file, created on first use and
    dropped (with the file's mapping, once none is left) when the last graph using them is released."""

    def __init__(self, bundle: Path, manifest: Manifest) -> None:
        self._index = manifest.weights.tensors
        self._path = Path(bundle) / manifest.weights.file
        self._file: np.memmap | None = None
        self._values: dict[str, ort.OrtValue] = {}
        self._users: dict[str, frozenset[str]] = {}  # graph file -> the weight keys it holds

    def initializers(self, spec: GraphSpec) -> dict[str, ort.OrtValue]:
        """Initializer name -> shared value, for every externalized initializer of ``spec``."""
        self._users[spec.file] = frozenset(spec.initializers.values())
        return {name: self._value(key) for name, key in spec.initializers.items()}

    def release(self, spec: GraphSpec) -> None:
        """``spec``'s session is gone: drop the values no other open graph holds."""
        self._users.pop(spec.file, None)
        held = frozenset().union(*self._users.values())
        self._values = {key: value for key, value in self._values.items() if key in held}
        if not self._values:
            self._file = None  # unmapped once the last view is gone

    def _value(self, key: str) -> ort.OrtValue:
        if self._file is None:
            self._file = np.memmap(self._path, dtype=np.uint8, mode="r")
        if key not in self._values:
            entry = self._index[key]
            array = np.ndarray(entry.shape, dtype=entry.dtype, buffer=self._file, offset=entry.offset)
            self._values[key] = ort.OrtValue.ortvalue_from_numpy(array)
        return self._values[key]
