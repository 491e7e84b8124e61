"""Shared fixtures: one tiny bundle per test session, built from `random:tiny-sd`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fp32 bundle of the tiny random SD model at its default 32x32 resolution (read-only: copy
    it before changing anything)."""
    from postdiff.exporter.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(ExportOptions(source="random:tiny-sd", out=out), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_model():
    """The torch modules behind `tiny_bundle` (same seeded weights)."""
    from postdiff.exporter.models import load_model

    return load_model("random:tiny-sd")


PRESETS = ("baseline", "fewer-steps", "postdiff-sd15", "postdiff-beta34")


@pytest.fixture(scope="session")
def tiny_postdiff_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of the tiny model with every UNet variant the shipped presets need."""
    from postdiff.exporter.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-postdiff"
    export_bundle(ExportOptions(source="random:tiny-sd", out=out, schedules=PRESETS), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_merged_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with every variant of the shipped presets, per-variant graphs and the merged UNet
    graph (`export --merged`)."""
    from postdiff.exporter.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-merged"
    export_bundle(ExportOptions(source="random:tiny-sd", out=out, schedules=PRESETS, merged=True), progress=False)
    return out


@pytest.fixture(scope="session")
def device(tiny_postdiff_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A device profile of `tiny_postdiff_bundle` measured on this machine (2 timed calls per graph)."""
    from postdiff.runtime.jsonio import write_json_atomic
    from postdiff.tools.profiler import profile_bundle

    path = tmp_path_factory.mktemp("device") / "device.json"
    write_json_atomic(path, profile_bundle(tiny_postdiff_bundle, repeats=2, warmup=1, progress=False))
    return path
