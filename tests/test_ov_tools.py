"""The OpenVINO measurement tools judge what they are given: ov_merged_check flags a wrong branch, and
ov_memory reports a form killed or stalled under its memory limit as not fitting.

Both are tested without relying on what OpenVINO computes or on cgroup write access: the merged-graph
check is handed ONNX Runtime (right) or a runner made wrong on purpose in OpenVINO's place, and
ov_memory's outcome reporting is handed processes that die or hang as a form under a limit would.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from postdiff.runtime.runners.ort import OrtRunner
from postdiff.tools import ov_memory, ov_merged_check


class _WrongFirstCall(OrtRunner):
    """ONNX Runtime on the merged graph whose first call's ``noise_pred`` is off (the failure the
    check exists for: the first call of a fresh compiled model was wrong)."""

    def __init__(self, spec, bundle: Path, precision: str) -> None:
        super().__init__(spec, bundle)
        self.calls = 0

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = super()._infer(feed)
        self.calls += 1
        if self.calls == 1:
            outputs = {name: value * 1.01 if "noise_pred" in name else value for name, value in outputs.items()}
        return outputs


def _right(spec, bundle: Path, precision: str) -> OrtRunner:
    return OrtRunner(spec, bundle)


def test_merged_check_agrees_with_a_right_backend(tiny_merged_bundle: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(ov_merged_check, "OpenVinoRunner", _right)
    assert ov_merged_check.check_first_calls(tiny_merged_bundle, ["baseline", "postdiff-sd15"], "fp32")
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith("first call ") for line in lines)


def test_merged_check_flags_a_wrong_first_call(tiny_merged_bundle: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(ov_merged_check, "OpenVinoRunner", _WrongFirstCall)
    assert not ov_merged_check.check_first_calls(tiny_merged_bundle, ["postdiff-sd15"], "fp32")
    # every fresh compiled model was wrong on its first call only: 1% relative, reported per line
    for line in capsys.readouterr().out.splitlines():
        assert "(the first call itself 1.0e-02;" in line
    # bf16 is reported, never judged
    assert ov_merged_check.check_first_calls(tiny_merged_bundle, ["baseline"], "bf16")


def _outcome(code: str, limit_x: float | None) -> dict:
    return json.loads(ov_memory._run_one([sys.executable, "-c", code], "ov-set", "fp32", limit_x))


def test_memory_reports_a_form_the_kernel_killed_as_not_fitting() -> None:
    outcome = _outcome("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 1.3)
    assert outcome == {"form": "ov-set", "precision": "fp32", "limit_x": 1.3, "fits": False,
                       "error": "killed by the kernel: does not fit under the limit"}


def test_memory_reports_a_stalled_form_as_not_fitting(monkeypatch) -> None:
    monkeypatch.setattr(ov_memory, "LIMIT_TIMEOUT_S", 0.5)
    outcome = _outcome("import time; time.sleep(30)", 1.5)
    assert outcome["fits"] is False and "not done after 0.5 s" in outcome["error"]


@pytest.mark.parametrize("limit_x", [None, 1.3])
def test_memory_passes_a_measurement_through_and_reports_a_crash(limit_x) -> None:
    assert _outcome("print('{\"form\": \"ov-set\", \"fits\": true}')", limit_x) == {"form": "ov-set", "fits": True}
    crashed = _outcome("raise SystemExit('no bundle here')", limit_x)
    assert crashed == {"form": "ov-set", "precision": "fp32", "error": ["no bundle here"]}


def test_memory_measures_chosen_graphs_as_one_variant_set(tiny_postdiff_bundle: Path) -> None:
    pytest.importorskip("openvino")
    from postdiff.errors import InputError
    from postdiff.runtime.manifest import load_manifest

    manifest = load_manifest(tiny_postdiff_bundle, verify=False)
    graphs = sorted(name for name in manifest.graphs if name.startswith("unet-"))[:2]
    figures = ov_memory.measure_one(tiny_postdiff_bundle, "ov-set", "fp32", graphs=graphs)
    assert figures["graphs"] == 2 and figures["precision"] == ["fp32"]
    assert 0 < figures["x_weights_private_after_loading"] and 0 < figures["x_weights_held_private"]
    with pytest.raises(InputError, match="--forms ov-set"):
        ov_memory.measure_one(tiny_postdiff_bundle, "ort", "fp32", graphs=graphs)
