#!/usr/bin/env bash
# MLflow tracking + registry with its basic-auth app: the one launcher of team mode, used by
# infra/docker-compose.yml and infra/local/up.sh --team.
#
#   mlflow-server.sh STATE_DIR [mlflow server arguments: --host, --port, --backend-store-uri, ...]
#
# Environment:
#   MLFLOW_ADMIN_PASSWORD   required; the admin account's password, created on the first start
#                           only (later changes: `update_user_password`, docs/operations.md)
#   MLFLOW_SECRET_KEY       required; the Flask secret key (CSRF of the UI's forms), same on
#                           every worker/replica
#   MLFLOW_ADMIN_USER       default: admin
#   MLFLOW_AUTH_DATABASE_URI  the users/permissions store; default sqlite:///STATE_DIR/mlflow-auth.db
#                           (compose: its own Postgres database, mlflow_auth)
#
# What it sets: default_permission = NO_PERMISSIONS (an account sees nothing it was not
# granted), fail-closed authorization (a route without a rule answers 403, never "allowed").
# The admin password travels in MLFLOW_AUTH_ADMIN_PASSWORD, never in the ini file.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/secrets.sh"

state="${1:?usage: mlflow-server.sh STATE_DIR [mlflow server args]}"
shift
require_secret MLFLOW_ADMIN_PASSWORD
require_secret MLFLOW_SECRET_KEY 24

umask 077
mkdir -p "$state"
ini="$state/mlflow-auth.ini"
cat > "$ini" <<INI
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = ${MLFLOW_AUTH_DATABASE_URI:-sqlite:///$state/mlflow-auth.db}
admin_username = ${MLFLOW_ADMIN_USER:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
grant_default_workspace_access = false
INI

export MLFLOW_AUTH_CONFIG_PATH="$ini"
export MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_ADMIN_PASSWORD"
export MLFLOW_FLASK_SERVER_SECRET_KEY="$MLFLOW_SECRET_KEY"
export MLFLOW_BASIC_AUTH_FAIL_CLOSED=true
export MLFLOW_ENABLE_TELEMETRY=false DO_NOT_TRACK=1
unset MLFLOW_ADMIN_PASSWORD MLFLOW_SECRET_KEY MLFLOW_AUTH_DATABASE_URI
exec mlflow server --app-name basic-auth "$@"
