#!/usr/bin/env bash
# Latency of an exported ONNX model on an Android phone over adb, for a `command` device:
#   command: "infra/devices/adb_benchmark.sh {model} {resolution}"
# Needs `adb` on PATH, one phone attached (or ANDROID_SERIAL set), and onnxruntime's
# `onnxruntime_perf_test` built for Android pushed once to $EVIT_ADB_DIR (default
# /data/local/tmp/evit). Prints the average latency in ms as its last number.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/adb_lib.sh"
model=${1:?usage: adb_benchmark.sh MODEL.onnx RESOLUTION}
runs=${EVIT_ADB_RUNS:-50}
threads=${EVIT_ADB_THREADS:-1}
adb_push_model "$model" model.onnx
out=$(adb shell "cd $adb_dir && ./onnxruntime_perf_test -e cpu -m times -r $runs -x $threads -y 1 model.onnx")
# onnxruntime_perf_test prints "Average inference time cost: 12.34 ms"
ms=$(printf '%s\n' "$out" | sed -n 's/.*Average inference time cost[^0-9]*\([0-9.]*\).*/\1/p' | tail -1)
if [ -z "$ms" ]; then
  printf 'no latency in onnxruntime_perf_test output:\n%s\n' "$out" >&2
  exit 1
fi
echo "$ms"
