# shellcheck shell=bash
# What the phone runners (litert_benchmark.sh, executorch_benchmark.sh, adb_benchmark.sh)
# share: sourced by them, never run. A runner sets `usage` and the defaults of `threads`,
# `runs` and `warmup`, then calls, in order:
#   adb_parse_options "$@"      the options after MODEL: --threads N --runs R --warmup W
#   adb_check_model "$model"    exit 2 when MODEL is not a file
#   adb_push_model "$model" model.EXT
#   adb_run "REMOTE COMMAND"    run in $adb_dir on the phone; sets adb_out, adb_status, adb_remote
#                               (adb_exec "REMOTE COMMAND" runs it printing the output instead)
#   (parse the tool's output in $adb_out)
#   adb_require_result "$parsed" TOOL WHO EXPECTED   exit 1 with the output unless all went well
# Files go to $EVIT_ADB_DIR on the phone (default /data/local/tmp/evit); the tools are
# pushed there once by hand (README, "Deploy to a phone").

adb_dir=${EVIT_ADB_DIR:-/data/local/tmp/evit}

# adb_parse_options ARGS...: sets the globals threads, runs and warmup from --threads N,
# --runs R and --warmup W (a missing value prints $usage and exits 1). Any other argument
# is offered to the runner's `adb_tool_flag ARG` when it defines one (a flag without a
# value, e.g. LiteRT's --gpu: it returns 0 when it took ARG); if none takes it, prints
# $usage and "unknown argument" to stderr and exits 2.
adb_parse_options() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --threads) threads=${2:?$usage}; shift 2 ;;
      --runs) runs=${2:?$usage}; shift 2 ;;
      --warmup) warmup=${2:?$usage}; shift 2 ;;
      *)
        if declare -F adb_tool_flag >/dev/null && adb_tool_flag "$1"; then
          shift
        else
          printf '%s\nunknown argument: %s\n' "$usage" "$1" >&2
          exit 2
        fi ;;
    esac
  done
}

# adb_check_model MODEL: exit 2, before touching the phone, when MODEL is not a file.
adb_check_model() {
  [ -f "$1" ] || { printf 'model file not found: %s\n' "$1" >&2; exit 2; }
}

# adb_push_model MODEL NAME: creates $adb_dir on the phone and pushes MODEL there as NAME.
adb_push_model() {
  adb shell mkdir -p "$adb_dir" >/dev/null
  adb push "$1" "$adb_dir/$2" >/dev/null
}

# adb_exec COMMAND: runs COMMAND in $adb_dir on the phone and prints everything adb
# printed (stderr included), then evit-exit=N with COMMAND's exit status on the phone
# (adb does not always pass it on); returns adb's own exit status.
adb_exec() {
  adb shell "cd $adb_dir && $1; echo evit-exit=\$?" 2>&1
}

# adb_run COMMAND: adb_exec COMMAND, capturing: sets adb_out (the output), adb_status
# (adb's exit status) and adb_remote (COMMAND's exit status on the phone; empty when the
# evit-exit line never came back).
adb_run() {
  adb_status=0
  adb_out=$(adb_exec "$1") || adb_status=$?
  adb_remote=$(printf '%s\n' "$adb_out" | sed -n 's/.*evit-exit=\([0-9]*\).*/\1/p' | tail -1)
}

# adb_require_result VALUE TOOL WHO EXPECTED: after adb_run, unless adb and the remote
# command both exited 0 and VALUE (what the runner parsed from $adb_out) is not empty,
# prints "TOOL failed (adb status S, WHO status R) or printed no "EXPECTED":" and the
# tool's output to stderr, and exits 1.
adb_require_result() {
  if [ "$adb_status" -ne 0 ] || [ "${adb_remote:-1}" -ne 0 ] || [ -z "$1" ]; then
    printf '%s failed (adb status %s, %s status %s) or printed no "%s":\n%s\n' \
      "$2" "$adb_status" "$3" "${adb_remote:-?}" "$4" "$adb_out" >&2
    exit 1
  fi
}
