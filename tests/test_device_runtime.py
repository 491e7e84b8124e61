"""The device runtime for real devices: verify once, many images from one load, memory budgets,
guidance off at batch 1, the default schedule, and bad input as one line with nothing written."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from postdiff.cli import main
from postdiff.errors import BundleError, GenerationError, InputError
from postdiff.profiles.presets import resolve_schedule
from postdiff.runtime.batch import batch_requests, generate_batch, output_paths
from postdiff.runtime.manifest import MANIFEST_NAME, bundle_files, load_manifest
from postdiff.runtime.memory import MB, tensor_bytes
from postdiff.runtime.names import TEXT_ENCODER, VAE_DECODER
from postdiff.runtime.pipeline import GenerateOptions, Pipeline
from postdiff.runtime.prompts import PromptJob, parse_prompts
from postdiff.runtime.stamp import STAMP_NAME, read_stamp, verify_bundle

README = Path(__file__).resolve().parents[1] / "README.md"


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


@pytest.fixture()
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy, ignore=shutil.ignore_patterns(STAMP_NAME))
    return copy


# --- verify once ---------------------------------------------------------------------------------------

def test_stamp_hashes_once_then_only_what_changed(bundle_copy: Path) -> None:
    manifest = load_manifest(bundle_copy, verify=False)
    everything = sorted(bundle_files(manifest))
    first = verify_bundle(bundle_copy, manifest)
    assert sorted(first.hashed) == everything and first.stamp_written
    assert set(read_stamp(bundle_copy).files) == set(everything)
    assert verify_bundle(bundle_copy, manifest).hashed == ()  # size + mtime match: nothing hashed
    touched = bundle_copy / "vae_decoder.onnx"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    assert verify_bundle(bundle_copy, manifest).hashed == ("vae_decoder.onnx",)
    assert verify_bundle(bundle_copy, manifest, use_stamp=False).hashed == tuple(everything)


def test_a_changed_file_is_refused_despite_the_stamp(capsys, bundle_copy: Path, tmp_path: Path) -> None:
    code, out, _ = run_cli(capsys, "verify", str(bundle_copy))
    assert code == 0 and (bundle_copy / STAMP_NAME).is_file() and f"{len(bundle_files(load_manifest(bundle_copy, False)))} files" in out
    with open(bundle_copy / "text_encoder.onnx", "r+b") as handle:  # same size, new mtime
        handle.seek(200)
        handle.write(b"\x00corrupt\x00")
    out_png = tmp_path / "x.png"
    code, _, err = run_cli(capsys, "generate", str(bundle_copy), "--prompt", "a", "--steps", "1", "--out",
                           str(out_png), "--quiet")
    assert code == 2 and "text_encoder.onnx is corrupted" in err and not out_png.exists()


def test_a_new_manifest_or_a_damaged_stamp_means_hashing_again(bundle_copy: Path) -> None:
    manifest = load_manifest(bundle_copy, verify=False)
    verify_bundle(bundle_copy, manifest)
    (bundle_copy / STAMP_NAME).write_text("{not json")
    assert read_stamp(bundle_copy) is None
    assert len(verify_bundle(bundle_copy, manifest).hashed) == len(bundle_files(manifest))
    text = (bundle_copy / MANIFEST_NAME).read_text()
    (bundle_copy / MANIFEST_NAME).write_text(text.replace('"default_guidance"', '"default_guidance" ', 1))
    assert len(verify_bundle(bundle_copy, manifest).hashed) == len(bundle_files(manifest))


def test_missing_file_is_named(bundle_copy: Path) -> None:
    (bundle_copy / "unet.weights").unlink()
    with pytest.raises(BundleError, match="unet.weights is missing"):
        Pipeline(bundle_copy)


# --- many images from one load -------------------------------------------------------------------------

def test_prompts_files_text_and_json_lines() -> None:
    assert parse_prompts(b"a cat\n\n  a dog \r\n") == (PromptJob("a cat"), PromptJob("  a dog "))
    jobs = parse_prompts(b'{"prompt": "a", "seed": 4}\n{"prompt": "b", "negative_prompt": "c"}\n')
    assert jobs == (PromptJob("a", seed=4), PromptJob("b", negative_prompt="c"))
    for bad, why in [(b"\xff\xfe", "not UTF-8"), (b'{"prompt": "a"}\nplain', "line 2: not a JSON object"),
                     (b'{"prompt": "a", "sede": 1}', "unknown key"), (b'{"prompt": "a", "seed": -1}', "negative"),
                     (b'{"prompt": "\\ud800"}', "not valid Unicode"), (b"\n \n", "no prompts")]:
        with pytest.raises(InputError, match=why):
            parse_prompts(bad)


def test_batch_matches_single_generations_and_numbers_files(tiny_bundle: Path, tmp_path: Path) -> None:
    pipeline = Pipeline(tiny_bundle)
    base = GenerateOptions(prompt="", seed=10, steps=2)
    requests = batch_requests([PromptJob("a cat"), PromptJob("a dog", seed=3)], base, 2)
    assert [(r.prompt, r.seed) for r in requests] == [("a cat", 10), ("a cat", 11), ("a dog", 3), ("a dog", 4)]
    paths = output_paths(tmp_path / "pic.png", len(requests))
    assert [p.name for p in paths] == ["pic-000.png", "pic-001.png", "pic-002.png", "pic-003.png"]
    written = generate_batch(pipeline, requests, paths, progress=False)
    assert written == paths
    for request, path in zip(requests, paths):
        alone = Pipeline(tiny_bundle, verify=False).generate(request).image
        assert np.array_equal(np.asarray(Image.open(path)), alone)


def test_a_failure_names_the_image_and_keeps_the_ones_written(tiny_bundle: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = Pipeline(tiny_bundle)
    requests = batch_requests([PromptJob("first"), PromptJob("second"), PromptJob("third")],
                              GenerateOptions(prompt="", steps=1), 1)
    paths = output_paths(tmp_path / "x.png", 3)
    real = pipeline.generate

    def flaky(options, **kwargs):
        if options.prompt == "second":
            raise RuntimeError("onnxruntime ran out of memory")
        return real(options, **kwargs)

    monkeypatch.setattr(pipeline, "generate", flaky)
    with pytest.raises(GenerationError, match=r"image 2 of 3 \(prompt 'second', seed 0\).*out of memory.*1 written"):
        generate_batch(pipeline, requests, paths, progress=False)
    assert [p.exists() for p in paths] == [True, False, False]


def test_cli_prompts_file_and_num_images(capsys, tiny_bundle: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a cat", "seed": 5}\n{"prompt": "a dog"}\n')
    code, out, _ = run_cli(capsys, "generate", str(tiny_bundle), "--prompts", str(prompts), "--num-images", "2",
                           "--steps", "1", "--out", str(tmp_path / "img.png"), "--quiet")
    assert code == 0 and "4 images" in out
    assert sorted(p.name for p in tmp_path.glob("img-*.png")) == [f"img-00{i}.png" for i in range(4)]
    # the same files again: refused before any compute unless --overwrite
    code, _, err = run_cli(capsys, "generate", str(tiny_bundle), "--prompts", str(prompts), "--steps", "1",
                           "--out", str(tmp_path / "img.png"), "--quiet")
    assert code == 2 and "img-000.png already exists" in err


def test_readme_python_example_runs(tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "tiny.bundle").symlink_to(tiny_bundle)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert sorted(p.name for p in tmp_path.glob("*.png"))  # the example writes images


# --- memory budget -------------------------------------------------------------------------------------

def test_budget_opens_only_the_current_phase(tiny_postdiff_bundle: Path) -> None:
    schedule = resolve_schedule("postdiff-sd15")
    options = GenerateOptions(prompt="a cat", seed=2, steps=20)
    free = Pipeline(tiny_postdiff_bundle).generate(options, schedule=schedule)
    pipeline = Pipeline(tiny_postdiff_bundle, memory_budget_mb=4096)
    open_at: list[list[str]] = []
    result = pipeline.generate(options, schedule=schedule, on_step=lambda: open_at.append(pipeline.open_graphs))
    assert np.array_equal(result.latents, free.latents)  # releasing changes nothing in the result
    assert pipeline.open_graphs == []  # everything released after the run
    ran = {n for graphs in open_at for n in graphs} | {TEXT_ENCODER, VAE_DECODER}
    assert ran <= set(pipeline.precisions) and set(pipeline.precisions.values()) == {"fp32"}  # released ones too
    assert all(TEXT_ENCODER not in g and VAE_DECODER not in g for g in open_at)
    # after the switch (step 10) no low-resolution graph, after the gate (5 guided steps) no guided one
    assert not any("8x8" in name for graphs in open_at[10:] for name in graphs)
    assert not any("-b2" in name for graphs in open_at[5:] for name in graphs)
    assert any("8x8" in name for name in open_at[0])


def test_budget_too_small_is_refused_before_compute(tiny_postdiff_bundle: Path) -> None:
    pipeline = Pipeline(tiny_postdiff_bundle, memory_budget_mb=1)
    schedule = resolve_schedule("postdiff-sd15")
    with pytest.raises(InputError, match=r"--memory-budget 1 MB cannot fit phase .* at least \d+ MB"):
        pipeline.generate(GenerateOptions(prompt="a", steps=20), schedule=schedule)
    assert pipeline.open_graphs == []
    # the estimate of a phase: distinct shared weight payloads + graph files + I/O tensors (independently)
    manifest = pipeline.manifest
    for phase in pipeline.memory_estimate(schedule):
        keys = {k for n in phase.phase.graphs for k in manifest.graph(n).initializers.values()}
        weights = sum(manifest.weights.tensors[k].length for k in keys)
        files = sum((tiny_postdiff_bundle / manifest.graph(n).file).stat().st_size for n in phase.phase.graphs)
        assert phase.weights == weights + files
        assert phase.tensors == sum(tensor_bytes(manifest.graph(n)) for n in phase.phase.graphs)
    assert 0 < phase.resident < 4096 * MB


def test_text_encoder_session_goes_without_prepacking(tiny_bundle: Path) -> None:
    pipeline = Pipeline(tiny_bundle)
    config = pipeline.runner(TEXT_ENCODER).session.get_session_options().get_session_config_entry
    assert config("session.disable_prepacking") == "1"


# --- guidance off, default schedule --------------------------------------------------------------------

def test_guidance_off_falls_back_to_batch_2_on_bundles_without_the_batch_1_graph(tiny_bundle: Path) -> None:
    pipeline = Pipeline(tiny_bundle)
    assert pipeline.plan_for(GenerateOptions(prompt="x", guidance=1.0, steps=3, scheduler="ddim")).steps[0].cfg is False
    graphs = {k: v for k, v in pipeline.manifest.graphs.items() if k != "unet-16x16-b1"}
    pipeline.manifest = dataclasses.replace(pipeline.manifest, graphs=graphs)
    assert pipeline.plan_for(GenerateOptions(prompt="x", guidance=1.0, steps=3, scheduler="ddim")).steps[0].cfg is True


@pytest.fixture()
def postdiff_only(tiny_postdiff_bundle: Path, tmp_path: Path) -> Path:
    """The postdiff bundle without plain generation's graphs, as `export --schedule postdiff-sd15` writes it."""
    copy = tmp_path / "pd"
    shutil.copytree(tiny_postdiff_bundle, copy, ignore=shutil.ignore_patterns(STAMP_NAME))
    doc = json.loads((copy / MANIFEST_NAME).read_text())
    for name in ("unet-16x16-b2", "unet-16x16-b1"):
        (copy / doc["graphs"].pop(name)["file"]).unlink()
    doc["schedules"] = ["postdiff-sd15"]
    (copy / MANIFEST_NAME).write_text(json.dumps(doc))
    return copy


def test_default_schedule_is_the_bundles_first(capsys, postdiff_only: Path, tmp_path: Path) -> None:
    code, out, err = run_cli(capsys, "generate", str(postdiff_only), "--prompt", "a", "--out",
                             str(tmp_path / "a.png"), "--quiet")
    assert code == 0 and "running schedule 'postdiff-sd15'" in err and "schedule 'postdiff-sd15'" in out
    code, _, err = run_cli(capsys, "generate", str(postdiff_only), "--prompt", "a", "--schedule", "baseline",
                           "--out", str(tmp_path / "b.png"), "--quiet")
    assert code == 2 and "unet-16x16-b2.onnx" in err and "--schedule postdiff-sd15" in err
    assert "UNetVariant" not in err and "--schedule plain" not in err and not (tmp_path / "b.png").exists()


# --- bad input: one line, exit 2, nothing written ------------------------------------------------------

@pytest.mark.parametrize("extra, why", [
    (["--seed", "-1"], "seed -1 is not a whole number >= 0"),
    (["--prompt", "a \udcff cat"], "not valid Unicode"),
    (["--out-dir"], "is a folder"),
    (["--out", "x.gif"], "'.gif' is not an image format"),
    (["--num-images", "0"], "--num-images 0"),
    (["--memory-budget", "-5"], "not a positive number"),
])
def test_bad_input_is_one_line_and_writes_nothing(capsys, tiny_bundle: Path, tmp_path: Path, extra: list[str],
                                                  why: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("precious")
    args = ["generate", str(tiny_bundle), "--prompt", "a cat", "--steps", "1", "--quiet", "--out",
            str(work / "out.png")]
    if extra == ["--out-dir"]:
        args[-1], extra = str(work), ["--overwrite"]
    elif extra[0] == "--out":
        args[-1], extra = str(work / extra[1]), []
    elif extra[0] == "--prompt":
        args[3], extra = extra[1], []
    code, _, err = run_cli(capsys, *args, *extra)
    assert code == 2 and why in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt"] and (work / "keep.txt").read_text() == "precious"


def test_jpeg_out_is_a_jpeg(capsys, tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.jpg"
    code, _, _ = run_cli(capsys, "generate", str(tiny_bundle), "--prompt", "a", "--steps", "1", "--out", str(out),
                         "--quiet")
    assert code == 0 and Image.open(out).format == "JPEG"
