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
usage="usage: executorch_benchmark.sh MODEL.pte [--threads N] [--runs R] [--warmup W]"
model=${1:?$usage}
shift
threads=1 runs=50 warmup=5
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=${2:?$usage}; shift 2 ;;
    --runs) runs=${2:?$usage}; shift 2 ;;
    --warmup) warmup=${2:?$usage}; shift 2 ;;
    *) printf '%s\nunknown argument: %s\n' "$usage" "$1" >&2; exit 2 ;;
  esac
done
[ -f "$model" ] || { printf 'model file not found: %s\n' "$model" >&2; exit 2; }
dir=${EVIT_ADB_DIR:-/data/local/tmp/evit}
adb shell mkdir -p "$dir" >/dev/null
adb push "$model" "$dir/model.pte" >/dev/null
run() {  # $1 executions; prints the runner's output, then evit-exit=STATUS
  adb shell "cd $dir && ./executor_runner --model_path=model.pte --num_executions=$1 --cpu_threads=$threads; \
echo evit-exit=\$?" 2>&1
}
if [ "$warmup" -gt 0 ]; then run "$warmup" >/dev/null || true; fi
status=0
out=$(run "$runs") || status=$?
# executor_runner prints "Model executed successfully R time(s) in X ms."
line=$(printf '%s\n' "$out" | grep -E 'Model executed successfully [0-9]+ time\(s\) in [0-9.]+ ms' | tail -1 || true)
remote=$(printf '%s\n' "$out" | sed -n 's/.*evit-exit=\([0-9]*\).*/\1/p' | tail -1)
if [ "$status" -ne 0 ] || [ "${remote:-1}" -ne 0 ] || [ -z "$line" ]; then
  printf 'executor_runner failed (adb status %s, runner status %s) or printed no "Model executed successfully":\n%s\n' \
    "$status" "${remote:-?}" "$out" >&2
  exit 1
fi
n=$(printf '%s\n' "$line" | sed -E 's/.*successfully ([0-9]+) time\(s\) in ([0-9.]+) ms.*/\1/')
total=$(printf '%s\n' "$line" | sed -E 's/.*successfully ([0-9]+) time\(s\) in ([0-9.]+) ms.*/\2/')
awk -v t="$total" -v n="$n" 'BEGIN { if (n <= 0) exit 1; printf "%.6f\n", t / n }'
