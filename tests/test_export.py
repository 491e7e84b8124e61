"""The exporter writes a complete, deterministic bundle, or nothing at all."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from postdiff.exporter import export as export_module
from postdiff.exporter.export import ExportOptions, export_bundle
from postdiff.runtime import names
from postdiff.errors import InputError, ParityError
from postdiff.runtime.manifest import load_manifest, sha256_file


def test_manifest_describes_every_graph(tiny_bundle: Path) -> None:
    manifest = load_manifest(tiny_bundle)
    # plain generation's graph, and its batch-1 twin for guidance off
    assert set(manifest.graphs) == {names.TEXT_ENCODER, "unet-16x16-b2", "unet-16x16-b1", names.VAE_DECODER}
    assert manifest.graph("unet-16x16-b1").input(names.SAMPLE).shape == (1, 4, 16, 16)
    unet = manifest.graph("unet-16x16-b2")
    assert unet.role == names.UNET and unet.variant.latent == (16, 16) and unet.variant.batch == 2
    assert [t.name for t in unet.inputs] == [names.SAMPLE, names.TIMESTEP, names.CONTEXT]
    assert unet.input(names.SAMPLE).shape == (2, 4, 16, 16)
    assert unet.outputs[0].name == names.NOISE_PRED and unet.outputs[0].dtype == "float32"
    assert unet.initializers and set(unet.initializers.values()) <= set(manifest.weights.tensors)
    assert unet.macs > 0
    assert manifest.model.height == manifest.model.width == 32
    for graph in manifest.graphs.values():
        assert graph.sha256 == sha256_file(tiny_bundle / graph.file)
        assert graph.parity.max_abs_diff <= graph.parity.tolerance * max(1.0, graph.parity.reference_max_abs)
    assert {"postdiff", "torch", "diffusers", "onnx_opset"} <= set(manifest.producer)
    assert manifest.scheduler["beta_schedule"] == "scaled_linear"


def test_unet_weights_live_in_one_shared_file(tiny_bundle: Path) -> None:
    unet_onnx = (tiny_bundle / "unet-16x16-b2.onnx").stat().st_size
    weights = (tiny_bundle / "unet.weights").stat().st_size
    assert weights > 10 * unet_onnx  # the graph holds structure, the weights file the parameters
    files = sorted(p.name for p in tiny_bundle.iterdir() if p.name != "verified.json")  # loads add the stamp
    assert files == ["manifest.json", "text_encoder.onnx", "tokenizer.json", "unet-16x16-b1.onnx",
                     "unet-16x16-b2.onnx", "unet.weights", "vae_decoder.onnx"]


def test_export_is_deterministic(tiny_bundle: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    export_bundle(ExportOptions(source="random:tiny-sd", out=again), progress=False)
    assert (again / "manifest.json").read_bytes() == (tiny_bundle / "manifest.json").read_bytes()
    assert (again / "manifest.json").read_text().endswith("}\n")


def test_failed_export_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise ParityError("simulated parity failure")

    monkeypatch.setattr(export_module, "measure_parity", broken)
    out = tmp_path / "bundle"
    with pytest.raises(ParityError):
        export_bundle(ExportOptions(source="random:tiny-sd", out=out), progress=False)
    assert os.listdir(tmp_path) == []


def test_existing_destination_is_refused_untouched(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        export_bundle(ExportOptions(source="random:tiny-sd", out=out), progress=False)
    assert os.listdir(out) == ["keep.txt"]


def test_fp16_export_runs_and_records_precision(tmp_path: Path) -> None:
    out = tmp_path / "fp16"
    manifest = export_bundle(ExportOptions(source="random:tiny-sd", out=out, precision="fp16"), progress=False)
    unet = manifest.graph("unet-16x16-b2")
    assert unet.precision == "fp16" and unet.input(names.SAMPLE).dtype == "float16"
    assert json.loads((out / "manifest.json").read_text())["graphs"]["text_encoder"]["precision"] == "fp32"
