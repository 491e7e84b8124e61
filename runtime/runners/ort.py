"""ONNX Runtime implementation of :class:`Runner`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from postdiff.errors import BundleError, InputError
from postdiff.runtime.manifest import GraphSpec
from postdiff.runtime.runners.base import Runner

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "ort-tensorrt": "TensorrtExecutionProvider",  # ONNX Runtime's: an engine per session (`tensorrt` is ours)
}


def execution_providers(provider: str) -> list[str]:
    """ONNX Runtime provider list for a postdiff provider name, with CPU as the fallback.

    Raises:
        InputError: unknown name, or a provider this onnxruntime build lacks.
    """
    if provider not in PROVIDERS:
        raise InputError(f"unknown provider '{provider}'; expected one of {sorted(PROVIDERS)}")
    wanted = PROVIDERS[provider]
    available = ort.get_available_providers()
    if wanted not in available:
        raise InputError(
            f"provider '{provider}' needs {wanted}, which this onnxruntime build lacks "
            f"(it has {available}); install onnxruntime-gpu for cuda/ort-tensorrt, or use --provider cpu"
        )
    return [wanted] if wanted == PROVIDERS["cpu"] else [wanted, PROVIDERS["cpu"]]


_SHARED_ARENA: list[bool] = []


def _register_shared_arena() -> None:
    """Register one CPU arena allocator with ONNX Runtime's environment, once per process."""
    if not _SHARED_ARENA:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
        _SHARED_ARENA.append(True)


class OrtRunner(Runner):
    """Runs one bundle graph in an ONNX Runtime session."""

    def __init__(self, spec: GraphSpec, bundle: Path, provider: str = "cpu",
                 shared: Mapping[str, ort.OrtValue] | None = None, threads: int | None = None) -> None:
        """Open a session for ``spec``.

        Args:
            shared: initializer values to use instead of reading the graph's external weights
                (see :class:`~postdiff.runtime.runners.weights.WeightPool`); prepacking and
                layout transforms are then disabled so the session keeps no private copy of them.
            threads: intra-op threads of the session (None: ONNX Runtime's default, one per
                physical core); several processes sharing a machine each take a share.
        """
        super().__init__(spec)
        path = Path(bundle) / spec.file
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = threads
        if shared:
            # One copy of the weights for all sessions: no prepacking, and no layout transforms
            # (ORT_ENABLE_ALL reorders conv weights to NCHWc, a private ~2.3 GB copy per SD 1.5
            # session); extended fusions work on the shared tensors in place. With several sessions
            # taking turns, idle threads must not spin on the cores the next session needs.
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.disable_prepacking", "1")
            # ...and one activation arena for all of them (they run one at a time), not one each.
            options.add_session_config_entry("session.use_env_allocators", "1")
            _register_shared_arena()
            for name, value in shared.items():
                options.add_initializer(name, value)
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options=options, providers=execution_providers(provider)
            )
        except InputError:
            raise
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BundleError(
                f"{path} could not be loaded by onnxruntime ({str(exc).splitlines()[0]}); "
                "the file is damaged or from an incompatible exporter: re-export the bundle"
            ) from None
        self._output_names = [t.name for t in spec.outputs]

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self._output_names, dict(feed))
        return dict(zip(self._output_names, values))
