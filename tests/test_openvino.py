"""The OpenVINO provider: same results as ONNX Runtime at fp32, bf16 only where the CPU has it, the
precision that ran reported, one provider registry, and a clear exit-2 error without openvino."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from postdiff.cli import build_parser, main
from postdiff.errors import InputError
from postdiff.runtime.runners import openvino as ov_runner
from postdiff.runtime.runners.providers import PROVIDERS, provider_names


def _choices(command: str, flag: str) -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return list(next(a for a in sub._actions if flag in a.option_strings).choices)


def test_cli_provider_choices_come_from_the_registry() -> None:
    assert "openvino" in PROVIDERS and PROVIDERS["openvino"].backend == "openvino"
    for command in ("generate", "profile", "bench"):
        assert _choices(command, "--provider") == provider_names()


MISSING = """
import sys
sys.modules["openvino"] = None  # as if the package were not installed
from postdiff.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_missing_openvino_is_a_usage_error_naming_the_install(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    result = subprocess.run([sys.executable, "-c", MISSING, "generate", str(tiny_bundle), "--prompt", "a cat",
                             "--steps", "2", "--provider", "openvino", "--out", str(out), "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "postdiff[openvino]" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_onnxruntime_refuses_bf16(capsys, tiny_bundle: Path, tmp_path: Path) -> None:
    code = main(["generate", str(tiny_bundle), "--prompt", "a cat", "--steps", "2", "--precision", "bf16",
                 "--out", str(tmp_path / "x.png"), "--quiet"])
    assert code == 2 and "needs --provider openvino" in capsys.readouterr().err


class _FakeCore:
    """An openvino.Core stand-in reporting a chosen CPU capability set."""

    def __init__(self, capabilities: list[str], default: str) -> None:
        self._properties = {"OPTIMIZATION_CAPABILITIES": capabilities, "INFERENCE_PRECISION_HINT": default}

    def get_property(self, device: str, name: str):
        assert device == "CPU"
        return self._properties[name]


def test_bf16_only_where_the_cpu_has_it(monkeypatch) -> None:
    monkeypatch.setattr(ov_runner, "core", lambda: _FakeCore(["FP32", "INT8"], "f32"))
    assert ov_runner.cpu_precisions() == ("fp32",)
    assert ov_runner.resolve_precision("auto") == "fp32"
    with pytest.raises(InputError, match="no native bf16"):
        ov_runner.resolve_precision("bf16")
    monkeypatch.setattr(ov_runner, "core", lambda: _FakeCore(["FP32", "BF16", "INT8"], "bf16"))
    assert ov_runner.cpu_precisions() == ("fp32", "bf16")
    assert ov_runner.resolve_precision("auto") == "bf16" and ov_runner.resolve_precision("fp32") == "fp32"
    with pytest.raises(InputError, match="fp8"):
        ov_runner.resolve_precision("fp8")


@pytest.fixture(scope="module")
def openvino_available():
    return pytest.importorskip("openvino")


def _generate(bundle: Path, provider: str, precision: str, schedule=None, shared=None, keep=None):
    from postdiff.runtime.pipeline import GenerateOptions, Pipeline
    from postdiff.profiles.presets import resolve_schedule

    pipeline = Pipeline(bundle, provider=provider, precision=precision, threads=1, shared_weights=shared)
    plan = resolve_schedule(schedule) if schedule else None
    steps = len(plan.steps) if plan else 3
    result = pipeline.generate(GenerateOptions(prompt="a cat", steps=steps, seed=3), schedule=plan)
    if keep is not None:
        keep.append(pipeline)
    return result.latents, pipeline.precisions


@pytest.fixture(scope="module")
def onnxruntime_postdiff(tiny_postdiff_bundle):
    return _generate(tiny_postdiff_bundle, "cpu", "auto", "postdiff-sd15")[0]


@pytest.mark.parametrize("shared", [True, False], ids=["one-compiled-model", "one-per-graph"])
def test_openvino_fp32_matches_onnxruntime_on_a_postdiff_schedule(openvino_available, tiny_postdiff_bundle,
                                                                 onnxruntime_postdiff, shared: bool) -> None:
    from postdiff.runtime.runners.openvino_set import OpenVinoVariantSet

    kept: list = []
    theirs, ran_ov = _generate(tiny_postdiff_bundle, "openvino", "fp32", "postdiff-sd15", shared, kept)
    assert set(ran_ov.values()) == {"fp32"} and len(ran_ov) >= 5  # text encoder, decoder, several UNet variants
    np.testing.assert_allclose(theirs, onnxruntime_postdiff, atol=1e-4, rtol=0)
    sets = {id(r._owner) for r in kept[0]._runners.values() if hasattr(r, "_owner")}
    assert len(sets) == (1 if shared else 0)  # shared: every UNet graph is a branch of one compiled model
    if shared:
        variants = kept[0]._variant_sets["fp32"]
        assert isinstance(variants, OpenVinoVariantSet) and kept[0].weights_mode == "shared"
        assert variants.names == sorted(n for n, g in kept[0].manifest.graphs.items() if g.variant is not None)
        assert variants.shared_constants > 0  # the graphs' common weights are one Constant each


def test_bf16_runs_and_is_reported_where_the_cpu_has_it(openvino_available, tiny_bundle: Path) -> None:
    if "bf16" not in ov_runner.cpu_precisions():
        with pytest.raises(InputError, match="no native bf16"):
            _generate(tiny_bundle, "openvino", "bf16")
        return
    fp32, _ = _generate(tiny_bundle, "openvino", "fp32")
    bf16, ran = _generate(tiny_bundle, "openvino", "bf16")
    assert set(ran.values()) == {"bf16"}
    drift = np.linalg.norm(bf16 - fp32) / np.linalg.norm(fp32)
    assert 1e-5 < drift < 0.2  # really lower precision (fp32 reproduces ORT to 1e-6), yet the same image


def test_bench_rows_per_provider_with_drift_against_onnxruntime(openvino_available, tiny_bundle: Path) -> None:
    from postdiff.tools.bench import BenchOptions, bench, format_report

    report = bench(BenchOptions(bundle=tiny_bundle, schedules=("fewer-steps",), repeats=1, diffusers=False,
                                providers=("cpu", "openvino"), precisions=("fp32",)), progress=False)
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == ["runtime:baseline", "runtime:fewer-steps", "openvino-fp32:baseline",
                          "openvino-fp32:fewer-steps"]
    for label in ("openvino-fp32:baseline", "openvino-fp32:fewer-steps"):
        assert rows[label]["provider"] == "openvino" and rows[label]["precision"] == "fp32"
        assert rows[label]["rel_l2_vs_reference"] < 1e-4  # fp32 OpenVINO = fp32 ONNX Runtime
    assert rows["runtime:baseline"]["rel_l2_vs_baseline"] == 0.0
    assert rows["openvino-fp32:fewer-steps"]["rel_l2_vs_baseline"] > 1e-3  # fewer steps: another image
    assert report["openvino"] and "openvino-fp32:fewer-steps" in format_report(report)
