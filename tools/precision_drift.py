"""Final-image drift of bf16 against fp32: the command behind issue 15's precision figure.

``python -m postdiff.tools.precision_drift BUNDLE [--calib N] [--schedule baseline ...] [--json OUT]``
generates the calibration set (seeds 0..N-1, label models cycling through their labels, as the tuner
does) with every schedule on OpenVINO at fp32 and again at bf16 (the whole run at bf16, then each
``--bf16`` policy of profiles.schedule_builder given by ``--policy``), and scores each bf16 set against
the fp32 set of the same schedule: PSNR and SSIM of the final images, plus class adherence and digit-FID
for the digit model (of both sets, so the change is visible). ONNX Runtime fp32 is scored against
OpenVINO fp32 too, as the check that fp32 is the same image on both backends. Fidelity, not timing: it
may run on a loaded machine (slowly).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from postdiff.profiles.presets import resolve_schedule
from postdiff.runtime.manifest import load_manifest
from postdiff.runtime.pipeline import Pipeline
from postdiff.runtime.schedule import Schedule
from postdiff.tools.evaluate import DigitJudge, fidelity, generate_set, is_digit_model, requests_for


def pinned(schedule: Schedule, precision: str) -> Schedule:
    """``schedule`` with every step at ``precision``."""
    return dataclasses.replace(schedule, steps=tuple(dataclasses.replace(s, precision=precision)
                                                     for s in schedule.steps))


def with_policy(schedule: Schedule, policy: str) -> Schedule:
    """``schedule``'s steps with the bf16 policy of profiles.schedule_builder applied to them."""
    from postdiff.profiles.schedule_builder import ScheduleKnobs, _precision

    knobs = ScheduleKnobs(steps=len(schedule.steps), bf16=policy)
    steps = tuple(dataclasses.replace(s, precision=_precision(knobs, i, s.scale, s.deep))
                  for i, s in enumerate(schedule.steps))
    return dataclasses.replace(schedule, name=f"{schedule.name}-bf16{policy}", steps=steps)


def drift(bundle: Path, schedules: list[str], calib: int, policies: list[str], progress: bool = True) -> list[dict]:
    """One row per (schedule, variant): the scores of that set against the schedule's OpenVINO fp32 set."""
    manifest = load_manifest(bundle, verify=True)
    requests = requests_for(manifest, calib)
    judge = DigitJudge() if is_digit_model(manifest) else None
    fp32 = Pipeline(bundle, provider="openvino", precision="fp32", verify=False)
    ort = Pipeline(bundle, provider="cpu", verify=False)
    rows = []
    for spec in schedules:
        schedule = resolve_schedule(spec)
        reference = generate_set(fp32, schedule, requests, progress=progress)
        own = fidelity(reference, reference, requests, judge)
        rows.append({"schedule": schedule.name, "run": "openvino fp32 (reference)", **own})
        sets = [("onnxruntime fp32", generate_set(ort, schedule, requests, progress=progress)),
                ("openvino bf16, every step", generate_set(fp32, pinned(schedule, "bf16"), requests, progress=progress))]
        sets += [(f"openvino, bf16 policy {policy}", generate_set(fp32, with_policy(schedule, policy), requests,
                                                                  progress=progress)) for policy in policies]
        for label, images in sets:
            rows.append({"schedule": schedule.name, "run": label, **fidelity(images, reference, requests, judge)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--calib", type=int, default=128, help="calibration requests (default 128, the tuner's)")
    parser.add_argument("--schedule", action="append", help="schedules (default: baseline)")
    parser.add_argument("--policy", action="append", default=None,
                        help="bf16 policies applied to each schedule besides bf16 everywhere (default: low-res early)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    policies = args.policy if args.policy is not None else ["low-res", "early"]
    rows = drift(args.bundle, args.schedule or ["baseline"], args.calib, policies, progress=not args.quiet)
    fmt = lambda v, spec: format("-", f">{spec.split('.')[0]}") if v is None else format(v, spec)  # noqa: E731
    print(f"{'schedule':<16} {'run':<34} {'PSNR dB':>8} {'SSIM':>7} {'adherence':>9} {'digit-FID':>9}")
    for row in rows:
        print(f"{row['schedule']:<16} {row['run']:<34} {fmt(row['psnr_db'], '8.2f')} {fmt(row['ssim'], '7.4f')} "
              f"{fmt(row['adherence'], '9.3f')} {fmt(row['digit_fid'], '9.3f')}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
