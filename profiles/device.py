"""Device profiles: what every graph of one bundle costs on one machine (``postdiff profile``).

A device profile is JSON (``format_version`` 1) written by :func:`postdiff.tools.profiler.profile_bundle`
on the device and read by the tuner and by :func:`postdiff.tools.profiler.predict_ms`. It is tied to
one bundle by the sha256 of that bundle's manifest: timings of another bundle's graphs say nothing
about this one's. Examples measured on the development machine live in ``profiles/devices/``.

Schema (all times in milliseconds, wall clock, warm-up calls excluded)::

    {
      "format_version": 1,
      "created": "2025-01-01T12:00:00+00:00",        # ISO 8601, UTC
      "machine": {"cpu", "cores", "gpu", "os", "python", "numpy", "onnxruntime", "postdiff", "provider",
                  "precision", "openvino"},          # precision and openvino optional (fp32, "")
      "bundle": {"source", "manifest_sha256", "schedules"},
      "weights": "shared" | "per-session",           # how the UNet sessions held their weights
      "warmup": 2,                                   # untimed calls before each measurement series
      "graphs": {NAME: TIMING},                      # every graph of the bundle, by manifest name,
                                                     #   called back to back (same graph each call)
      "interleaved": {NAME: TIMING},                 # every graph again, called round-robin over all
                                                     #   graphs: each call follows another graph's call
      "scheduler_step": {SCHEDULER: {"HxW": TIMING}},# per scheduler, per UNet latent size
      "switch": {"hxw->HxW": TIMING},                # resolution switch, every increasing size pair
      "step_after_graph": {"HxW": TIMING},           # the DDIM step again, each call right after a UNet
                                                     #   graph call at that size (cold caches; optional)
      "precisions": {PRECISION: {"graphs": {NAME: TIMING}, "interleaved": {NAME: TIMING}}},
                                                     # the UNet graphs again at each further precision the
                                                     #   backend runs here (OpenVINO: bf16 and fp32), the
                                                     #   main tables being at machine.precision (optional)
      "peak_rss_mb": 512.0,                          # peak resident set of the profiling process
      "peak_gpu_mb": null                            # peak GPU memory of the process, when measurable
    }

    TIMING = {"median_ms", "p10_ms", "p90_ms", "min_ms", "repeats"}
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from postdiff.errors import InputError
from postdiff.runtime.jsonio import dumps, load_versioned

FORMAT_VERSION = 1
WEIGHTS_MODES = ("shared", "per-session")
_SIZE = re.compile(r"^\d+x\d+$")
_PAIR = re.compile(r"^(\d+)x(\d+)->(\d+)x(\d+)$")


@dataclass(frozen=True)
class Timing:
    """Wall-clock statistics of ``repeats`` timed calls of one operation (milliseconds)."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    repeats: int


@dataclass(frozen=True)
class Machine:
    """The machine and software a profile was measured with."""

    cpu: str  # CPU model name
    cores: int  # logical CPUs visible to the process
    gpu: str  # GPU name, "" when there is none (or none could be identified)
    os: str
    python: str
    numpy: str
    onnxruntime: str
    postdiff: str
    provider: str  # a name from postdiff.runtime.runners.providers: cpu | cuda | tensorrt | openvino
    precision: str = "fp32"  # the inference precision the UNet graphs ran at (as the backend reported it)
    openvino: str = ""  # OpenVINO version, when the provider is openvino


@dataclass(frozen=True)
class PrecisionTimings:
    """The UNet graphs timed at one further inference precision (as ``graphs`` and ``interleaved``,
    the round-robin over the UNet graphs at that precision)."""

    graphs: dict[str, Timing]
    interleaved: dict[str, Timing]


@dataclass(frozen=True)
class BundleRef:
    """Which bundle was profiled."""

    source: str  # the model the bundle was exported from (manifest model.source)
    manifest_sha256: str  # sha256 of the manifest's canonical text (= manifest.json as exported)
    schedules: tuple[str, ...] = ()  # the schedules the bundle was exported for


@dataclass(frozen=True)
class DeviceProfile:
    """Measured costs of every graph and runtime operation of one bundle on one device."""

    format_version: int
    created: str
    machine: Machine
    bundle: BundleRef
    weights: str  # one of WEIGHTS_MODES
    warmup: int
    graphs: dict[str, Timing]  # back-to-back calls of the same graph: steady state
    # Round-robin calls over all graphs, so each call follows a call of another graph, as when a schedule
    # alternates graphs. On CPUs this costs more: the previous session's worker threads still spin.
    interleaved: dict[str, Timing]
    scheduler_step: dict[str, dict[str, Timing]]
    switch: dict[str, Timing]
    peak_rss_mb: float
    peak_gpu_mb: float | None = None
    # The DDIM step timed right after a call of a UNet graph at that latent size, as in generation.
    # On CPUs it costs more than in scheduler_step's tight loop: the graph's data has pushed the
    # runtime's out of the caches. Profiles written before it existed lack it (and predict without it).
    step_after_graph: dict[str, Timing] = field(default_factory=dict)
    # The UNet graphs at every other precision the backend runs on this machine, by precision name
    # (``graphs``/``interleaved`` are at ``machine.precision``). Profiles written before it lack it.
    precisions: dict[str, PrecisionTimings] = field(default_factory=dict)

    def tables(self, precision: str | None) -> tuple[dict[str, Timing], dict[str, Timing]] | None:
        """(back-to-back, interleaved) timings of the UNet graphs at ``precision`` (None: the main
        tables), or None when the profile has none at that precision."""
        if precision is None or precision == self.machine.precision:
            return self.graphs, self.interleaved
        extra = self.precisions.get(precision)
        return None if extra is None else (extra.graphs, extra.interleaved)


def size_key(latent: tuple[int, int]) -> str:
    """``(h, w)`` -> ``"hxw"``, the key of ``scheduler_step`` entries."""
    return f"{latent[0]}x{latent[1]}"


def switch_key(low: tuple[int, int], high: tuple[int, int]) -> str:
    """The ``switch`` key of a switch from latent size ``low`` to ``high``: ``"hxw->HxW"``."""
    return f"{size_key(low)}->{size_key(high)}"


def dump_device_profile(profile: DeviceProfile) -> str:
    """The deterministic JSON text of a profile (sorted keys, trailing newline)."""
    return dumps(profile)


def load_device_profile(path: Path) -> DeviceProfile:
    """Read and check a device profile written by ``postdiff profile``.

    Raises:
        InputError: naming ``path``, for a missing or malformed file, an unsupported format
            version, an unknown or missing key, or an impossible value.
    """
    path = Path(path)
    profile = load_versioned(DeviceProfile, path, FORMAT_VERSION, InputError,
                             "re-run `postdiff profile` with this postdiff")
    validate_device_profile(profile, str(path))
    return profile


def validate_device_profile(profile: DeviceProfile, where: str = "device profile") -> None:
    """Check the values the types cannot (InputError naming the entry)."""
    fix = "re-run `postdiff profile` instead of editing the file by hand"
    if profile.weights not in WEIGHTS_MODES:
        raise InputError(f"{where}: weights '{profile.weights}' is not one of {list(WEIGHTS_MODES)}; {fix}")
    if profile.warmup < 0:
        raise InputError(f"{where}: warmup {profile.warmup} is negative; {fix}")
    if not profile.graphs:
        raise InputError(f"{where}: graphs is empty; expected a timing per graph of the bundle; {fix}")
    if set(profile.interleaved) != set(profile.graphs):
        raise InputError(f"{where}: interleaved has graphs {sorted(profile.interleaved)} but graphs has "
                         f"{sorted(profile.graphs)}; expected the same graphs in both; {fix}")
    timings = [(f"graphs.{name}", t) for name, t in profile.graphs.items()]
    timings += [(f"interleaved.{name}", t) for name, t in profile.interleaved.items()]
    for scheduler, sizes in profile.scheduler_step.items():
        for size, timing in sizes.items():
            if not _SIZE.match(size):
                raise InputError(f"{where}: scheduler_step.{scheduler} key '{size}' is not HxW; {fix}")
            timings.append((f"scheduler_step.{scheduler}.{size}", timing))
    for size, timing in profile.step_after_graph.items():
        if not _SIZE.match(size):
            raise InputError(f"{where}: step_after_graph key '{size}' is not HxW; {fix}")
        timings.append((f"step_after_graph.{size}", timing))
    for precision, extra in profile.precisions.items():
        if set(extra.interleaved) != set(extra.graphs) or not set(extra.graphs) <= set(profile.graphs):
            raise InputError(f"{where}: precisions.{precision} must time the same graphs in graphs and interleaved, "
                             f"all of them graphs of the bundle; {fix}")
        timings += [(f"precisions.{precision}.graphs.{name}", t) for name, t in extra.graphs.items()]
        timings += [(f"precisions.{precision}.interleaved.{name}", t) for name, t in extra.interleaved.items()]
    for pair, timing in profile.switch.items():
        if not _PAIR.match(pair):
            raise InputError(f"{where}: switch key '{pair}' is not hxw->HxW; {fix}")
        timings.append((f"switch.{pair}", timing))
    for name, timing in timings:
        _check_timing(timing, f"{where}: {name}", fix)
    for name, value in (("peak_rss_mb", profile.peak_rss_mb), ("peak_gpu_mb", profile.peak_gpu_mb)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise InputError(f"{where}: {name} {value} is not a non-negative number; {fix}")


def _check_timing(timing: Timing, where: str, fix: str) -> None:
    values = (timing.min_ms, timing.p10_ms, timing.median_ms, timing.p90_ms)
    if timing.repeats < 1:
        raise InputError(f"{where}: repeats {timing.repeats} is below 1; {fix}")
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise InputError(f"{where}: times {list(values)} must be finite and non-negative; {fix}")
    if not values[0] <= values[1] <= values[2] <= values[3]:
        raise InputError(f"{where}: expected min_ms <= p10_ms <= median_ms <= p90_ms, got {list(values)}; {fix}")
