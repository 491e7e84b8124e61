"""`postdiff compile`: TensorRT-RTX engines built ahead of time on this CPU, cached by key, atomic; the
merged UNet graph becomes one engine serving every UNet variant of the schedule."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from postdiff.cli import main
from postdiff.tools import compile as compile_module
from postdiff.runtime.engines import BackendMissing, import_backend
from postdiff.tools.compile import CompileOptions, compile_bundle, target_of
from postdiff.runtime.engines import load_engines
from postdiff.errors import BundleError, InputError
from postdiff.runtime.executor import resolve_graphs
from postdiff.runtime.manifest import load_manifest
from postdiff.profiles.presets import resolve_schedule

needs_rtx = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                               reason="needs the tensorrt-rtx extra (pip install 'postdiff[tensorrt-rtx]')")


@pytest.fixture(scope="module")
def sd15_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sd exported for postdiff-sd15 with the merged UNet graph (compile writes into it)."""
    from postdiff.exporter.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("compile") / "tiny-sd15"
    export_bundle(ExportOptions(source="random:tiny-sd", out=out, schedules=("postdiff-sd15",), merged=True),
                  progress=False)
    return out


@needs_rtx
def test_compile_serves_every_unet_variant_from_one_engine(sd15_bundle: Path, capsys) -> None:
    # --opt-level 0 keeps the CI build short; the engines hold the same layers and weights
    code = main(["compile", str(sd15_bundle), "--backend", "tensorrt-rtx", "--sm", "86", "--opt-level", "0", "--quiet"])
    assert code == 0, capsys.readouterr().err
    manifest = load_manifest(sd15_bundle)
    index = load_engines(sd15_bundle, manifest)
    assert sorted(index.engines) == ["text_encoder", "unet-merged", "vae_decoder"]
    assert index.target == "sm86" and index.backend == "tensorrt-rtx"
    for entry in index.engines.values():
        assert (sd15_bundle / "engines" / entry.file).stat().st_size == entry.bytes > 0
    wanted = {ref.name for ref in resolve_graphs(manifest, resolve_schedule("postdiff-sd15"), "variants").values()}
    merged = index.engines["unet-merged"]
    assert set(merged.serves) == wanted and index.engine_for("unet-merged") == "unet-merged"
    assert all(index.engine_for(name) == "unet-merged" for name in wanted)
    # one static profile per (latent, batch) the schedule runs, each naming the variants it serves
    sizes = {(s.variant.latent, s.variant.batch) for s in manifest.graph("unet-merged").merged.serves}
    assert len(merged.profiles) == len(sizes)
    assert sorted(v for p in merged.profiles for v in p.serves) == sorted(wanted)
    assert all(r.min == r.opt == r.max for p in merged.profiles for r in p.shapes.values())

    # An unchanged key is reused: a second run builds nothing and leaves the engines as they were.
    before = {p.name: p.stat().st_mtime_ns for p in (sd15_bundle / "engines").iterdir()}
    report = compile_bundle(CompileOptions(sd15_bundle, backend="tensorrt-rtx", sm=86, opt_level=0), progress=False)
    assert report.built == [] and sorted(report.reused) == sorted(index.engines)
    assert {p.name: p.stat().st_mtime_ns for p in (sd15_bundle / "engines").iterdir()} == before

    # engines.json written for another manifest is named stale, with both hashes.
    path = sd15_bundle / "engines" / "engines.json"
    data = json.loads(path.read_text())
    data["manifest_sha256"] = "0" * 64
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="stale.*000000000000.*run `postdiff compile"):
        load_engines(sd15_bundle)


@needs_rtx
def test_interrupted_compile_leaves_no_half_engine(sd15_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(sd15_bundle, bundle, ignore=shutil.ignore_patterns("engines"))
    built = []
    real = compile_module._build

    def interrupt_second(*args, **kwargs):
        if built:
            raise KeyboardInterrupt
        built.append(args[4].name)  # _build(trt, backend, sm, onnx_path, plan, ...)
        return real(*args, **kwargs)

    monkeypatch.setattr(compile_module, "_build", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        compile_bundle(CompileOptions(bundle, backend="tensorrt-rtx", sm=86, opt_level=0), progress=False)
    files = sorted(p.name for p in (bundle / "engines").iterdir())
    assert not [f for f in files if "partial" in f]
    assert list(load_engines(bundle).engines) == built  # what finished is listed and reusable


@pytest.mark.parametrize("mode", ["static", "batch", "one"])
def test_merged_profiles_hold_every_served_shape(sd15_bundle: Path, mode: str) -> None:
    """Each served variant is in exactly one profile, whose ranges hold every input and placeholder it
    feeds; ranged modes have fewer profiles (fewer kernels: docs/tensorrt.md)."""
    manifest = load_manifest(sd15_bundle)
    spec = manifest.graph("unet-merged")
    served = list(spec.merged.serves)
    profiles = compile_module.merged_profiles(spec, served, mode)
    expected = {"static": len({(s.variant.latent, s.variant.batch) for s in served}),
                "batch": len({s.variant.batch for s in served}), "one": 1}[mode]
    assert len(profiles) == expected
    for s in served:
        holding = [p for p in profiles if compile_module.variant_name(s.variant) in p.serves]
        assert len(holding) == 1
        for tensor in (*s.inputs, *s.placeholders):
            r = holding[0].shapes.get(tensor.name)
            if r is None:
                assert -1 not in spec.input(tensor.name).shape  # only free inputs are profiled
                continue
            assert all(lo <= d <= hi for lo, d, hi in zip(r.min, tensor.shape, r.max)), (mode, tensor.name)
            assert r.opt == r.max and (mode != "static" or r.min == r.max)
    with pytest.raises(InputError, match="--profiles 'dynamic' is not one of"):
        compile_module.merged_profiles(spec, served, "dynamic")


def test_compile_option_errors(tiny_bundle: Path) -> None:
    with pytest.raises(InputError, match="not one of"):
        import_backend("onnx")
    with pytest.raises(InputError, match=r"--sm 87 is not a TensorRT-RTX target.*86"):
        target_of(CompileOptions(tiny_bundle, backend="tensorrt-rtx", sm=87))
    with pytest.raises(InputError, match="--sm works with --backend tensorrt-rtx only"):
        target_of(CompileOptions(tiny_bundle, backend="tensorrt", sm=86))
    with pytest.raises(InputError, match="--merged"):
        compile_module.plan_engines(load_manifest(tiny_bundle), [], "merged")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_missing_tensorrt_exits_2_naming_the_install(tiny_bundle: Path, capsys) -> None:
    with pytest.raises(BackendMissing, match="python3-libnvinfer|pip install tensorrt"):
        import_backend("tensorrt")
    assert main(["compile", str(tiny_bundle), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not installed" in err
