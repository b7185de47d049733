#!/usr/bin/env bash
# The main job on the embedded default corpus: synthesize -> prepare -> partition, then print the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/demo}
FEDASR=.venv/bin/fedasr
echo "== [1/3] synthesize the Common-Voice-shaped corpus -> $OUT/corpus"
$FEDASR synth "$OUT/corpus"
echo "== [2/3] prepare manifests -> $OUT/manifests"
$FEDASR prepare "$OUT/corpus" "$OUT/manifests" --lang fr
echo "== [3/3] partition speakers"
for mode in cross-silo cross-device iid; do
  echo "-- $mode"
  $FEDASR partition "$OUT/manifests" "$OUT/partitions/$mode" --mode "$mode" --warmup-speakers 8 --seed 0
done
echo "Done. Outputs in $OUT"
