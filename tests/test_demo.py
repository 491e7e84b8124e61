"""The embedded `digits` model and `postdiff demo`, end to end in a reduced mode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from postdiff.cli import main
from postdiff.errors import InputError
from postdiff.runtime.tokenizer import label_id
from postdiff.profiles.presets import SCHEDULES_DIR
from postdiff.tools.evaluate import CLASSIFIER

# The demo's `tuned` row must run this committed file (tools/figures/tune_digits.sh made it).
TUNED_FILE = SCHEDULES_DIR.parent / "tuned" / "digits-cpu-2core.json"

LABELS = tuple(str(i) for i in range(10))


def test_label_prompts() -> None:
    assert label_id("7", LABELS) == 7
    assert label_id("  Digit 3 ", LABELS) == 3
    assert label_id("", LABELS) == 10
    with pytest.raises(InputError, match="valid prompts: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9"):
        label_id("seven", LABELS)


def test_demo_on_digits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--samples", "10", "--out", str(out), "--quiet"]) == 0
    table = capsys.readouterr().out
    # the console says what each fidelity figure is measured against
    assert "PSNR, SSIM: each image against the baseline's image of the same seed and prompt" in table
    accuracy = json.loads(CLASSIFIER.with_suffix(".json").read_text())["heldout_accuracy"]
    assert f"digit classifier ({accuracy:.1%} accurate on held-out real MNIST digits)" in table
    assert "1,000 held-out real MNIST digits" in table
    results = json.loads((out / "results.json").read_text())
    runs = {run["name"]: run for run in results["runs"]}
    assert list(runs) == ["baseline", "fewer-steps", "postdiff", "tuned"]
    # the tuned row is the committed schedule, step for step, and says where it was tuned
    committed = json.loads(TUNED_FILE.read_text())
    assert runs["tuned"]["schedule"] == TUNED_FILE.name and runs["tuned"]["steps"] == committed["steps"]
    presets = {name: json.loads((SCHEDULES_DIR / f"{name}.json").read_text())["steps"]
               for name in ("baseline", "fewer-steps", "postdiff-sd15")}
    assert committed["steps"] not in presets.values()  # tuned, not a preset under another name
    for name, preset in (("baseline", "baseline"), ("fewer-steps", "fewer-steps"), ("postdiff", "postdiff-sd15")):
        assert runs[name]["steps"] == presets[preset], name
    assert "tuned on the reference machine (2-core Intel Xeon VM)" in table and TUNED_FILE.name in table
    assert committed["name"] in json.loads((out / "bundle" / "manifest.json").read_text())["schedules"]
    for name, run in runs.items():
        assert name in table
        assert set(run) >= {"name", "latency_s", "speedup", "macs", "adherence", "digit_fid", "psnr_db", "ssim"}
    base = runs["baseline"]
    # fewer-steps calls the baseline's one UNet graph 8 times instead of 20
    assert runs["fewer-steps"]["macs"] * 20 == base["macs"] * 8
    assert runs["postdiff"]["macs"] < runs["fewer-steps"]["macs"]
    assert runs["tuned"]["macs"] < base["macs"]  # tuned for a speed-up over the baseline
    for name in ("fewer-steps", "postdiff", "tuned"):  # scored against the baseline's images, not their own
        assert runs[name]["psnr_db"] is not None and runs[name]["ssim"] < 1.0, name
    assert base["adherence"] >= 0.8  # a trained model, not noise
    assert (out / "grid.png").stat().st_size > 0

    bundle = out / "bundle"
    code = main(["generate", str(bundle), "--prompt", "seven", "--out", str(tmp_path / "x.png"), "--quiet"])
    assert code == 2 and "valid prompts: 0, 1, 2" in capsys.readouterr().err
    code = main(["generate", str(bundle), "--prompt", "digit 7", "--schedule", "postdiff-sd15",
                 "--out", str(tmp_path / "seven.png"), "--quiet"])
    assert code == 0
    from PIL import Image

    image = np.asarray(Image.open(tmp_path / "seven.png"))
    assert image.shape == (32, 32) and image.std() > 10  # a grayscale digit, not a flat field


def test_demo_rejects_bad_model_and_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--model", "random:nope", "--out", str(tmp_path / "d"), "--quiet"]) == 2
    assert "unknown built-in model 'random:nope'" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    assert main(["demo", "--samples", "1", "--out", str(tmp_path / "d"), "--quiet"]) == 2
    assert "--samples 1 is too few" in capsys.readouterr().err
