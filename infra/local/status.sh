#!/usr/bin/env bash
# Report each local service: running (pid) and healthy (its health URL answers 200).
# Exit 0 when all are healthy, 3 otherwise.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

bad=0
for s in "${SERVICES[@]}"; do
  url="$(health_url "$s")"
  if is_running "$s"; then
    if healthy "$url"; then
      printf '%-8s up       pid %-7s %s\n' "$s" "$(pid_of "$s")" "$url"
    else
      printf '%-8s UNHEALTHY pid %-6s %s (log: %s)\n' "$s" "$(pid_of "$s")" "$url" "$STATE/logs/$s.log"; bad=1
    fi
  else
    printf '%-8s down\n' "$s"; bad=1
  fi
done
exit $(( bad ? 3 : 0 ))
