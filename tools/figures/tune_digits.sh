#!/usr/bin/env bash
# Regenerate the committed digits device profile and the demo's `tuned` schedule, on this machine:
#   profiles/devices/cpu-2core-digits.json      postdiff profile of `postdiff export digits --tuning-space`
#   profiles/tuned/digits-cpu-2core.json        postdiff tune's choice at --speedup $SPEEDUP (default 2.5)
#   profiles/tuned/digits-cpu-2core.frontier.json  the frontier it was chosen from
# The committed files were made on the reference machine (2-core Intel Xeon VM, ONNX Runtime CPU); run
# this there, on a quiet machine, to re-measure them (the timing is the point of the profile).
#
# Usage: tools/figures/tune_digits.sh [WORKDIR]     (WORKDIR keeps the bundle and tune-cache.jsonl; default: a
#        temporary folder). Environment: SPEEDUP (2.5), CALIB (32: what the committed schedule used; tune's own default is 128), REPEATS (20).
set -euo pipefail
cd "$(dirname "$0")/../.."
work=${1:-$(mktemp -d)}
speedup=${SPEEDUP:-2.5}
calib=${CALIB:-32}
repeats=${REPEATS:-20}
export HF_HUB_OFFLINE=1
profile=profiles/devices/cpu-2core-digits.json
tuned=profiles/tuned/digits-cpu-2core.json
mkdir -p "$work/tuned" profiles/tuned

if [ ! -f "$work/digits.bundle/manifest.json" ]; then
  postdiff export digits --out "$work/digits.bundle" --tuning-space --quiet
fi
SECONDS=0
postdiff profile "$work/digits.bundle" --repeats "$repeats" --out "$profile" --overwrite --quiet
echo "profile: ${SECONDS} s wall"
SECONDS=0
postdiff tune "$work/digits.bundle" --device "$profile" --speedup "$speedup" --calib "$calib" \
  --out "$work/tuned/schedule.json" --quiet
echo "tune: ${SECONDS} s wall"
cp "$work/tuned/schedule.json" "$tuned"
cp "$work/tuned/frontier.json" "${tuned%.json}.frontier.json"
echo "wrote $profile, $tuned and ${tuned%.json}.frontier.json (bundle and tune cache in $work)"
