#!/usr/bin/env bash
# Latency of a .tflite on an Android phone over adb with LiteRT's prebuilt benchmark tool,
# for a `command` device with `format: tflite`:
#   command: "infra/devices/litert_benchmark.sh {model} --threads {threads} --runs {repeats} --warmup {warmup}"
#   (add --gpu for the GPU delegate; the device's `gpu: true` documents it in the LUT)
# Needs `adb` on PATH, one phone attached (or ANDROID_SERIAL set) and LiteRT's
# `android_aarch64_benchmark_model` pushed once to $EVIT_ADB_DIR (default /data/local/tmp/evit)
# as `benchmark_model` (README, "Deploy to a phone"). Prints the average latency in ms as
# its last line; exits non-zero, with the tool's output on stderr, when there is none.
set -euo pipefail
usage="usage: litert_benchmark.sh MODEL.tflite [--threads N] [--runs R] [--warmup W] [--gpu]"
model=${1:?$usage}
shift
threads=1 runs=50 warmup=10 gpu=false
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=${2:?$usage}; shift 2 ;;
    --runs) runs=${2:?$usage}; shift 2 ;;
    --warmup) warmup=${2:?$usage}; shift 2 ;;
    --gpu) gpu=true; shift ;;
    *) printf '%s\nunknown argument: %s\n' "$usage" "$1" >&2; exit 2 ;;
  esac
done
[ -f "$model" ] || { printf 'model file not found: %s\n' "$model" >&2; exit 2; }
dir=${EVIT_ADB_DIR:-/data/local/tmp/evit}
adb shell mkdir -p "$dir" >/dev/null
adb push "$model" "$dir/model.tflite" >/dev/null
status=0
out=$(adb shell "cd $dir && ./benchmark_model --graph=model.tflite --num_threads=$threads --use_gpu=$gpu \
  --num_runs=$runs --warmup_runs=$warmup; echo evit-exit=\$?" 2>&1) || status=$?
# benchmark_model prints
#   Inference timings in us: Init: X, First inference: Y, Warmup (avg): Z, Inference (avg): W
us=$(printf '%s\n' "$out" | sed -n 's/.*Inference timings in us:.*Inference (avg): *\([0-9.eE+-]*\).*/\1/p' | tail -1)
remote=$(printf '%s\n' "$out" | sed -n 's/.*evit-exit=\([0-9]*\).*/\1/p' | tail -1)
if [ "$status" -ne 0 ] || [ "${remote:-1}" -ne 0 ] || [ -z "$us" ]; then
  printf 'benchmark_model failed (adb status %s, tool status %s) or printed no "Inference (avg)":\n%s\n' \
    "$status" "${remote:-?}" "$out" >&2
  exit 1
fi
awk -v us="$us" 'BEGIN { printf "%.6f\n", us / 1000.0 }'
