#!/usr/bin/env bash
# Prefect server with an API auth string: the one launcher of team mode, used by
# infra/docker-compose.yml and infra/local/up.sh --team.
#
#   prefect-server.sh [prefect server start arguments: --host, --port, ...]
#
# Environment:
#   PREFECT_AUTH_STRING   required; USER:PASSWORD that every client and worker sends
#                         (as PREFECT_API_AUTH_STRING); the API answers 401 to anything else
#                         (GET /api/health and /api/ready stay open for probes)
# Telemetry is off.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/secrets.sh"

require_secret PREFECT_AUTH_STRING
if [[ "$PREFECT_AUTH_STRING" != *:* ]]; then
  echo "error: PREFECT_AUTH_STRING must be USER:PASSWORD (e.g. evit:\$(openssl rand -hex 24)) in infra/.env" >&2
  exit 2
fi
export PREFECT_SERVER_API_AUTH_STRING="$PREFECT_AUTH_STRING"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
unset PREFECT_AUTH_STRING PREFECT_API_AUTH_STRING
exec prefect server start --analytics-off "$@"
