"""The device side never imports torch or diffusers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

FORBIDDEN = ("torch", "diffusers", "transformers", "onnx_graphsurgeon", "ray")

CHECK = """
import sys
from postdiff.cli import main
code = main(sys.argv[1:])
leaked = sorted(m for m in {forbidden!r} if m in sys.modules)
print("LEAKED", leaked)
sys.exit(code)
"""


def test_generate_runs_without_importing_torch(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "img.png"
    result = subprocess.run(
        [sys.executable, "-c", CHECK.format(forbidden=FORBIDDEN), "generate", str(tiny_bundle), "--prompt", "a cat",
         "--steps", "2", "--out", str(out), "--quiet"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "LEAKED []" in result.stdout
    assert out.is_file()


def test_bench_without_diffusers_runs_without_importing_torch(tiny_bundle: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHECK.format(forbidden=FORBIDDEN), "bench", "--bundle", str(tiny_bundle), "--schedule",
         "fewer-steps", "--no-diffusers", "--repeats", "1", "--quiet"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "LEAKED []" in result.stdout and "runtime:fewer-steps" in result.stdout


def test_compile_runs_without_importing_torch(tiny_bundle: Path) -> None:
    """`postdiff compile` is a build tool (tools/compile.py), but it runs on the device (a Jetson builds
    its own engines): it must not need torch either. --sm 1 stops it after the bundle, the schedule and
    the TensorRT module are loaded, before any build."""
    result = subprocess.run(
        [sys.executable, "-c", CHECK.format(forbidden=FORBIDDEN) .replace("sys.exit(code)",
         "print('COMPILER', 'postdiff.tools.compile' in sys.modules)\nsys.exit(code)"),
         "compile", str(tiny_bundle), "--backend", "tensorrt-rtx", "--sm", "1", "--schedule", "postdiff-sd15",
         "--quiet"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2, result.stderr
    assert "LEAKED []" in result.stdout and "COMPILER True" in result.stdout, result.stdout


def test_every_runtime_module_imports_without_torch() -> None:
    runtime = Path(__file__).resolve().parents[1] / "runtime"
    modules = sorted(
        "postdiff.runtime." + ".".join(p.relative_to(runtime).with_suffix("").parts)
        for p in runtime.rglob("*.py") if p.name != "__init__.py"
    )
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n" \
           f"print(sorted(m for m in {FORBIDDEN!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_runtime_imports_nothing_from_the_workstation_side() -> None:
    """The runtime is the device side: no module of it may import profiles, exporter or tools (the
    command line and tools import the runtime, never the other way round)."""
    runtime = Path(__file__).resolve().parents[1] / "runtime"
    offenders = []
    for path in sorted(runtime.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(runtime)}: {name}" for name in targets
                          if name.split(".")[:2] in (["postdiff", "profiles"], ["postdiff", "exporter"],
                                                     ["postdiff", "tools"], ["postdiff", "cli"])]
    assert offenders == []
