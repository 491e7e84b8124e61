"""Does OpenVINO compute the merged UNet graph right on this CPU? The check behind the refusal of
``--provider openvino --unet merged`` (docs/openvino.md).

``python -m postdiff.tools.ov_merged_check BUNDLE [--schedule NAME ...] [--precision fp32]`` needs a
bundle exported with ``--merged``. For every variant the schedules run it compiles the merged graph
afresh, makes that variant's branch the compiled model's first call (where the failure was seen),
then calls every other branch, each with the same random inputs as ONNX Runtime gets; then it
generates each schedule end to end on both backends (seeds 0 and 1). It prints one line per check
and exits 1 if any relative error (calls) or final-latent difference (generations) exceeds the
tolerance: 1e-4 relative for a call at fp32, the latent tolerance of tests/tolerances.py for a
generation (bf16 is reported, never judged: it drifts by design).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from postdiff.profiles.presets import resolve_schedule
from postdiff.runtime.executor import resolve_graphs
from postdiff.runtime.manifest import load_manifest
from postdiff.runtime.pipeline import GenerateOptions, Pipeline
from postdiff.runtime.runners.branch import BranchRunner
from postdiff.runtime.runners.openvino import OpenVinoRunner
from postdiff.runtime.runners.ort import OrtRunner

CALL_TOLERANCE = 1e-4  # relative L2 of one fp32 call against ONNX Runtime


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / max(float(np.linalg.norm(want)), 1e-30))


def check_first_calls(bundle: Path, schedules: list[str], precision: str) -> bool:
    """Every branch as the first call of a fresh compiled model, then every other; True if all agree."""
    manifest = load_manifest(bundle, verify=False)
    spec = manifest.graph(manifest.merged_unet)
    served = list(dict.fromkeys(ref.served for name in schedules
                                for ref in resolve_graphs(manifest, resolve_schedule(name), "merged").values()))
    reference = OrtRunner(spec, bundle)
    rng = np.random.default_rng(0)
    feeds = [{t.name: rng.standard_normal(t.shape).astype(t.dtype) if t.dtype.startswith("float")
              else np.zeros(t.shape, t.dtype) for t in variant.inputs} for variant in served]
    wanted = [BranchRunner(reference, variant).infer(feed) for variant, feed in zip(served, feeds)]
    ok = True
    for first in range(len(served)):
        compiled = OpenVinoRunner(spec, bundle, precision)
        errors = []
        for index in [first] + [i for i in range(len(served)) if i != first]:
            got = BranchRunner(compiled, served[index]).infer(feeds[index])
            errors.append(max(_relative(got[name], wanted[index][name]) for name in got))
        worst = max(errors)
        ok &= worst <= CALL_TOLERANCE or precision != "fp32"
        print(f"first call {served[first].variant}: worst relative error {worst:.1e} "
              f"(the first call itself {errors[0]:.1e}; {len(errors)} calls)")
    return ok


def check_generations(bundle: Path, schedules: list[str], precision: str) -> bool:
    """Each schedule end to end, OpenVINO on the merged graph vs ONNX Runtime per variant."""
    reference = Pipeline(bundle, provider="cpu")
    ok = True
    for name in schedules:
        for seed in (0, 1):
            openvino = Pipeline(bundle, provider="openvino", precision=precision, unet="variants")
            openvino.unet = "merged"  # past the refusal this check exists to revisit
            options, schedule = GenerateOptions(prompt="a lighthouse at dusk", seed=seed), resolve_schedule(name)
            want = reference.generate(options, schedule=schedule).latents
            got = openvino.generate(options, schedule=schedule).latents
            # tests/tolerances.py's latent tolerance (tests are not importable from an installed tool)
            difference, tolerance = float(np.abs(got - want).max()), max(1e-4, 1e-5 * float(np.abs(want).max()))
            ok &= difference <= tolerance or precision != "fp32"
            print(f"generate {name} seed {seed}: max |latent difference| {difference:.1e} (tolerance {tolerance:.1e})")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="a bundle exported with --merged")
    parser.add_argument("--schedule", action="append", help="schedules whose variants to check "
                        "(default: postdiff-sd15 and baseline)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    args = parser.parse_args()
    schedules = args.schedule or ["postdiff-sd15", "baseline"]
    calls = check_first_calls(args.bundle, schedules, args.precision)
    generations = check_generations(args.bundle, schedules, args.precision)
    print("agree" if calls and generations else "DISAGREE")
    sys.exit(0 if calls and generations else 1)


if __name__ == "__main__":
    main()
