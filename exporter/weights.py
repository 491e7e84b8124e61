"""One weights file shared by every UNet graph of a bundle.

Each graph variant is traced on its own, so its initializers carry the same payloads as its
siblings' (often under the same names, sometimes under exporter-generated ones after constant
folding). :class:`WeightStore` writes every distinct payload once, page-aligned, and points each
graph's initializers at it as ONNX external data. The index it returns goes into the manifest, so
the runtime can also share the payloads in memory across sessions without parsing ONNX.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import numpy_helper

from postdiff.runtime.manifest import WeightEntry

ALIGNMENT = 4096  # page-aligned payloads can be memory-mapped
MIN_BYTES = 1024  # smaller tensors stay inside the graph


class WeightStore:
    """Appends unique tensor payloads to one file and externalizes graph initializers into it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, WeightEntry] = {}
        self._size = 0
        self.path.write_bytes(b"")

    def externalize(self, model: onnx.ModelProto) -> dict[str, str]:
        """Move ``model``'s large initializers into the store (in place).

        Returns:
            initializer name -> payload key, for every externalized initializer.
        """
        mapping = {}
        for tensor in model.graph.initializer:
            array = numpy_helper.to_array(tensor)
            payload = array.tobytes()
            if len(payload) < MIN_BYTES:
                continue
            digest = hashlib.sha256(f"{array.dtype.name}{list(array.shape)}".encode())
            digest.update(payload)
            key = digest.hexdigest()[:24]
            if key not in self.entries:
                self.entries[key] = self._append(payload, array.dtype.name, tuple(array.shape))
            entry = self.entries[key]
            _point_at(tensor, self.path.name, entry.offset, entry.length)
            mapping[tensor.name] = key
        return mapping

    def _append(self, payload: bytes, dtype: str, shape: tuple[int, ...]) -> WeightEntry:
        offset = -(-self._size // ALIGNMENT) * ALIGNMENT
        with open(self.path, "r+b") as handle:
            handle.seek(offset)
            handle.write(payload)
        self._size = offset + len(payload)
        return WeightEntry(offset=offset, length=len(payload), dtype=dtype, shape=shape)


def _point_at(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Turn ``tensor`` into an external-data reference to ``location[offset:offset+length]``."""
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                  "string_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
