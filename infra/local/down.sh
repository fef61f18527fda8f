#!/usr/bin/env bash
# Stop the services infra/local/up.sh started (reverse order, TERM then KILL after 30 s).
# Their data (MLflow/Prefect databases, MinIO files, credentials) stays in $EVIT_SERVICES_DIR;
# `down.sh --purge` deletes it too.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

echo "stopping evit services (state: $STATE)"
for (( i=${#SERVICES[@]}-1; i>=0; i-- )); do
  stop_service "${SERVICES[$i]}"
done
if [[ "${1:-}" == "--purge" ]]; then
  rm -rf "$STATE"
  echo "  removed $STATE"
fi
