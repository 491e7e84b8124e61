"""ONNX Runtime implementation of :class:`Runner`.

Two ways to run a session, with the same results (bit for bit on the CPU; tested):

* plain ``session.run``: numpy in, numpy out (every output copied to the host). The CPU default.
* **IOBinding** (``iobinding=True``; the default on GPU providers such as ``--provider cuda``): inputs
  and outputs are bound to the provider's device. Cache outputs (the DeepCache feature, the
  cross-attention maps: :func:`~postdiff.runtime.names.is_cache`) stay there, returned as
  :class:`OrtDeviceArray`, and a later step's session binds them as inputs straight from device
  memory; every other output (``noise_pred``, what the scheduler needs) is copied to the host.
  Host inputs are bound as CPU tensors (ONNX Runtime uploads them); read-only host inputs (the merged
  UNet's placeholders) are uploaded once per runner.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from postdiff.errors import CorruptBundleError, InputError
from postdiff.runtime.manifest import GraphSpec
from postdiff.runtime.names import is_cache
from postdiff.runtime.runners.base import Runner
from postdiff.runtime.runners.providers import DEFAULT_PROVIDER, PROVIDERS, get_provider

# ONNX Runtime's tensor type names -> numpy dtypes (the dtypes bundles use).
_ORT_DTYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16),
               "tensor(int32)": np.dtype(np.int32), "tensor(int64)": np.dtype(np.int64)}


def execution_providers(provider: str) -> list[str]:
    """ONNX Runtime provider list for a postdiff provider name, with CPU as the fallback.

    Raises:
        InputError: unknown name, a provider of another backend, or one this onnxruntime build lacks.
    """
    chosen = get_provider(provider)
    if chosen.backend != "onnxruntime":
        raise InputError(f"provider '{provider}' runs on {chosen.backend}, not ONNX Runtime; open it with its own "
                         "runner (Pipeline does)")
    available = ort.get_available_providers()
    if chosen.target not in available:
        raise InputError(
            f"provider '{provider}' needs {chosen.target}, which this onnxruntime build lacks "
            f"(it has {available}); {chosen.install}, or use --provider {DEFAULT_PROVIDER}"
        )
    fallback = PROVIDERS[DEFAULT_PROVIDER].target
    return [chosen.target] if chosen.target == fallback else [chosen.target, fallback]


def device_of(provider: str) -> str:
    """The ONNX Runtime device type (IOBinding's ``device_type``) a postdiff provider computes on."""
    return "cuda" if get_provider(provider).gpu else "cpu"


class OrtDeviceArray:
    """A tensor an IOBinding session left in its device's memory: rows ``[start, start + shape[0])`` of
    an :class:`onnxruntime.OrtValue` (a :class:`~postdiff.runtime.runners.base.DeviceArray`).

    Immutable: the runner allocates fresh outputs on every call and never writes to one it handed out,
    so ``copy()`` is the value itself and a row slice is a view (it keeps the OrtValue alive).
    """

    def __init__(self, value: ort.OrtValue, device_id: int = 0, start: int = 0, rows: int | None = None) -> None:
        self.value = value
        self.device_id = device_id
        full = tuple(value.shape())
        self.dtype = _ORT_DTYPES[value.data_type()]
        self._row_bytes = int(np.prod(full[1:], dtype=np.int64)) * self.dtype.itemsize if full else 0
        self._start = start
        self.shape = full if rows is None else (rows, *full[1:])

    @property
    def device(self) -> str:
        """ONNX Runtime's device type of the memory (``cpu``, ``cuda``)."""
        return self.value.device_name().lower()

    def copy(self) -> OrtDeviceArray:
        """The value itself: its runner never overwrites it (see the class docstring)."""
        return self

    def __getitem__(self, index: slice) -> OrtDeviceArray:
        """Rows ``index`` along axis 0 (a contiguous slice, step 1) as a device view."""
        if not isinstance(index, slice) or index.step not in (None, 1) or not self.shape:
            raise TypeError("OrtDeviceArray supports contiguous row slices only, e.g. value[1:]")
        start, stop, _ = index.indices(self.shape[0])
        return OrtDeviceArray(self.value, self.device_id, self._start + start, max(stop - start, 0))

    def bind(self, binding: ort.IOBinding, name: str) -> None:
        """Bind these device rows as input ``name`` of ``binding`` (no copy)."""
        binding.bind_input(name, self.device, self.device_id, self.dtype.type, list(self.shape),
                           self.value.data_ptr() + self._start * self._row_bytes)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        host = np.array(self.value.numpy()[self._start:self._start + self.shape[0]] if self.shape else
                        self.value.numpy())  # numpy() of a device value is a host copy; np.array: ours
        return host if dtype is None else host.astype(dtype, copy=False)


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
                 shared: Mapping[str, ort.OrtValue] | None = None, threads: int | None = None,
                 prepack: bool = True, arena: bool = True, iobinding: bool | None = None) -> None:
        """Open a session for ``spec``.

        Args:
            shared: initializer values to use instead of reading the graph's external weights
                (see :class:`~postdiff.runtime.runners.weights.WeightPool`); prepacking and
                layout transforms are then disabled so the session keeps no private copy of them.
            threads: intra-op threads of the session (None: ONNX Runtime's default, one per
                physical core); several processes sharing a machine each take a share.
            prepack: let ONNX Runtime keep prepacked copies of the weights (faster, more memory; the
                text encoder runs once per prompt and goes without: 482 MB instead of ~700 MB for
                SD 1.5's, +22 ms per image).
            arena: pool activation memory in an arena that never shrinks (False under a memory
                budget: freed after every call, so a released session gives its memory back).
            iobinding: run through IOBinding, cache outputs kept on the provider's device (see the
                module docstring); None: on for GPU providers, off on the CPU.
        """
        super().__init__(spec)
        path = Path(bundle) / spec.file
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = threads
        if not prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
        if not arena:
            options.enable_cpu_mem_arena = False
        if shared:
            # One copy of the weights for all sessions: no prepacking, and no layout transforms
            # (ORT_ENABLE_ALL reorders conv weights to NCHWc, a private ~2.3 GB copy per SD 1.5
            # session); extended fusions work on the shared tensors in place. With several sessions
            # taking turns, idle threads must not spin on the cores the next session needs.
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.disable_prepacking", "1")
            # ...and one activation arena for all of them (they run one at a time), not one each.
            if arena:
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
            raise CorruptBundleError(
                f"{path} could not be loaded by onnxruntime ({str(exc).splitlines()[0]}); "
                "the file is damaged or from an incompatible exporter: re-export the bundle"
            ) from None
        self._output_names = [t.name for t in spec.outputs]
        self.device = device_of(provider)
        self.iobinding = get_provider(provider).gpu if iobinding is None else iobinding
        self._binding = self.session.io_binding() if self.iobinding else None
        self._uploaded: dict[int, tuple[np.ndarray, ort.OrtValue]] = {}  # id(read-only array) -> device copy

    def _infer(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        if self._binding is None:
            values = self.session.run(self._output_names, dict(feed))
            return dict(zip(self._output_names, values))
        return self._infer_bound(feed)

    def _infer_bound(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        """One call through IOBinding: caches stay on ``self.device``, the rest comes to the host."""
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, value in feed.items():
            if isinstance(value, OrtDeviceArray):
                value.bind(binding, name)
            elif self.device != "cpu" and isinstance(value, np.ndarray) and not value.flags.writeable:
                binding.bind_ortvalue_input(name, self._upload_once(value))
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(np.asarray(value)))
        # Fresh outputs every call (bound anew, not reused): a device value handed out stays valid.
        for name in self._output_names:
            binding.bind_output(name, self.device if is_cache(name) else "cpu", 0)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        binding.clear_binding_inputs()  # hold no feed past the call
        return {name: OrtDeviceArray(value) if is_cache(name) else np.array(value.numpy())
                for name, value in zip(self._output_names, values)}

    def _upload_once(self, array: np.ndarray) -> ort.OrtValue:
        """``array`` (read-only, so unchanged while it lives) on the device, uploaded on first use."""
        held = self._uploaded.get(id(array))
        if held is None or held[0] is not array:
            held = self._uploaded[id(array)] = (array, ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(array), self.device, 0))
        return held[1]
