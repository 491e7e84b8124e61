"""The Runner interface: run one graph, arrays in and out by tensor name.

Backends (ONNX Runtime, TensorRT) implement ``_infer``; the shared ``infer`` checks every feed
against the graph's manifest entry first, so a wrong tensor is reported by name, with what
arrived and what was expected, before any backend sees it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np

from postdiff.errors import InputError
from postdiff.runtime.manifest import DYNAMIC, GraphSpec


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
            One array per graph output, keyed by output name. The arrays belong to the runner, which
            may reuse their buffers on the next call: copy a result you keep across calls.
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
