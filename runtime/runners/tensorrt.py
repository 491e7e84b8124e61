"""Native TensorRT implementation of :class:`Runner` (``--provider tensorrt``), torch-free.

UNVERIFIED: written without a GPU (none was available); only its import guards and errors are
tested. Run ``postdiff check BUNDLE --provider tensorrt`` on a GPU before trusting it.

Each engine listed in ``BUNDLE/engines/engines.json`` (``postdiff compile``) is deserialized once,
with one execution context; its device buffers are allocated once per (tensor, profile) and reused.
Device memory goes through NVIDIA's ``cuda-python`` (``cuda.cudart``), never torch.

Caches stay on the GPU: a cache output (the DeepCache feature, the cross-attention maps) comes back
as a :class:`DeviceTensor`, which the executor keeps (``.copy()``, ``[1:]``: device-to-device) and
feeds to a later step, whose input is then bound to that device memory directly. Host arrays fed as
inputs are uploaded; read-only host arrays (the merged UNet's placeholders) are uploaded once.
``noise_pred`` and the other outputs are downloaded to numpy.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from postdiff.runtime.engines import BackendMissing, NoGpu, gpu_compute_capability, import_backend
from postdiff.runtime.engines import ENGINES_DIR, EnginesIndex
from postdiff.errors import BundleError, InputError
from postdiff.runtime.manifest import GraphSpec
from postdiff.runtime.names import DEEP_FEATURE, XATTN_PREFIX
from postdiff.runtime.runners.base import Runner

__all__ = ["BackendMissing", "DeviceTensor", "NoGpu", "TensorRTRunner", "cuda_runtime"]


def cuda_runtime() -> Any:
    """cuda-python's runtime module, with a GPU behind it (NoGpu otherwise)."""
    gpu_compute_capability()  # NoGpu without cuda-python, driver or device
    from cuda import cudart

    return cudart


def _check(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` result; RuntimeError naming ``what`` on failure."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA {what} failed: {err}")
    return values[0] if len(values) == 1 else tuple(values)


def _is_cache(name: str) -> bool:
    return name.endswith(DEEP_FEATURE) or XATTN_PREFIX in name


class DeviceTensor:
    """A tensor in device memory: shape, numpy dtype, pointer; owns its allocation unless it is a view."""

    def __init__(self, cudart: Any, shape: tuple[int, ...], dtype: np.dtype, ptr: int | None = None,
                 owner: Any = None) -> None:
        self._cudart = cudart
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self._owned = ptr is None
        self.ptr = int(_check(cudart.cudaMalloc(max(self.nbytes, 1)), "cudaMalloc")) if ptr is None else int(ptr)
        self._owner = owner  # keeps the memory of a view alive

    def copy(self) -> DeviceTensor:
        """A device-to-device copy this tensor's owner cannot overwrite."""
        out = DeviceTensor(self._cudart, self.shape, self.dtype)
        _check(self._cudart.cudaMemcpy(out.ptr, self.ptr, self.nbytes,
                                       self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice), "cudaMemcpy D2D")
        return out

    def __getitem__(self, index: slice) -> DeviceTensor:
        """Rows ``index`` along axis 0 (a contiguous slice, step 1) as a view."""
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("DeviceTensor supports contiguous row slices only, e.g. t[1:]")
        start, stop, _ = index.indices(self.shape[0])
        row = self.nbytes // max(self.shape[0], 1)
        return DeviceTensor(self._cudart, (max(stop - start, 0), *self.shape[1:]), self.dtype,
                            ptr=self.ptr + start * row, owner=self)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        host = np.empty(self.shape, dtype=self.dtype)
        _check(self._cudart.cudaMemcpy(host.ctypes.data, self.ptr, self.nbytes,
                                       self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost), "cudaMemcpy D2H")
        return host if dtype is None else host.astype(dtype, copy=False)

    def astype(self, dtype: Any, copy: bool = True) -> Any:
        """``self`` if already ``dtype`` and no copy is asked, else a host array of that dtype."""
        if np.dtype(dtype) == self.dtype and not copy:
            return self
        return np.asarray(self).astype(dtype)

    def __del__(self) -> None:
        if getattr(self, "_owned", False) and self.ptr:
            self._cudart.cudaFree(self.ptr)
            self.ptr = 0


class _Engine:
    """One deserialized engine of a bundle: its context, stream and reusable buffers."""

    def __init__(self, trt: Any, cudart: Any, path: Path, profiles: tuple[Any, ...]) -> None:
        self.trt, self.cudart = trt, cudart
        self.logger = trt.Logger(trt.Logger.ERROR)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise BundleError(f"{path} could not be deserialized by this TensorRT (the log above says why); "
                              "rebuild it with `postdiff compile` on this machine")
        self.context = self.engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.profiles = profiles  # engines.json Profile per optimization profile index
        self.profile = -1
        self.buffers: dict[tuple[str, int], DeviceTensor] = {}
        self.uploaded: dict[int, tuple[np.ndarray, DeviceTensor]] = {}  # id(read-only host array) -> copy
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def is_input(self, name: str) -> bool:
        return self.engine.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT

    def select_profile(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        """The first optimization profile whose ranges hold ``shapes`` (a static profile: exactly its
        shapes); 0 for an engine without profiles (static graph)."""
        if not self.profiles:
            return 0
        for index, profile in enumerate(self.profiles):
            if all(len(shapes[n]) == len(r.min) and all(lo <= s <= hi for lo, s, hi in zip(r.min, shapes[n], r.max))
                   for n, r in profile.shapes.items() if n in shapes):
                return index
        raise InputError(f"no optimization profile of this engine takes the shapes {dict(shapes)}; "
                         "compile the bundle for this schedule (`postdiff compile --schedule ...`)")

    def buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> DeviceTensor:
        key = (name, self.profile)
        held = self.buffers.get(key)
        if held is None or held.shape != tuple(shape):
            held = self.buffers[key] = DeviceTensor(self.cudart, shape, dtype)
        return held

    def upload(self, name: str, array: np.ndarray) -> DeviceTensor:
        """Device copy of host ``array``: once for a read-only array (a placeholder), else every call."""
        if not array.flags.writeable:
            cached = self.uploaded.get(id(array))
            if cached is not None and cached[0] is array:
                return cached[1]
        array = np.ascontiguousarray(array)
        device = DeviceTensor(self.cudart, array.shape, array.dtype) if not array.flags.writeable else \
            self.buffer(name, array.shape, array.dtype)
        _check(self.cudart.cudaMemcpyAsync(device.ptr, array.ctypes.data, device.nbytes,
                                           self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream),
               "cudaMemcpyAsync H2D")
        if not array.flags.writeable:
            self.uploaded[id(array)] = (array, device)
        return device


class TensorRTRunner(Runner):
    """Runs one graph of a bundle from its TensorRT engine (see the module docstring)."""

    _engines: dict[tuple[str, str], _Engine] = {}  # (bundle, engine file) -> engine, shared by runners

    def __init__(self, spec: GraphSpec, bundle: Path, index: EnginesIndex, graph: str) -> None:
        """Open the engine serving ``graph`` (deserialized once per process).

        Raises:
            BackendMissing: the TensorRT module of the engines' backend is not installed.
            NoGpu: no CUDA GPU.
            BundleError: no engine for ``graph``, or engines built for another TensorRT or GPU.
        """
        super().__init__(spec)
        trt = import_backend(index.backend)
        cudart = cuda_runtime()
        here = f"sm{gpu_compute_capability()}"
        if str(trt.__version__) != index.backend_version or here != index.target:
            raise BundleError(f"the engines of {bundle} were built by {index.backend} {index.backend_version} for "
                              f"{index.target}, but this machine has {index.backend} {trt.__version__} and a {here} "
                              f"GPU; rebuild them here with `postdiff compile {bundle}`")
        name = index.engine_for(graph)
        if name is None:
            raise BundleError(f"engines.json of {bundle} has no engine for graph {graph}; run `postdiff compile "
                              f"{bundle}` for the schedules you run")
        entry = index.engines[name]
        key = (str(Path(bundle).resolve()), entry.file)
        if key not in self._engines:
            self._engines[key] = _Engine(trt, cudart, Path(bundle) / ENGINES_DIR / entry.file, entry.profiles)
        self.engine = self._engines[key]
        self._outputs = [t.name for t in spec.outputs]

    def _infer(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        engine, context, cudart = self.engine, self.engine.context, self.engine.cudart
        profile = engine.select_profile({n: tuple(v.shape) for n, v in feed.items()})
        if profile != engine.profile:
            context.set_optimization_profile_async(profile, int(engine.stream))
            engine.profile = profile
        for name, value in feed.items():
            if name not in engine.names:
                continue  # an input the builder found unused
            context.set_input_shape(name, tuple(value.shape))
            device = value if isinstance(value, DeviceTensor) else engine.upload(name, np.asarray(value))
            context.set_tensor_address(name, device.ptr)
        outputs: dict[str, DeviceTensor] = {}
        for name in self._outputs:
            shape = tuple(context.get_tensor_shape(name))
            dtype = np.dtype(engine.trt.nptype(engine.engine.get_tensor_dtype(name)))
            outputs[name] = engine.buffer(name, shape, dtype)
            context.set_tensor_address(name, outputs[name].ptr)
        if not context.execute_async_v3(int(engine.stream)):
            raise RuntimeError(f"TensorRT failed to run {self.spec.file} (see its log above)")
        _check(cudart.cudaStreamSynchronize(engine.stream), "cudaStreamSynchronize")
        # Caches stay on the device (the executor copies what it keeps); everything else comes home.
        return {name: value if _is_cache(name) else np.asarray(value) for name, value in outputs.items()}
