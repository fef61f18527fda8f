"""Team mode's two accounts and their grants on an MLflow basic-auth server (`evit grant-roles`).

The server runs with `default_permission = NO_PERMISSIONS` (infra/team/mlflow-server.sh), so
an account sees only what it is granted. This module, run by the admin, creates:

- `pipeline` (EDIT): writes runs into the experiment `tracking.experiment` and registers
  versions and moves aliases of each registered model `export.model_name` of the devices in
  params (plus every existing model whose name has the same prefix, e.g. `evit-*`). EDIT,
  not MANAGE: it cannot delete a model, a version or a run, nor grant anything.
- `reader` (READ): finds and downloads those models (`evit fetch`), and nothing else; its
  attempts to register a version or move an alias answer 403.

The admin creates the configured model names itself, before the pipeline runs, so no other
account can claim `evit-<device>` first (whoever creates a model gets MANAGE on it).

Limits, said plainly (MLflow basic-auth without workspaces):
- any account may create *new* experiments and registered models under names nobody holds
  yet, and manages those; it gains nothing on evit's.
- a device added to params after the last `evit grant-roles` gets its model created by the
  pipeline on its first export: the pipeline then holds MANAGE on it and the reader nothing,
  until `evit grant-roles` runs again (it is idempotent: run it after every device change).
- a failed registration cannot be rolled back by the pipeline (deleting needs MANAGE): the
  error lists what is left, for the admin to remove.

Passwords come from the environment (`EVIT_PIPELINE_PASSWORD`, `EVIT_READER_PASSWORD`) and
are needed only for accounts that do not exist yet; they never appear in output.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from evit.config import Params
from evit.errors import UserError
from evit.registry.connection import error_code, http_policy, mlflow_client, retrying
from evit.registry.register import ensure_registered_model
from evit.tracking import PASSWORD_ENV, USER_ENV, check_server, ensure_experiment, tracking_uri

log = logging.getLogger(__name__)

MIN_PASSWORD = 12


@dataclass(frozen=True)
class Role:
    """An account of team mode: its name, where its first password comes from, what it may do."""

    name: str
    password_env: str
    permission: str


def roles(pipeline: str = "pipeline", reader: str = "reader") -> tuple[Role, Role]:
    return Role(pipeline, "EVIT_PIPELINE_PASSWORD", "EDIT"), Role(reader, "EVIT_READER_PASSWORD", "READ")


def model_names(params: Params) -> list[str]:
    return [params.export.model_name.format(device=d.name) for d in params.devices]


def _existing_models(client: Any, params: Params) -> list[str]:
    """Registered models already on the server whose name has the configured prefix (`evit-`)."""
    prefix = params.export.model_name.split("{device}")[0]
    if not prefix:
        return []
    found = client.search_registered_models(filter_string=f"name LIKE '{prefix}%'")
    return [m.name for m in found]


def _user_exists(auth: Any, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        auth.get_user(name)
        return True
    except MlflowException as exc:
        if error_code(exc) in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return False
        raise


def _grant(auth: Any, user: str, resource_type: str, resource_id: str, permission: str) -> None:
    """Grant `permission`, replacing an earlier grant of the same resource (MLflow's grant is
    create-only): running grant-roles again leaves exactly this permission."""
    from mlflow.exceptions import MlflowException

    try:
        auth.grant_user_permission(user, resource_type, resource_id, permission)
    except MlflowException as exc:
        if error_code(exc) != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.revoke_user_permission(user, resource_type, resource_id)
        auth.grant_user_permission(user, resource_type, resource_id, permission)


def grant_roles(params: Params, *, pipeline: str = "pipeline", reader: str = "reader") -> dict[str, Any]:
    """Create the accounts that are missing, the experiment and the configured model names, and
    grant both roles; idempotent. Runs as the admin given by MLFLOW_TRACKING_USERNAME/PASSWORD."""
    from mlflow.server import get_app_client

    uri = tracking_uri(params)
    if not uri.startswith(("http://", "https://")):
        raise UserError(f"grant-roles needs the team's MLflow server (basic-auth); the tracking URI is {uri}: "
                        "set MLFLOW_TRACKING_URI")
    for key in (USER_ENV, PASSWORD_ENV):
        if not os.environ.get(key):
            raise UserError(f"grant-roles runs as the MLflow admin: set {USER_ENV} and {PASSWORD_ENV} "
                            f"({key} is not set)")
    if pipeline == reader:
        raise UserError(f"--pipeline and --reader are both {pipeline!r}: two accounts are needed")
    check_server(params)
    wanted = roles(pipeline, reader)
    retries = params.tracking.retries
    with http_policy():
        auth = get_app_client("basic-auth", tracking_uri=uri)
        missing = [r for r in wanted if not retrying(f"looking up user {r.name}", lambda r=r: _user_exists(auth, r.name),
                                                     retries, uri)]
        for r in missing:  # every password checked before anything changes
            password = os.environ.get(r.password_env, "")
            if len(password) < MIN_PASSWORD:
                raise UserError(f"account {r.name!r} does not exist yet: set {r.password_env} to its password "
                                f"(at least {MIN_PASSWORD} characters; e.g. openssl rand -hex 24)")
        for r in missing:
            retrying(f"creating user {r.name}", lambda r=r: auth.create_user(r.name, os.environ[r.password_env]),
                     retries, uri)
            log.info("created MLflow account %s", r.name)
        client = mlflow_client(params)
        experiment_id = retrying("creating the experiment", lambda: ensure_experiment(params), retries, uri)
        created = [name for name, device in zip(model_names(params), (d.name for d in params.devices))
                   if retrying(f"creating {name}", lambda n=name, d=device: ensure_registered_model(client, n, d),
                               retries, uri)]
        names = sorted(set(model_names(params)) | set(
            retrying("listing the registered models", lambda: _existing_models(client, params), retries, uri)))
        for r in wanted:
            retrying(f"granting {r.name} {r.permission} on experiment {params.tracking.experiment}",
                     lambda r=r: _grant(auth, r.name, "experiment", experiment_id, r.permission),
                     retries, uri)
            for name in names:
                retrying(f"granting {r.name} {r.permission} on {name}",
                         lambda r=r, n=name: _grant(auth, r.name, "registered_model", n, r.permission),
                         retries, uri)
    return {"server": uri, "users_created": [r.name for r in missing], "experiment": params.tracking.experiment,
            "models_created": created, "models": names,
            "grants": {r.name: r.permission for r in wanted}}
