#!/usr/bin/env bash
# Latency of a .pte (ExecuTorch, XNNPACK) on an Android phone over adb with ExecuTorch's
# `executor_runner`, for a `command` device with `format: pte`:
#   command: "infra/devices/executorch_benchmark.sh {model} --threads {threads} --runs {repeats} --warmup {warmup}"
# Needs `adb` on PATH, one phone attached (or ANDROID_SERIAL set) and `executor_runner`
# built with the Android NDK and XNNPACK on, pushed once to $EVIT_ADB_DIR (default
# /data/local/tmp/evit) (README, "Deploy to a phone"). The runner times all its
# executions together, so a warm-up run of `--warmup` executions comes first and the
# timed run's total is divided by `--runs`. Prints the mean latency in ms as its last line.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/adb_lib.sh"
usage="usage: executorch_benchmark.sh MODEL.pte [--threads N] [--runs R] [--warmup W]"
model=${1:?$usage}
shift
threads=1 runs=50 warmup=5
adb_parse_options "$@"
adb_check_model "$model"
adb_push_model "$model" model.pte
runner() {  # $1 executions: the remote command line
  printf './executor_runner --model_path=model.pte --num_executions=%s --cpu_threads=%s' "$1" "$threads"
}
if [ "$warmup" -gt 0 ]; then adb_exec "$(runner "$warmup")" >/dev/null || true; fi
adb_run "$(runner "$runs")"
# executor_runner prints "Model executed successfully R time(s) in X ms."
line=$(printf '%s\n' "$adb_out" | grep -E 'Model executed successfully [0-9]+ time\(s\) in [0-9.]+ ms' | tail -1 || true)
adb_require_result "$line" executor_runner runner 'Model executed successfully'
n=$(printf '%s\n' "$line" | sed -E 's/.*successfully ([0-9]+) time\(s\) in ([0-9.]+) ms.*/\1/')
total=$(printf '%s\n' "$line" | sed -E 's/.*successfully ([0-9]+) time\(s\) in ([0-9.]+) ms.*/\2/')
awk -v t="$total" -v n="$n" 'BEGIN { if (n <= 0) exit 1; printf "%.6f\n", t / n }'
