#!/usr/bin/env bash
# Start the team services on this machine without Docker, on 127.0.0.1:
#   S3       MinIO if `minio` is on PATH (persistent), else moto_server (in memory)
#   MLflow   `mlflow server`: sqlite backend, artifacts proxied to s3://evit-mlflow/artifacts
#   Prefect  `prefect server start` (sqlite)
# Each runs in its own process group with a pid file and a log under $EVIT_SERVICES_DIR;
# `up.sh` waits for every health check and, if one fails, stops what it started.
# Then:  source "$EVIT_SERVICES_DIR/env.sh"   (endpoints + generated local credentials)
# See common.sh for the ports and other settings.
#
# up.sh --team: team mode (docs/operations.md#team-mode). Secrets from $EVIT_ENV_FILE (default
# infra/.env: MLFLOW_ADMIN_PASSWORD, MLFLOW_SECRET_KEY, PREFECT_AUTH_STRING; defaults refused);
# MLflow with basic-auth (infra/team/mlflow-server.sh), Prefect with the auth string, a
# certificate in $EVIT_SERVICES_DIR/tls (made once, or put a real cert.pem/key.pem there) and,
# if `caddy` is installed, a TLS proxy on all interfaces (:5443 MLflow, :4443 Prefect).
set -euo pipefail
TEAM_MODE=0
if [[ "${1:-}" == "--team" ]]; then TEAM_MODE=1; fi
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

umask 077
mkdir -p "$STATE/logs"
started=()

fail() {
  echo "error: $1" >&2
  [[ -f "$STATE/logs/$2.log" ]] && { echo "--- last lines of $STATE/logs/$2.log:" >&2; tail -n 40 "$STATE/logs/$2.log" >&2; }
  for s in "${started[@]}"; do stop_service "$s"; done
  exit 1
}

# Local credentials: generated once, never in the repository.
if [[ ! -f "$STATE/credentials" ]]; then
  secret="$("$PY" -c 'import secrets; print(secrets.token_hex(20))')"
  printf 'AWS_ACCESS_KEY_ID=evit-local\nAWS_SECRET_ACCESS_KEY=%s\n' "$secret" > "$STATE/credentials"
fi
set -a; source "$STATE/credentials"; set +a
export AWS_DEFAULT_REGION=us-east-1 AWS_REGION=us-east-1
unset AWS_PROFILE AWS_ENDPOINT_URL AWS_ENDPOINT_URL_S3 MLFLOW_TRACKING_URI PREFECT_API_URL || true

# launch NAME CMD...: run CMD in a new session (its own process group), log, pid file.
launch() {
  local name="$1"; shift
  if is_running "$name"; then
    echo "  $name already running (pid $(pid_of "$name"))"
    return 0
  fi
  setsid "$@" > "$STATE/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$STATE/$name.pid"
  started+=("$name")
}

wait_up() {
  local name="$1" url; url="$(health_url "$name")"
  healthy "$url" "$START_TIMEOUT" || { is_running "$name" || true; fail "$name did not answer $url within ${START_TIMEOUT}s" "$name"; }
  echo "  $name healthy: $url"
}

echo "starting evit services (state: $STATE)"
# --- S3 ----------------------------------------------------------------------------------------
if command -v minio > /dev/null 2>&1; then
  echo minio > "$STATE/s3.kind"
  MINIO_ROOT_USER="$AWS_ACCESS_KEY_ID" MINIO_ROOT_PASSWORD="$AWS_SECRET_ACCESS_KEY" \
    launch s3 minio server "$STATE/minio-data" --address "$HOST:$S3_PORT" --console-address "$HOST:$((S3_PORT + 1))"
else
  echo moto > "$STATE/s3.kind"
  command -v moto_server > /dev/null 2>&1 || fail "neither minio nor moto_server found (pip install 'moto[server]')" s3
  launch s3 moto_server -H "$HOST" -p "$S3_PORT"
fi
wait_up s3
"$PY" - "$(s3_url)" <<'PYEOF' || fail "could not create the buckets" s3
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1])
have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
for bucket in ("evit-dvc", "evit-mlflow", "evit-data"):
    if bucket not in have:
        s3.create_bucket(Bucket=bucket)
PYEOF

# --- MLflow and Prefect (team mode: authenticated, infra/team's launchers) ---------------------
MLFLOW_ARGS=(--host "$HOST" --port "$MLFLOW_PORT" --workers 1 --backend-store-uri "sqlite:///$STATE/mlflow.db"
             --artifacts-destination s3://evit-mlflow/artifacts)
if (( TEAM_MODE )); then
  ENV_FILE="${EVIT_ENV_FILE:-$REPO/infra/.env}"
  [[ -f "$ENV_FILE" ]] || fail "team mode reads its secrets from $ENV_FILE: copy infra/.env.example there and set them" s3
  set -a; source "$ENV_FILE"; set +a
  "$PY" "$REPO/infra/team/make_cert.py" "$STATE/tls" --host "${EVIT_PUBLIC_HOST:-localhost}" --host localhost \
    --host "$HOST" > /dev/null
  MLFLOW_S3_ENDPOINT_URL="$(s3_url)" launch mlflow "$REPO/infra/team/mlflow-server.sh" "$STATE/mlflow-auth" \
    "${MLFLOW_ARGS[@]}"
  wait_up mlflow
  PREFECT_HOME="$STATE/prefect" launch prefect "$REPO/infra/team/prefect-server.sh" --host "$HOST" --port "$PREFECT_PORT"
  wait_up prefect
  if command -v caddy > /dev/null 2>&1; then
    echo team+proxy > "$STATE/mode"; SERVICES+=(proxy)
    EVIT_CERTS="$STATE/tls" MLFLOW_UPSTREAM="$HOST:$MLFLOW_PORT" PREFECT_UPSTREAM="$HOST:$PREFECT_PORT" \
      MLFLOW_TLS_PORT="$MLFLOW_TLS_PORT" PREFECT_TLS_PORT="$PREFECT_TLS_PORT" \
      launch proxy caddy run --adapter caddyfile --config "$REPO/infra/team/Caddyfile"
    EVIT_HEALTH_CA="$STATE/tls/ca.pem" wait_up proxy
  else
    echo team > "$STATE/mode"
    echo "  warning: caddy is not installed: MLflow and Prefect stay on $HOST over plain HTTP (authenticated)." >&2
    echo "           To share them, install caddy (apt install caddy) and run up.sh --team again." >&2
  fi
else
  echo plain > "$STATE/mode"
  MLFLOW_S3_ENDPOINT_URL="$(s3_url)" MLFLOW_ENABLE_TELEMETRY=false launch mlflow mlflow server "${MLFLOW_ARGS[@]}"
  wait_up mlflow
  PREFECT_HOME="$STATE/prefect" PREFECT_SERVER_ANALYTICS_ENABLED=false \
    launch prefect prefect server start --host "$HOST" --port "$PREFECT_PORT" --analytics-off
  wait_up prefect
fi

cat > "$STATE/env.sh" <<ENVEOF
# source me: the local evit services (written by infra/local/up.sh)
set -a
source "$STATE/credentials"
set +a
export AWS_DEFAULT_REGION=us-east-1
export AWS_ENDPOINT_URL=$(s3_url)
export MLFLOW_S3_ENDPOINT_URL=$(s3_url)
export MLFLOW_TRACKING_URI=$(mlflow_url)
export PREFECT_API_URL=$(prefect_url)
ENVEOF
if [[ "$(cat "$STATE/mode")" == team* ]]; then
  if [[ "$(cat "$STATE/mode")" == team+proxy ]]; then
    printf 'export MLFLOW_TRACKING_URI=https://%s:%s\nexport PREFECT_API_URL=https://%s:%s/api\n' \
      "${EVIT_PUBLIC_HOST:-localhost}" "$MLFLOW_TLS_PORT" "${EVIT_PUBLIC_HOST:-localhost}" "$PREFECT_TLS_PORT" >> "$STATE/env.sh"
  fi
  cat >> "$STATE/env.sh" <<ENVEOF
export MLFLOW_TRACKING_SERVER_CERT_PATH=$STATE/tls/ca.pem
export PREFECT_API_SSL_CERT_FILE=$STATE/tls/ca.pem
# team mode: your own login, never written here:
#   export MLFLOW_TRACKING_USERNAME=pipeline MLFLOW_TRACKING_PASSWORD=...  PREFECT_API_AUTH_STRING=...
ENVEOF
fi
echo "ready. Use them with:  source $STATE/env.sh"
