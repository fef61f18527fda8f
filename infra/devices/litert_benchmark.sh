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
source "$(dirname "${BASH_SOURCE[0]}")/adb_lib.sh"
usage="usage: litert_benchmark.sh MODEL.tflite [--threads N] [--runs R] [--warmup W] [--gpu]"
model=${1:?$usage}
shift
threads=1 runs=50 warmup=10 gpu=false
adb_tool_flag() { [ "$1" = --gpu ] && gpu=true; }
adb_parse_options "$@"
adb_check_model "$model"
adb_push_model "$model" model.tflite
adb_run "./benchmark_model --graph=model.tflite --num_threads=$threads --use_gpu=$gpu \
  --num_runs=$runs --warmup_runs=$warmup"
# benchmark_model prints
#   Inference timings in us: Init: X, First inference: Y, Warmup (avg): Z, Inference (avg): W
us=$(printf '%s\n' "$adb_out" | sed -n 's/.*Inference timings in us:.*Inference (avg): *\([0-9.eE+-]*\).*/\1/p' | tail -1)
adb_require_result "$us" benchmark_model tool 'Inference (avg)'
awk -v us="$us" 'BEGIN { printf "%.6f\n", us / 1000.0 }'
