#!/usr/bin/env bash
# One Common Voice language end to end, shared by recipes/CommonVoice/<lang>/run.sh:
#   1 synth (replaced by the given folder) 2 prepare 3 partition 4 warmup 5 central 6 cross-silo 7 cross-device 8 compare
# Usage: run_recipe.sh LANG CV_DIR [--out DIR] [--stage S] [--stop-stage S] [--set KEY=VALUE ...] [--config YAML]
#   CV_DIR   the Common Voice folder of that language (clips/, train.tsv, dev.tsv, test.tsv): the only required input
#   --out    pipeline folder (default: results/CommonVoice_<lang>); runs go to <out>/runs/CommonVoice/<lang>/...
# Settings: hparams/pipeline/commonvoice.yaml (+ hparams/CommonVoice/<lang>.yaml, hparams/fl/*.yaml); every key can
# be overridden with --set, e.g. --set cross_silo.set.rounds=10 --set model=crdnn_tiny.
# Finished stages leave done-markers in the pipeline folder: a re-run skips them and resumes the first unfinished one.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ $# -lt 2 || "$2" == -* ]]; then
  echo "usage: $(basename "$0") LANG CV_DIR [--out DIR] [--stage S] [--stop-stage S] [--set KEY=VALUE ...]" >&2
  exit 2
fi
LANG_CODE=$1 CV_DIR=$2
shift 2
OUT="results/CommonVoice_${LANG_CODE}"
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --out=*) OUT=${1#--out=}; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
FEDASR=${FEDASR:-"$REPO/.venv/bin/fedasr"}
exec "$FEDASR" pipeline "$OUT" --corpus "$CV_DIR" --lang "$LANG_CODE" \
  --config "$REPO/hparams/pipeline/commonvoice.yaml" ${ARGS[@]+"${ARGS[@]}"}
