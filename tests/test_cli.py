"""Bad input gets one clear line on stderr, exit code 2 (a bundle that fails verification: 1), no traceback,
and nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from postdiff.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture()
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def gen_args(bundle: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", str(bundle), "--prompt", "a cat", "--steps", "2", "--out", str(out), "--quiet", *extra]


def test_generate_writes_an_image(capsys, tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "cat.png"
    code, err = run_cli(capsys, *gen_args(tiny_bundle, out))
    assert code == 0 and out.is_file()
    from PIL import Image

    assert Image.open(out).size == (32, 32)


def test_generate_reads_initial_latents(capsys, tiny_bundle: Path, tmp_path: Path) -> None:
    import numpy as np

    latents = tmp_path / "noise.npy"
    np.save(latents, np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32))
    final = tmp_path / "final.npy"
    code, _ = run_cli(capsys, *gen_args(tiny_bundle, tmp_path / "a.png", "--latents", str(latents),
                                        "--save-latents", str(final)))
    assert code == 0 and np.load(final).shape == (1, 4, 16, 16)
    np.save(latents, np.zeros((1, 4, 8, 8), dtype=np.float32))
    code, err = run_cli(capsys, *gen_args(tiny_bundle, tmp_path / "b.png", "--latents", str(latents)))
    assert code == 2 and "[1, 4, 8, 8]" in err and "[1, 4, 16, 16]" in err


def test_missing_graph_file(capsys, bundle_copy: Path, tmp_path: Path) -> None:
    (bundle_copy / "unet-16x16-b2.onnx").unlink()
    code, err = run_cli(capsys, *gen_args(bundle_copy, tmp_path / "x.png"))
    assert code == 2 and "unet-16x16-b2.onnx is missing" in err and "re-export" in err  # refused before any compute
    assert not (tmp_path / "x.png").exists()


def test_corrupted_graph_file_fails_its_sha256(capsys, bundle_copy: Path, tmp_path: Path) -> None:
    with open(bundle_copy / "vae_decoder.onnx", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00garbage\x00")
    code, err = run_cli(capsys, *gen_args(bundle_copy, tmp_path / "x.png"))
    assert code == 2 and "vae_decoder.onnx is corrupted: sha256" in err


def test_corrupted_graph_with_matching_sha256_is_reported_by_name(capsys, bundle_copy: Path, tmp_path: Path) -> None:
    from postdiff.runtime.manifest import sha256_file

    (bundle_copy / "text_encoder.onnx").write_bytes(b"not an onnx graph")
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["graphs"]["text_encoder"]["sha256"] = sha256_file(bundle_copy / "text_encoder.onnx")
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    code, err = run_cli(capsys, *gen_args(bundle_copy, tmp_path / "x.png"))
    assert code == 2 and "text_encoder.onnx could not be loaded by onnxruntime" in err


def test_unknown_format_version(capsys, bundle_copy: Path, tmp_path: Path) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    code, err = run_cli(capsys, *gen_args(bundle_copy, tmp_path / "x.png"))
    assert code == 2 and "format_version 99 is not supported" in err


def test_unknown_manifest_key(capsys, bundle_copy: Path, tmp_path: Path) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["model"]["colour"] = "blue"
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    code, err = run_cli(capsys, *gen_args(bundle_copy, tmp_path / "x.png"))
    assert code == 2 and "unknown key(s) ['colour']" in err


def test_not_a_bundle(capsys, tmp_path: Path) -> None:
    code, err = run_cli(capsys, *gen_args(tmp_path, tmp_path / "x.png"))
    assert code == 2 and "no manifest.json" in err


@pytest.mark.parametrize("flag,value,message", [
    ("--scheduler", "heun", "invalid choice: 'heun'"),
    ("--provider", "metal", "invalid choice: 'metal'"),
    ("--steps", "0", "--steps 0 is not positive"),
    ("--steps", "-3", "--steps -3 is not positive"),
])
def test_bad_generate_flags(capsys, tiny_bundle: Path, tmp_path: Path, flag: str, value: str, message: str) -> None:
    code, err = run_cli(capsys, *gen_args(tiny_bundle, tmp_path / "x.png", flag, value))
    assert code == 2 and message in err
    assert not (tmp_path / "x.png").exists()


def test_library_rejects_unknown_scheduler_and_provider(tiny_bundle: Path) -> None:
    from postdiff.errors import InputError
    from postdiff.runtime.runners.ort import execution_providers
    from postdiff.runtime.schedulers import make_scheduler

    with pytest.raises(InputError, match="heun"):
        make_scheduler("heun", {})
    with pytest.raises(InputError, match="unknown provider 'metal'"):
        execution_providers("metal")


def test_existing_image_is_not_overwritten(capsys, tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    out.write_bytes(b"keep")
    code, err = run_cli(capsys, *gen_args(tiny_bundle, out))
    assert code == 2 and "already exists" in err and out.read_bytes() == b"keep"


def test_resolution_off_grid_names_valid_sizes(capsys, tmp_path: Path) -> None:
    code, err = run_cli(capsys, "export", "random:tiny-sd", "--out", str(tmp_path / "b"), "--resolution", "34x32",
                        "--quiet")
    assert code == 2 and "34x32 is off this model's grid" in err and "multiples of 4 pixels" in err
    assert list(tmp_path.iterdir()) == []


def test_malformed_resolution(capsys, tmp_path: Path) -> None:
    code, err = run_cli(capsys, "export", "random:tiny-sd", "--out", str(tmp_path / "b"), "--resolution", "big")
    assert code == 2 and "not HEIGHTxWIDTH" in err


def test_unreadable_model_folder(capsys, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    for part in ("text_encoder", "tokenizer", "unet", "vae", "scheduler"):
        (folder / part).mkdir(parents=True)
    code, err = run_cli(capsys, "export", str(folder), "--out", str(tmp_path / "b"), "--quiet")
    assert code == 2 and "could not be loaded" in err
    assert not (tmp_path / "b").exists()
    code, err = run_cli(capsys, "export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b"), "--quiet")
    assert code == 2 and "does not exist" in err
    code, err = run_cli(capsys, "export", str(tmp_path), "--out", str(tmp_path / "b"), "--quiet")
    assert code == 2 and "missing ['text_encoder'" in err


def test_unknown_builtin_model(capsys, tmp_path: Path) -> None:
    code, err = run_cli(capsys, "export", "random:sd3", "--out", str(tmp_path / "b"), "--quiet")
    assert code == 2 and "unknown built-in model 'random:sd3'" in err


def test_export_destination_exists(capsys, tiny_bundle: Path) -> None:
    before = sorted(p.name for p in tiny_bundle.iterdir())
    code, err = run_cli(capsys, "export", "random:tiny-sd", "--out", str(tiny_bundle), "--quiet")
    assert code == 2 and "already exists" in err
    assert sorted(p.name for p in tiny_bundle.iterdir()) == before


def test_help_explains_every_command() -> None:
    """Every command the parser has (discovered, not listed here) is in the top-level help, has a
    description, and every one of its arguments says what it does."""
    import argparse

    from postdiff.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    commands = sub.choices
    assert len(commands) >= 7  # export generate schedule bench profile tune demo, at the least
    top = subprocess.run([sys.executable, "-m", "postdiff.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    listed = {choice.dest: choice.help for choice in sub._choices_actions}
    undocumented = []
    for name, command in commands.items():
        assert name in top and listed.get(name), f"`postdiff --help` does not list {name}"
        assert command.format_help().startswith(f"usage: postdiff {name}")
        if not (command.description or "").strip():
            undocumented.append(f"{name}: no description")
        undocumented += [f"{name} {'/'.join(a.option_strings) or a.dest}: no help" for a in command._actions
                         if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert undocumented == []
