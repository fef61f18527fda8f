# Sourced by the team-mode launchers (mlflow-server.sh, prefect-server.sh; compose and
# infra/local alike): a secret that is missing, a placeholder or a published default stops
# the start with one line naming the variable, before any server listens.

# Values that must never guard a shared server: the .env.example placeholder, MLflow's old
# default admin password, and the usual suspects.
_EVIT_REFUSED_SECRETS=" change-me password1234 password admin secret evit prefect mlflow "

# require_secret NAME [MIN_LENGTH]: exit 2 unless $NAME is set, long enough and not a known default.
require_secret() {
  local name="$1" min="${2:-12}" value
  value="${!1:-}"
  if [[ -z "$value" ]]; then
    echo "error: $name is not set: put it in infra/.env (generate one with: openssl rand -hex 24)" >&2
    exit 2
  fi
  local secret_part="${value#*:}"   # an auth string user:password: judge the password part
  if [[ "$_EVIT_REFUSED_SECRETS" == *" $secret_part "* || "$_EVIT_REFUSED_SECRETS" == *" $value "* ]]; then
    echo "error: $name is a default or placeholder value: set a real secret in infra/.env (openssl rand -hex 24)" >&2
    exit 2
  fi
  if (( ${#secret_part} < min )); then
    echo "error: $name is shorter than $min characters: set a longer secret in infra/.env (openssl rand -hex 24)" >&2
    exit 2
  fi
}
