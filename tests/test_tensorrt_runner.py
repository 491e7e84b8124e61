"""The native TensorRT runner and `postdiff check` cannot run here (no GPU): what can be checked without one
is that they import torch-free and stop with one clear line and exit 2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from postdiff.cli import main
from postdiff.runtime.engines import NoGpu, gpu_compute_capability


def _has_gpu() -> bool:
    try:
        gpu_compute_capability()
    except NoGpu:
        return False
    return True


no_gpu = pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU: run `postdiff check` instead")


def test_runner_module_imports_without_tensorrt_or_gpu() -> None:
    from postdiff.runtime.runners import tensorrt

    assert tensorrt.TensorRTRunner.__doc__


@no_gpu
@pytest.mark.skipif(importlib.util.find_spec("cuda") is None, reason="cuda-python is not installed")
def test_no_gpu_is_one_line_exit_2(tiny_bundle: Path, capsys) -> None:
    assert main(["check", str(tiny_bundle), "--provider", "tensorrt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU" in err


def test_generate_with_tensorrt_needs_compiled_engines(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    code = main(["generate", str(tiny_bundle), "--prompt", "a cat", "--steps", "2", "--provider", "tensorrt",
                 "--out", str(tmp_path / "x.png"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "postdiff compile" in err and not (tmp_path / "x.png").exists()


def test_profile_selection_takes_static_and_ranged_profiles() -> None:
    """The runner picks, without a GPU, the first profile whose ranges hold the fed shapes."""
    from postdiff.errors import InputError
    from postdiff.runtime.engines import Profile, ShapeRange
    from postdiff.runtime.runners.tensorrt import _Engine

    engine = _Engine.__new__(_Engine)  # no deserialization: only the profiles matter here
    engine.profiles = (
        Profile(serves=("unet-32x32-b1",), shapes={"sample": ShapeRange((1, 4, 32, 32), (1, 4, 32, 32), (1, 4, 32, 32))}),
        Profile(serves=("unet-16x16-b2", "unet-32x32-b2"),
                shapes={"sample": ShapeRange((2, 4, 16, 16), (2, 4, 32, 32), (2, 4, 32, 32))}),
    )
    assert engine.select_profile({"sample": (1, 4, 32, 32), "timestep": (1,)}) == 0
    assert engine.select_profile({"sample": (2, 4, 16, 16)}) == 1
    assert engine.select_profile({"sample": (2, 4, 24, 32)}) == 1
    with pytest.raises(InputError, match="no optimization profile"):
        engine.select_profile({"sample": (1, 4, 16, 16)})
    with pytest.raises(InputError, match="no optimization profile"):
        engine.select_profile({"sample": (2, 4, 48, 48)})
