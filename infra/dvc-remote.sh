#!/usr/bin/env bash
# Point the project's DVC remote `evit` at S3 (AWS, MinIO, any S3-compatible endpoint) by
# hand, as `evit pipeline` does from params.yaml `storage:`. No credentials are written:
# DVC reads them from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or the
# AWS profile.
#
#   infra/dvc-remote.sh s3://bucket/prefix [ENDPOINT_URL] [REGION]
#   infra/dvc-remote.sh s3://evit-dvc/store http://127.0.0.1:9000     # local MinIO / moto
#   infra/dvc-remote.sh .dvc-remote                                   # back to the local directory
#
# Keep params.yaml `storage.remote` / `storage.endpoint_url` in sync (the pipeline rewrites
# the remote from them). A machine-local endpoint (not shared with the team) belongs in
# .dvc/config.local: `dvc remote modify --local evit endpointurl URL`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
url="${1:?usage: infra/dvc-remote.sh s3://bucket/prefix|DIR [ENDPOINT_URL] [REGION]}"
DVC="$( [[ -x .venv/bin/dvc ]] && echo .venv/bin/dvc || echo dvc )"
export DVC_NO_ANALYTICS=1

"$DVC" remote add --force --default evit "$url"
if [[ "$url" == s3://* ]]; then
  if [[ -n "${2:-}" ]]; then "$DVC" remote modify evit endpointurl "$2"; else "$DVC" remote modify --unset evit endpointurl || true; fi
  "$DVC" remote modify evit region "${3:-us-east-1}"
fi
"$DVC" remote list
