# Shared by up.sh / down.sh / status.sh: where the local stack keeps its state, its ports,
# and small helpers. Everything listens on 127.0.0.1 only.
#
# Environment (all optional):
#   EVIT_SERVICES_DIR  state directory (pid files, logs, databases, credentials)
#                      default: <repo>/.evit-cache/services
#   EVIT_S3_PORT       S3 endpoint port (MinIO if `minio` is on PATH, else moto_server), default 9000
#   EVIT_MLFLOW_PORT   MLflow tracking/registry server port, default 5000
#   EVIT_PREFECT_PORT  Prefect API/UI port, default 4200
#   EVIT_START_TIMEOUT seconds to wait for each service to answer its health check, default 180
#   EVIT_VENV          virtual environment holding mlflow/prefect/moto, default <repo>/.venv

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="${EVIT_SERVICES_DIR:-$REPO/.evit-cache/services}"
HOST=127.0.0.1
S3_PORT="${EVIT_S3_PORT:-9000}"
MLFLOW_PORT="${EVIT_MLFLOW_PORT:-5000}"
PREFECT_PORT="${EVIT_PREFECT_PORT:-4200}"
START_TIMEOUT="${EVIT_START_TIMEOUT:-180}"
VENV="${EVIT_VENV:-$REPO/.venv}"
SERVICES=(s3 mlflow prefect)   # start order; stopped in reverse
# Team mode (up.sh --team): MLflow basic-auth + Prefect auth string (infra/team), and a Caddy
# TLS proxy when `caddy` is installed. up.sh records the mode so status/down see the proxy.
MLFLOW_TLS_PORT="${EVIT_MLFLOW_TLS_PORT:-5443}"
PREFECT_TLS_PORT="${EVIT_PREFECT_TLS_PORT:-4443}"
MODE="$(cat "$STATE/mode" 2>/dev/null || echo plain)"
if [[ "$MODE" == team+proxy ]]; then SERVICES+=(proxy); fi

if [[ -x "$VENV/bin/python" ]]; then
  PY="$VENV/bin/python"
  PATH="$VENV/bin:$PATH"
else
  PY="$(command -v python3)"
fi
export PATH

s3_url() { echo "http://$HOST:$S3_PORT"; }
mlflow_url() { echo "http://$HOST:$MLFLOW_PORT"; }
prefect_url() { echo "http://$HOST:$PREFECT_PORT/api"; }

health_url() {
  case "$1" in
    s3) if [[ "$(cat "$STATE/s3.kind" 2>/dev/null)" == minio ]]; then echo "$(s3_url)/minio/health/live";
        else echo "$(s3_url)/moto-api/"; fi ;;
    mlflow) echo "$(mlflow_url)/health" ;;
    prefect) echo "$(prefect_url)/health" ;;
    proxy) echo "https://$HOST:$MLFLOW_TLS_PORT/health" ;;
  esac
}

pid_of() { cat "$STATE/$1.pid" 2>/dev/null || true; }

is_running() {
  local pid; pid="$(pid_of "$1")"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null
}

# healthy URL [TIMEOUT]: 0 once URL answers HTTP 200 (within TIMEOUT seconds, default: one try).
healthy() {
  SSL_CERT_FILE="${EVIT_HEALTH_CA:-${SSL_CERT_FILE:-}}" "$PY" - "$1" "${2:-0}" <<'PYEOF'
import sys, time, urllib.request
url, timeout = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + timeout
while True:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            if r.status == 200:
                sys.exit(0)
    except Exception:
        pass
    if time.monotonic() >= deadline:
        sys.exit(1)
    time.sleep(0.5)
PYEOF
}

# stop NAME: TERM the service's process group, wait up to 30 s, then KILL; drop its pid file.
stop_service() {
  local name="$1" pid
  pid="$(pid_of "$name")"
  if [[ -z "$pid" ]]; then return 0; fi
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "  $name (pid $pid) did not stop in 30 s; killing it" >&2
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    echo "  stopped $name (pid $pid)"
  fi
  rm -f "$STATE/$name.pid"
}
