#!/usr/bin/env bash
# The device-runtime figures of issue 10, on one bundle, on a quiet machine:
#   tools/figures/device_runtime.sh BUNDLE [OUT_DIR]
# BUNDLE: exported with `--schedule postdiff-sd15 --schedule baseline` (e.g. random:sd15 at 256x256).
# Prints, in order: first load (hashes every file, writes the stamp) vs second (stamp check only);
# 8 prompts from one load vs 8 separate processes; peak RSS of postdiff-sd15 without and with the
# smallest --memory-budget the runtime accepts; plain 20-step generation guided vs guidance off.
set -euo pipefail
BUNDLE=${1:?usage: device_runtime.sh BUNDLE [OUT_DIR]}
OUT=${2:-$(mktemp -d)}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
PROMPT="a photograph of an astronaut riding a horse"
timed() {  # timed LABEL CMD...: wall time and peak RSS of one process, then its last output line
  local label=$1; shift
  /usr/bin/time -f "%e %M" -o "$OUT/time.txt" "$@" > "$OUT/log.txt" 2>&1
  read -r wall rss < "$OUT/time.txt"
  printf '%-44s wall %7.2f s   peak RSS %6.0f MB   | %s\n' "$label" "$wall" "$((rss / 1024))" "$(tail -n 1 "$OUT/log.txt")"
}
GEN=(postdiff generate "$BUNDLE" --quiet --overwrite)

echo "== 1. verify once: first load hashes the bundle, the second checks the stamp"
rm -f "$BUNDLE/verified.json"
timed "postdiff-sd15, no stamp (hash all)" "${GEN[@]}" --schedule postdiff-sd15 --prompt "$PROMPT" --out "$OUT/first.png"
timed "postdiff-sd15, stamp" "${GEN[@]}" --schedule postdiff-sd15 --prompt "$PROMPT" --out "$OUT/second.png"

echo "== 2. 8 prompts from one load vs 8 separate calls (postdiff-sd15)"
for i in 1 2 3 4 5 6 7 8; do echo "a photograph of a red fox, number $i"; done > "$OUT/prompts.txt"
timed "8 prompts, one load" "${GEN[@]}" --schedule postdiff-sd15 --prompts "$OUT/prompts.txt" --out "$OUT/batch.png"
start=$(date +%s.%N)
while IFS= read -r line; do "${GEN[@]}" --schedule postdiff-sd15 --prompt "$line" --out "$OUT/single.png" > /dev/null 2>&1; done < "$OUT/prompts.txt"
printf '%-44s wall %7.2f s\n' "8 prompts, 8 processes" "$(echo "$(date +%s.%N) - $start" | bc)"

echo "== 3. peak RSS without and with the smallest memory budget"
budget=$("${GEN[@]}" --schedule postdiff-sd15 --prompt "$PROMPT" --out "$OUT/x.png" --memory-budget 1 2>&1 \
  | sed -n 's/.*raise the budget to at least \([0-9]*\) MB.*/\1/p' || true)
echo "smallest budget the runtime accepts: ${budget} MB"
timed "postdiff-sd15, no budget" "${GEN[@]}" --schedule postdiff-sd15 --prompt "$PROMPT" --out "$OUT/nobudget.png"
timed "postdiff-sd15, --memory-budget $budget" "${GEN[@]}" --schedule postdiff-sd15 --prompt "$PROMPT" --out "$OUT/budget.png" --memory-budget "$budget"

echo "== 4. plain 20 steps: guided (batch 2) vs guidance off (batch 1)"
timed "plain, guidance 7.5" "${GEN[@]}" --prompt "$PROMPT" --out "$OUT/guided.png" --guidance 7.5
timed "plain, guidance 1" "${GEN[@]}" --prompt "$PROMPT" --out "$OUT/unguided.png" --guidance 1
