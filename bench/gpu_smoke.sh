#!/usr/bin/env bash
# GPU smoke benchmark (issue 14): every stage of the recipe on one GPU (aimed at 5 minutes; never timed on a GPU yet,
# estimated 6-7: --clients 20 shortens it), with what each stage actually ran on and how fast.
#
#   bench/gpu_smoke.sh [OUT_DIR]                     # on a GPU machine: demo corpus, full-size crdnn
#   bench/gpu_smoke.sh --precision bf16 [OUT_DIR]    # the same under autocast (fp16: also gradient scaling)
#   bench/gpu_smoke.sh --cpu-dry-run [OUT_DIR]       # the plumbing on a CPU: tiny corpus, ctc_tiny, device cpu
#   bench/gpu_smoke.sh --clients 20 [OUT_DIR]        # fewer sequential clients (default 50): a shorter run
#
# Stages: synth (40 speakers x 20 clips, the synth default) -> prepare -> partition (2 silos; 4 speaker-clients) ->
# central (train-central, 1 epoch, on all train speakers: the seed) -> silos (federate cross-silo, 2 silos x 1
# round, 0.5 GPU each) -> speakers (federate cross-device, 4 speaker-clients x 1 round, 0.25 GPU each) -> clients50
# (50 client fits in a row in one process, as a Ray worker trains them: the 4 speaker-clients in turn, each from the
# seed; memory after each fit, to show none leaks from one client to the next) -> test (beam-search decoding of
# test.csv with the seed). Printed per stage, and written to OUT_DIR/gpu_smoke.json: the device each part ran on (as
# the stage itself reports it), seconds of audio trained per second, decoding audio-seconds per second, peak GPU
# memory (torch's peak per process, and the whole GPU's as nvidia-smi saw it), and memory after client 1 and 50.
# Exit 2 without a usable GPU (unless --cpu-dry-run); 1 when a stage fails (its log: OUT_DIR/logs/STAGE.log).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0 PRECISION=fp32 OUT="" CLIENTS=50
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY=1 ;;
    --precision) PRECISION="$2"; shift ;;
    --precision=*) PRECISION="${1#*=}" ;;
    --clients) CLIENTS="$2"; shift ;;
    --clients=*) CLIENTS="${1#*=}" ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_smoke: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) OUT="$1" ;;
  esac
  shift
done
[[ "$CLIENTS" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_smoke: --clients takes a count >= 1, got '$CLIENTS'" >&2; exit 2; }
PY="${PYTHON:-}"  # the interpreter: $PYTHON when set, else the repository's .venv, else python
[ -z "$PY" ] && { PY=python; [ -x .venv/bin/python ] && PY=.venv/bin/python; }
FEDASR=("$PY" -m fedasr.cli)

if [ "$DRY" = 1 ]; then
  OUT="${OUT:-results/gpu_smoke_cpu_dry_run}"
  DEVICE=cpu MODEL=ctc_tiny SPEAKERS=12 CLIPS=4 WARMUP=4 SILO_GPUS=0 SPEAKER_GPUS=0 BATCH=4 THREADS=1
  [ "$PRECISION" = fp16 ] && { echo "gpu_smoke: --cpu-dry-run cannot use fp16 (CUDA only): use fp32 or bf16" >&2; exit 2; }
else
  OUT="${OUT:-results/gpu_smoke}"
  DEVICE=cuda MODEL=crdnn SPEAKERS=40 CLIPS=20 WARMUP=12 SILO_GPUS=0.5 SPEAKER_GPUS=0.25 BATCH=16 THREADS=4
  if ! found=$("$PY" -c 'from fedasr.utils.device import resolve_device; print(resolve_device("cuda", what="gpu_smoke"))' 2>&1); then
    echo "gpu_smoke: no usable GPU, nothing run. ${found##*DeviceError: }" >&2
    echo "gpu_smoke: run it on a machine with an NVIDIA GPU and a CUDA build of torch, or check the plumbing with --cpu-dry-run" >&2
    exit 2
  fi
  echo "gpu_smoke: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)')"
fi
command -v espeak-ng >/dev/null || { echo "gpu_smoke: espeak-ng is needed for the demo corpus (apt-get install espeak-ng)" >&2; exit 2; }

rm -rf "$OUT"
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
STAGES="$OUT/stages.tsv"
printf 'stage\tseconds\tgpu_peak_mib\n' > "$STAGES"
SMI=0
[ "$DRY" = 0 ] && command -v nvidia-smi >/dev/null && SMI=1

run_stage() {  # run_stage NAME CMD...: the command's output in logs/NAME.log; wall seconds and whole-GPU peak
  local name="$1"; shift
  local samples="$OUT/logs/$name.smi" sampler=""
  if [ "$SMI" = 1 ]; then
    (while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 2>/dev/null || true; sleep 0.25; done) > "$samples" &
    sampler=$!
  fi
  local start end status=0
  start=$(date +%s%N)
  echo "gpu_smoke: [$name] $*" | cut -c1-200
  "$@" > "$OUT/logs/$name.log" 2>&1 || status=$?
  end=$(date +%s%N)
  local peak="nan"
  if [ -n "$sampler" ]; then
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    peak=$({ grep -E "^[0-9]+$" "$samples" || true; } | sort -n | tail -1)  # numbers only ([N/A] on some GPUs)
  fi
  if [ "$status" != 0 ]; then
    echo "gpu_smoke: stage $name failed (exit $status); the end of $OUT/logs/$name.log:" >&2
    tail -25 "$OUT/logs/$name.log" >&2
    exit 1
  fi
  printf '%s\t%s\t%s\n' "$name" "$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')" "${peak:-nan}" >> "$STAGES"
}

FL_COMMON=(--set rounds=1 --set local_epochs=1 --set "device=$DEVICE" --set "precision=$PRECISION"
           --set "batch_size=$((BATCH / 2))" --set evaluation.decoding=greedy --set evaluation.test_decoding=greedy
           --set evaluation.server_wer_utterances=20)

run_stage synth "${FEDASR[@]}" synth "$OUT/corpus" --lang fr --speakers "$SPEAKERS" --utterances-per-speaker "$CLIPS"
run_stage prepare "${FEDASR[@]}" prepare "$OUT/corpus" "$OUT/manifests" --lang fr
run_stage partition_silos "${FEDASR[@]}" partition "$OUT/manifests" "$OUT/p_silos" --mode cross-silo --clients 2 \
  --warmup-speakers "$WARMUP"
run_stage partition_speakers "${FEDASR[@]}" partition "$OUT/manifests" "$OUT/p_speakers" --mode cross-device \
  --clients 4 --warmup-speakers "$WARMUP"
run_stage central "${FEDASR[@]}" --threads "$THREADS" train-central hparams/CommonVoice/synth.yaml \
  "--device=$DEVICE" "--precision=$PRECISION" --noprogressbar "--model=$MODEL" --number_of_epochs=1 \
  "--batch_size=$BATCH" --valid_search=null --test_search=null \
  "--manifest_folder=$OUT/manifests" "--output_folder=$OUT/central"
run_stage silos "${FEDASR[@]}" federate hparams/fl/cross_silo.yaml --partition "$OUT/p_silos" \
  --seed-checkpoint "$OUT/central/seed_checkpoint" --output-dir "$OUT/silos" "${FL_COMMON[@]}" \
  --set "client_num_gpus=$SILO_GPUS"
run_stage speakers "${FEDASR[@]}" federate hparams/fl/cross_device.yaml --partition "$OUT/p_speakers" \
  --seed-checkpoint "$OUT/central/seed_checkpoint" --output-dir "$OUT/speakers" "${FL_COMMON[@]}" \
  --set clients_per_round=4 --set "client_num_gpus=$SPEAKER_GPUS"
run_stage "clients$CLIENTS" "$PY" bench/gpu_smoke_report.py --clients "$CLIENTS" "$OUT" "$DEVICE" "$PRECISION"
run_stage test "$PY" bench/gpu_smoke_report.py --decode "$OUT" "$DEVICE" "$PRECISION"

"$PY" bench/gpu_smoke_report.py --report "$OUT" "$DEVICE" "$PRECISION"
