"""Every command's exit status (README "Exit status", and every --help): 2 bad input or usage; 1 a
verification, parity or runtime failure; 130 interrupted. A missing optional extra is one line naming
it, and export rejects bad arguments before it imports torch."""

from __future__ import annotations

import importlib
import json
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from postdiff import cli
from postdiff.cli import main
from test_runtime_is_torch_free import CHECK, FORBIDDEN

COMMANDS = ("export", "generate", "verify", "compile", "check", "schedule", "bench", "profile", "tune", "demo")
ROOT = Path(__file__).resolve().parents[1]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse: usage errors and --help
        code = int(exc.code)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out + captured.err


def test_the_parser_has_exactly_these_commands() -> None:
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert tuple(commands) == COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_help_documents_the_exit_codes(capsys, command: str) -> None:
    code, text = run(capsys, command, "--help")
    flat = " ".join(text.split())
    assert code == 0 and "exit status: 0 success; 1 a verification, parity or runtime failure" in flat
    assert "2 bad input or usage" in flat and "130 interrupted" in flat


@pytest.fixture()
def corrupted(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A copy of the tiny bundle whose VAE decoder no longer matches its sha256."""
    copy = tmp_path / "corrupted"
    shutil.copytree(tiny_bundle, copy)
    with open(copy / "vae_decoder.onnx", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00garbage\x00")
    return copy


def bad_input(command: str, tmp: Path) -> list[str]:
    """Arguments each command rejects as bad input, before any heavy work."""
    missing = str(tmp / "no-bundle")
    return {
        "export": ["export", "random:tiny-sd", "--out", str(tmp / "b"), "--resolution", "abc"],
        "generate": ["generate", missing, "--prompt", "a cat", "--out", str(tmp / "x.png")],
        "verify": ["verify", missing],
        "compile": ["compile", missing, "--backend", "tensorrt-rtx", "--sm", "86"],
        "check": ["check", missing, "--provider", "cuda"],
        "schedule": ["schedule", "--steps", "8", "--xattn-gate", "9", "--out", str(tmp / "s.json")],
        "bench": ["bench", "--bundle", missing, "--repeats", "0"],
        "profile": ["profile", missing, "--out", str(tmp / "d.json")],
        "tune": ["tune", missing, "--device", str(tmp / "d.json"), "--speedup", "2", "--out", str(tmp / "s.json")],
        "demo": ["demo", "--samples", "1", "--out", str(tmp / "demo")],
    }[command]


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_input_exits_2(capsys, command: str, tmp_path: Path) -> None:
    argv = bad_input(command, tmp_path) + ([] if command in ("schedule", "verify") else ["--quiet"])  # no bar
    code, text = run(capsys, *argv)
    assert code == 2 and f"postdiff {command}: error:" in text
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_bad_usage_exits_2(capsys) -> None:
    for argv in (["frobnicate"], ["generate", "--prompt", "x"], ["export", "digits", "--out", "b", "--precision",
                                                                   "fp8"]):
        code, text = run(capsys, *argv)
        assert code == 2 and "usage: postdiff" in text


@pytest.mark.parametrize("command", ["generate", "bench", "profile", "tune", "demo"])
def test_a_corrupted_bundle_is_refused_with_2(capsys, command: str, corrupted: Path, tmp_path: Path) -> None:
    argv = {
        "generate": ["generate", str(corrupted), "--prompt", "a cat", "--steps", "2", "--out", str(tmp_path / "x.png")],
        "bench": ["bench", "--bundle", str(corrupted), "--schedule", "fewer-steps", "--no-diffusers", "--repeats", "1"],
        "profile": ["profile", str(corrupted), "--out", str(tmp_path / "d.json")],
        "tune": ["tune", str(corrupted), "--device", str(tmp_path / "d.json"), "--speedup", "2",
                 "--out", str(tmp_path / "s.json")],
        "demo": ["demo", "--samples", "2", "--out", str(tmp_path / "demo")],
    }[command]
    if command == "demo":  # the demo reuses a bundle of its model that is already in --out
        from postdiff.tools.demo import demo_schedules

        (tmp_path / "demo").mkdir()
        shutil.move(corrupted, tmp_path / "demo" / "bundle")
        manifest_path = tmp_path / "demo" / "bundle" / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["model"]["source"] = "digits"
        manifest["schedules"] = [schedule.name for _, _, schedule in demo_schedules("digits")]
        manifest_path.write_text(json.dumps(manifest))
    code, text = run(capsys, *argv, "--quiet")
    assert code == 2 and "vae_decoder.onnx is corrupted: sha256" in text
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "d.json").exists()
    assert not (tmp_path / "s.json").exists()


def test_verify_exits_1_when_the_check_fails(capsys, corrupted: Path) -> None:
    """Loading refuses a corrupted bundle as bad input (2); `postdiff verify`, whose one job is the
    check, reports the failed check with 1."""
    code, text = run(capsys, "verify", str(corrupted))
    assert code == 1 and "vae_decoder.onnx is corrupted: sha256" in text


def test_an_export_that_fails_parity_exits_1_and_leaves_nothing(capsys, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from postdiff.exporter import export

    monkeypatch.setattr(export, "FP32_TOLERANCE", -1.0)  # no graph can pass: every diff is >= 0
    code, text = run(capsys, "export", "random:tiny-sd", "--out", str(tmp_path / "b"), "--quiet")
    assert code == 1 and "postdiff export: error: graph" in text and "ONNX differs from torch" in text
    assert list(tmp_path.iterdir()) == []


def test_a_measurement_child_that_crashes_is_a_run_failure_and_one_that_rejects_its_input_is_bad_input(
        tiny_bundle: Path, tmp_path: Path) -> None:
    from postdiff.errors import EXIT_FAILURE, InputError, RunFailure
    from postdiff.tools.bench import run_child

    with pytest.raises(RunFailure, match="row failed: TypeError") as crashed:  # a bug in the child: exit 1
        run_child("row", {"kind": "runtime", "no_such_argument": 1})
    assert crashed.value.exit_code == EXIT_FAILURE
    with pytest.raises(InputError, match=f"row failed: bundle folder {tmp_path / 'none'} does not exist"):
        run_child("row", {"kind": "runtime", "bundle": str(tmp_path / "none"), "schedule": "baseline",
                          "scheduler": "ddim", "seed": 0, "prompt": "a cat", "repeats": 1, "weights": "auto",
                          "save": str(tmp_path)})


# Each command's own work, interrupted from inside (the library function the command calls).
INTERRUPT_AT = {
    "export": ("postdiff.exporter.export", "measure_parity"),
    "generate": ("postdiff.runtime.pipeline.Pipeline", "generate"),
    "verify": ("postdiff.runtime.stamp", "verify_bundle"),
    "compile": ("postdiff.tools.compile", "compile_bundle"),
    "check": ("postdiff.tools.check", "check_bundle"),
    "schedule": ("postdiff.profiles.schedule_builder", "build_schedule"),
    "bench": ("postdiff.tools.bench", "bench"),
    "profile": ("postdiff.tools.profiler", "profile_bundle"),
    "tune": ("postdiff.tools.tune", "tune"),
    "demo": ("postdiff.tools.demo", "run_demo"),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_interrupt_exits_130_and_writes_nothing(capsys, command: str, tiny_bundle: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    where, name = INTERRUPT_AT[command]
    module, _, cls = where.rpartition(".") if where.endswith("Pipeline") else (where, "", "")
    target = importlib.import_module(module)
    monkeypatch.setattr(getattr(target, cls) if cls else target, name, interrupted)
    out = tmp_path / "out"
    argv = {
        "export": ["export", "random:tiny-sd", "--out", str(out), "--quiet"],
        "generate": ["generate", str(tiny_bundle), "--prompt", "a cat", "--out", str(out) + ".png", "--quiet"],
        "verify": ["verify", str(tiny_bundle)],
        "compile": ["compile", str(tiny_bundle), "--backend", "tensorrt-rtx", "--sm", "86", "--quiet"],
        "check": ["check", str(tiny_bundle), "--provider", "cuda", "--quiet"],
        "schedule": ["schedule", "--preset", "baseline", "--out", str(out)],
        "bench": ["bench", "--bundle", str(tiny_bundle), "--no-diffusers", "--quiet"],
        "profile": ["profile", str(tiny_bundle), "--out", str(out), "--quiet"],
        "tune": ["tune", str(tiny_bundle), "--device", "d.json", "--speedup", "2", "--out", str(out), "--quiet"],
        "demo": ["demo", "--out", str(out), "--quiet"],
    }[command]
    code, text = run(capsys, *argv)
    assert code == 130 and f"postdiff {command}: interrupted" in text
    assert list(tmp_path.iterdir()) == []  # no partial output, no staging folder


def test_sigterm_during_export_exits_130_and_leaves_nothing(tmp_path: Path) -> None:
    """A real SIGTERM, sent once the export has started writing its staging folder."""
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-m", "postdiff.cli", "export", "random:tiny-sd", "--out", str(out),
                              "--quiet"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".out.") for p in tmp_path.iterdir()) and time.monotonic() < deadline:
        if child.poll() is not None:
            break
        time.sleep(0.05)
    assert child.poll() is None, "the export ended before it could be interrupted"
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130 and "postdiff export: interrupted" in err
    assert list(tmp_path.iterdir()) == []


def _run_blocked(blocked: tuple[str, ...], *argv: str) -> subprocess.CompletedProcess[str]:
    """``postdiff ARGV`` in a fresh interpreter in which the ``blocked`` modules cannot be imported."""
    code = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked) + CHECK.format(
        forbidden=FORBIDDEN)
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)


@pytest.mark.parametrize("blocked", [("diffusers",), ("torch", "diffusers", "transformers", "onnx")])
def test_export_and_demo_without_the_export_extra_say_so_in_one_line(tmp_path: Path, blocked: tuple[str, ...]) -> None:
    for argv in (["export", "random:tiny-sd", "--out", str(tmp_path / "b")], ["demo", "--out", str(tmp_path / "d")]):
        result = _run_blocked(blocked, *argv, "--quiet")
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "needs the [export] extra" in lines[0] and "pip install 'postdiff[export]'" in \
            lines[0], result.stderr
        assert "ModuleNotFoundError" not in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_extras_named_in_errors_are_pyprojects() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, modules in cli.EXTRA_MODULES.items():
        names = {req.split(">")[0].split("=")[0].split("<")[0].strip().lower().replace("-", "_")
                 for req in extras[extra]}
        assert set(modules) == names, extra


@pytest.mark.parametrize("argv,message", [
    (["--resolution", "abc"], "--resolution 'abc' is not HEIGHTxWIDTH"),
    (["--precision", "fp16", "--schedule", "no-such-preset"], "'no-such-preset' is neither a schedule file"),
])
def test_export_rejects_bad_arguments_before_importing_torch(tmp_path: Path, argv: list[str], message: str) -> None:
    result = _run_blocked((), "export", "random:tiny-sd", "--out", str(tmp_path / "b"), *argv)
    assert result.returncode == 2 and message in result.stderr and "LEAKED []" in result.stdout


def test_export_rejects_an_existing_out_or_a_missing_model_before_importing_torch(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    result = _run_blocked((), "export", "random:tiny-sd", "--out", str(tmp_path / "taken"))
    assert result.returncode == 2 and "already exists" in result.stderr and "LEAKED []" in result.stdout
    result = _run_blocked((), "export", str(tmp_path / "no-model"), "--out", str(tmp_path / "b"))
    assert result.returncode == 2 and "model folder" in result.stderr and "does not exist" in result.stderr
    assert "LEAKED []" in result.stdout
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "unet").mkdir()
    result = _run_blocked((), "export", str(tmp_path / "half"), "--out", str(tmp_path / "b"))
    assert result.returncode == 2 and "missing ['text_encoder'" in result.stderr and "LEAKED []" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half", "taken"]
