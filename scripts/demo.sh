#!/usr/bin/env bash
# The main job on the embedded default corpus: `fedasr demo` runs every stage (synth -> prepare -> partition ->
# warm-up -> centralized -> cross-silo -> cross-device -> compare) with hparams/pipeline/demo.yaml and prints the
# comparison table. Re-running skips finished stages. Extra arguments go to `fedasr demo` (e.g. --set KEY=VALUE).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/demo}
shift $(( $# > 0 ? 1 : 0 ))
exec .venv/bin/fedasr demo "$OUT" "$@"
