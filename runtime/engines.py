"""TensorRT engines beside a bundle: ``BUNDLE/engines/engines.json`` and what it promises.

``postdiff compile`` (tools/compile.py) writes one engine per graph it builds and lists each in
``engines.json``: file, bytes, sha256, the graph it was built from, the concrete UNet variants it
serves, its optimization profiles, and the cache key of the build (tools/compile.py, cache_key). The
key covers everything that makes an engine valid — graph sha256, profiles, precision, backend and its
version, target compute capability and builder options — so an unchanged key means the engine on disk
is reused, and a changed one means it is rebuilt. The TensorRT runner reads nothing else to find its
engines. Also here: what both the compiler and the runner need to reach TensorRT and the GPU
(import_backend, gpu_compute_capability).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from postdiff.errors import BundleError, InputError, PostdiffError
from postdiff.runtime.jsonio import load_versioned
from postdiff.runtime.manifest import Manifest, sha256_file

FORMAT_VERSION = 1
ENGINES_DIR = "engines"
ENGINES_JSON = "engines.json"
BACKENDS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}  # --backend -> Python module


@dataclass(frozen=True)
class ShapeRange:
    """One input's shapes in one optimization profile (TensorRT's min / opt / max)."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """One optimization profile: the concrete UNet variants (graph names) it runs and every free
    input's shape range."""

    serves: tuple[str, ...]
    shapes: dict[str, ShapeRange]


@dataclass(frozen=True)
class EngineEntry:
    """One built engine."""

    file: str
    bytes: int
    sha256: str
    graph: str  # manifest graph name it was built from
    graph_sha256: str
    serves: tuple[str, ...]  # the graph variants it computes (per-variant graph names)
    profiles: tuple[Profile, ...]
    precision: str
    builder: dict[str, str]  # builder options that change the engine
    key: str
    build_seconds: float


@dataclass(frozen=True)
class EnginesIndex:
    """The parsed ``engines.json``."""

    format_version: int
    manifest_sha256: str  # the bundle's manifest.json these engines were built for
    backend: str  # tensorrt | tensorrt-rtx
    backend_version: str
    target: str  # compute capability, e.g. "sm86"
    engines: dict[str, EngineEntry]

    def engine_for(self, graph: str) -> str | None:
        """Name of the engine serving graph (or graph variant) ``graph``, or None."""
        for name, entry in sorted(self.engines.items()):
            if entry.graph == graph or graph in entry.serves:
                return name
        return None


def manifest_sha256(bundle: Path) -> str:
    """sha256 of the bundle's manifest.json as it lies on disk."""
    return sha256_file(Path(bundle) / "manifest.json")


def load_engines(bundle: Path, manifest: Manifest | None = None) -> EnginesIndex:
    """Read ``BUNDLE/engines/engines.json`` and check it against the bundle.

    Raises:
        BundleError: no engines.json (compile first), an unknown format, engines.json written for
            another manifest (stale: recompile), or an engine file missing or not the one recorded.
    """
    path = Path(bundle) / ENGINES_DIR / ENGINES_JSON
    if not path.is_file():
        raise BundleError(f"{path} does not exist: this bundle has no TensorRT engines; build them with "
                          f"`postdiff compile {bundle}` on the device (or with --backend tensorrt-rtx --sm N)")
    index = load_versioned(EnginesIndex, path, FORMAT_VERSION, BundleError,
                           f"rebuild the engines with `postdiff compile {bundle}`")
    actual = manifest_sha256(bundle)
    if index.manifest_sha256 != actual:
        raise BundleError(f"{path} is stale: it was built for manifest {index.manifest_sha256[:12]}…, but "
                          f"{Path(bundle) / 'manifest.json'} is {actual[:12]}… (the bundle was re-exported); "
                          f"run `postdiff compile {bundle}` again")
    for name, entry in sorted(index.engines.items()):
        file = path.parent / entry.file
        if not file.is_file() or file.stat().st_size != entry.bytes:
            raise BundleError(f"engine {file} is missing or not the {entry.bytes} bytes engines.json records; "
                              f"run `postdiff compile {bundle}` again")
        if manifest is not None and manifest.graph(entry.graph).sha256 != entry.graph_sha256:
            raise BundleError(f"engine {name} was built from another {entry.graph} than the bundle's; "
                              f"run `postdiff compile {bundle}` again")
    return index


class BackendMissing(PostdiffError):
    """The TensorRT Python package of the chosen backend is not installed."""


class NoGpu(PostdiffError):
    """The operation needs a CUDA GPU and this machine has none (or no driver)."""


def import_backend(backend: str) -> ModuleType:
    """The TensorRT module of ``backend``.

    Raises:
        InputError: an unknown backend.
        BackendMissing: its package is not installed (the message names the install).
    """
    if backend not in BACKENDS:
        raise InputError(f"--backend '{backend}' is not one of {sorted(BACKENDS)}")
    try:
        return importlib.import_module(BACKENDS[backend])
    except ImportError:
        install = ("pip install 'postdiff[tensorrt-rtx]' (TensorRT-RTX, RTX GPUs; builds anywhere)"
                   if backend == "tensorrt-rtx" else
                   "JetPack's TensorRT on Jetson (python3-libnvinfer), or `pip install tensorrt` on an x86 "
                   "machine with a GPU")
        raise BackendMissing(f"backend '{backend}' needs the Python module {BACKENDS[backend]}, which is not "
                             f"installed; install it with {install}") from None


def gpu_compute_capability() -> int:
    """Compute capability of CUDA device 0 as an int (e.g. 87 for Jetson Orin), via cuda-python.

    Raises:
        NoGpu: no cuda-python, no driver or no device.
    """
    try:
        from cuda import cudart
    except ImportError:
        raise NoGpu("no CUDA device access: the cuda-python package is missing; install it with "
                    "pip install 'postdiff[tensorrt]'") from None
    try:
        err, count = cudart.cudaGetDeviceCount()
    except RuntimeError as exc:  # cuda-python cannot load libcuda: no driver
        raise NoGpu(f"no CUDA GPU on this machine ({exc}); run this on the device") from None
    if int(err) != 0 or count == 0:
        raise NoGpu("no CUDA GPU on this machine (cudaGetDeviceCount found none); run this on the device")
    err, props = cudart.cudaGetDeviceProperties(0)
    return int(props.major) * 10 + int(props.minor)
