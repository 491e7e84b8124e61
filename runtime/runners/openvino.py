"""OpenVINO implementation of :class:`Runner`: the bundle's ONNX graphs compiled for the CPU.

OpenVINO reads the ONNX files (and their external weights file) as they are -- no re-export. The
inference precision is a compile-time property: ``fp32``, or ``bf16`` where the CPU has native
bfloat16 (OpenVINO reports it among the CPU's optimization capabilities; it then also picks bf16 by
default). The precision a compiled model actually runs at is read back from it, never assumed.

OpenVINO is optional (the ``[openvino]`` extra): this module imports it on first use and raises an
:class:`~postdiff.errors.InputError` naming the install when it is missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from postdiff.errors import BundleError, InputError
from postdiff.runtime.manifest import GraphSpec
from postdiff.runtime.runners.base import Runner
from postdiff.runtime.runners.providers import AUTO_PRECISION as AUTO
from postdiff.runtime.runners.providers import RUNTIME_PRECISIONS as PRECISIONS
from postdiff.runtime.runners.providers import get_provider

_OV_TYPE_NAMES = {"fp32": "f32", "bf16": "bf16"}  # postdiff name -> openvino.Type attribute
_CAPABILITY = {"fp32": "FP32", "bf16": "BF16"}  # postdiff name -> OPTIMIZATION_CAPABILITIES entry


def openvino_module() -> ModuleType:
    """The ``openvino`` package; InputError naming the install when it is missing."""
    try:
        import openvino
    except ImportError as exc:
        raise InputError(f"--provider openvino needs the openvino package, which is not installed ({exc}); "
                         f"{get_provider('openvino').install}, or use --provider cpu") from None
    return openvino


@lru_cache(maxsize=1)
def core() -> Any:
    """One ``openvino.Core`` per process (it holds the plugins and their caches)."""
    return openvino_module().Core()


def cpu_precisions() -> tuple[str, ...]:
    """The float precisions this CPU runs natively under OpenVINO, fastest last (``fp32`` always)."""
    capabilities = set(core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return tuple(name for name in ("fp32", "bf16") if _CAPABILITY[name] in capabilities)


def precision_name(ov_type: Any) -> str:
    """postdiff's name of an ``openvino.Type`` inference precision (``f32`` -> ``fp32``, ``bf16``, ...)."""
    text = ov_type.get_type_name() if hasattr(ov_type, "get_type_name") else str(ov_type)
    return {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(text, text)


def resolve_precision(precision: str) -> str:
    """``precision`` checked against this CPU: ``auto`` becomes OpenVINO's default for it.

    Raises:
        InputError: an unknown name, or ``bf16`` on a CPU without native bfloat16.
    """
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r} is not one OpenVINO runs here; expected one of {list(PRECISIONS)}")
    available = cpu_precisions()
    if precision == AUTO:
        chosen = precision_name(core().get_property("CPU", "INFERENCE_PRECISION_HINT"))
        return chosen if chosen in available else "fp32"
    if precision not in available:
        raise InputError(f"--precision {precision}: this CPU has no native {precision} under OpenVINO (its "
                         f"optimization capabilities: {sorted(core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES'))}); "
                         f"use one of {list(available)} or {AUTO}")
    return precision


def compile_config(precision: str, threads: int | None) -> dict[str, Any]:
    """Compile properties: one stream, latency hint, the inference precision, the thread count."""
    ov = openvino_module()
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                              "INFERENCE_PRECISION_HINT": getattr(ov.Type, _OV_TYPE_NAMES[precision])}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


class OpenVinoRunner(Runner):
    """Runs one bundle graph as an OpenVINO compiled model on the CPU."""

    def __init__(self, spec: GraphSpec, bundle: Path, precision: str = AUTO, threads: int | None = None,
                 model: Any = None) -> None:
        """Compile ``spec``'s ONNX file.

        Args:
            precision: ``auto`` (the CPU's fastest: bf16 where it has it), ``fp32`` or ``bf16``.
            threads: inference threads (None: OpenVINO's default, one per physical core).
            model: an already-read ``openvino.Model`` of this graph to compile instead of the file
                (for example one whose weights are shared with other graphs).

        Raises:
            InputError: OpenVINO missing, or a precision this CPU lacks.
            BundleError: OpenVINO cannot read or compile the graph.
        """
        super().__init__(spec)
        wanted = resolve_precision(precision)
        path = Path(bundle) / spec.file
        try:
            source = core().read_model(str(path)) if model is None else model
            self.compiled = core().compile_model(source, "CPU", compile_config(wanted, threads))
        except Exception as exc:  # openvino raises untyped RuntimeErrors
            raise BundleError(f"{path} could not be compiled by OpenVINO ({str(exc).strip().splitlines()[-1]}); "
                              "re-export the bundle, or use --provider cpu") from None
        self._precision = precision_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        self._request = self.compiled.create_infer_request()
        self._outputs = [(t.name, self.compiled.output(t.name)) for t in spec.outputs]

    @property
    def precision(self) -> str:
        """The inference precision the compiled model runs at, as OpenVINO reports it."""
        return self._precision

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._request.infer(dict(feed))  # outputs are copies (share_outputs=False)
        return {name: results[port] for name, port in self._outputs}
