"""The Runner interface: run one graph, arrays in and out by tensor name.

Backends (ONNX Runtime, TensorRT) implement ``_infer``; the shared ``infer`` checks every feed
against the graph's manifest entry first, so a wrong tensor is reported by name, with what
arrived and what was expected, before any backend sees it.

Who owns what (the contract every runner and every caller keeps):

* **Outputs belong to the runner.** What ``infer`` returns is valid until the same runner's next
  call, which may overwrite or free the buffers (a TensorRT engine writes every call into the same
  device buffers; ONNX Runtime's IOBinding reuses an output it allocated before). A caller that
  keeps a result across calls keeps ``value.copy()``: for a numpy array a host copy, for a
  :class:`DeviceArray` a value its runner will not overwrite (on the device).
* **Feeds belong to the caller.** A runner reads its feed during the call and neither writes to it
  nor keeps it afterwards, except read-only arrays (``flags.writeable`` False: the merged UNet's
  placeholders), which a device runner may upload once and reuse while the array lives.
* **Host or device.** Outputs are numpy arrays, except that a device runner may return cache
  outputs (the DeepCache feature, the cross-attention maps: :func:`~postdiff.runtime.names.is_cache`)
  as :class:`DeviceArray` values that stay in device memory; a later call of a runner of the same
  backend and device takes them as feeds without a host round trip. ``np.asarray(value)`` brings
  one to the host.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from postdiff.errors import InputError
from postdiff.runtime.manifest import DYNAMIC, GraphSpec


@runtime_checkable
class DeviceArray(Protocol):
    """A tensor a device runner keeps in device memory (see the module docstring).

    ``shape`` and ``dtype`` as numpy's; ``copy()`` a value its runner will not overwrite (a device
    copy, or the value itself where the runner never writes to an output it handed out);
    ``value[a:b]`` rows along axis 0 (a contiguous slice) on the device; ``np.asarray(value)`` a
    host copy.
    """

    shape: tuple[int, ...]
    dtype: np.dtype

    def copy(self) -> DeviceArray: ...

    def __getitem__(self, rows: slice) -> DeviceArray: ...

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray: ...


class Runner(ABC):
    """Runs one graph of a bundle."""

    def __init__(self, spec: GraphSpec) -> None:
        self.spec = spec

    @property
    def precision(self) -> str:
        """The precision the graph runs at: the manifest's (fp32, fp16) unless the backend says otherwise."""
        return self.spec.precision

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on ``feed`` (one array per graph input, keyed by input name), after checking
        its names, shapes and dtypes against the manifest.

        Returns:
            One array per graph output, keyed by output name: numpy, or a :class:`DeviceArray` for
            a cache output of a device runner. They belong to the runner, which may reuse their
            buffers on its next call: keep ``value.copy()`` of a result you keep across calls.
        """
        check_feed(self.spec, feed)
        return self._infer(feed)

    @abstractmethod
    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError("Runner is an abstract class")


def check_feed(spec: GraphSpec, feed: Mapping[str, np.ndarray]) -> None:
    """Raise InputError if ``feed`` does not match the graph's inputs exactly."""
    expected = {t.name: t for t in spec.inputs}
    missing = sorted(set(expected) - set(feed))
    extra = sorted(set(feed) - set(expected))
    if missing or extra:
        raise InputError(
            f"graph {spec.file}: inputs missing {missing}, unexpected {extra}; "
            f"it takes {sorted(expected)}"
        )
    for name, tensor in expected.items():
        array = feed[name]
        fits = len(array.shape) == len(tensor.shape) and all(
            want in (DYNAMIC, got) for want, got in zip(tensor.shape, array.shape))
        if not fits or array.dtype != np.dtype(tensor.dtype):
            raise InputError(
                f"graph {spec.file}: input '{name}' got {array.dtype}{list(array.shape)}, "
                f"expected {tensor.dtype}{list(tensor.shape)}"
            )
