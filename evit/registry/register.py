"""Registering exported subnets: one model version each, aliases that only move forward.

Registration (`register_export`, called by the export stage per budget folder):
- Each exported subnet becomes one version of the registered model
  `export.model_name.format(device=...)` (default `evit-<device>`). The version's source
  is an MLflow 3 LoggedModel holding the static subnet as `mlflow.pytorch` in the `pt2`
  format (torch.export: no pickle), with a signature and an input example, plus the
  deployable files of the bundle (`evit.formats.bundle`) as extra files.
- Every fact of the model card is a version tag (`evit.registry.tags`). Registering the
  same model again (a re-run, or the same subnet winning two budgets) finds its content
  hash tag and creates no new version; files the export has and that version lacks (an
  int8 file from a later `export.quantize: [fp32, int8]`) are added to it, hashed and tagged
  like the others (`_add_new_files`).
- Aliases: `<budget-label>` points at the most accurate version registered for that
  budget; `champion` points at the most accurate version of the device across all its
  budgets (what to deploy when any budget is acceptable). "Most accurate" is val top-1
  (tag `evit.val_top1`); an alias moves to a new version only when it is at least as
  accurate as the current holder (ties go to the newer version), never backwards.
- Transient failures are retried (`evit.registry.connection`). A failed attempt is rolled
  back: aliases restored, the version, the logged model and the run deleted, and the
  registered model deleted if this attempt created it. So nothing half-registered stays.
  (MLflow soft-deletes runs; `mlflow gc` purges them.)

The registry is an output of the export stage: `restore_registrations` registers again,
from the exported files, what a new or wiped registry lacks.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evit import paths
from evit.config import Params
from evit.errors import RegistryError
from evit.formats import bundle
from evit.io import read_json, sha256_file
from evit.registry.connection import error_code, http_policy, mlflow_client, retrying
from evit.registry.tags import (
    CHAMPION,
    FILE_TAG_PREFIX,
    HASH_TAG,
    PT2_TAG,
    RUN_HASH_TAG,
    accuracy,
    card_tags,
    content_hash,
    sanitize_alias,
)
from evit.retry import short
from evit.tracking import ensure_experiment, parent_run_id, registry_uri

log = logging.getLogger(__name__)


@dataclass
class _Undo:
    """What one registration attempt created, so a failure can take it back."""

    run_id: str | None = None
    model_id: str | None = None
    version: str | None = None
    created_model: bool = False
    aliases: dict[str, str | None] = field(default_factory=dict)
    """alias -> version it pointed at before we moved it (None: it did not exist)."""


def _rollback(client: Any, name: str, undo: _Undo) -> list[str]:
    """Take back what `undo` lists; returns what could not be removed (for the error message)."""
    left: list[str] = []

    def attempt(desc: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - best effort, reported
            left.append(f"{desc} ({short(exc)})")

    for alias, previous in undo.aliases.items():
        if previous is None:
            attempt(f"alias {name}@{alias}", lambda a=alias: client.delete_registered_model_alias(name, a))
        else:
            attempt(f"alias {name}@{alias}",
                    lambda a=alias, p=previous: client.set_registered_model_alias(name, a, p))
    if undo.version is not None:
        attempt(f"version {name}/{undo.version}", lambda: client.delete_model_version(name, undo.version))
    if undo.model_id is not None:
        attempt(f"logged model {undo.model_id}", lambda: client.delete_logged_model(undo.model_id))
    if undo.run_id is not None:
        attempt(f"run {undo.run_id}", lambda: client.delete_run(undo.run_id))
    if undo.created_model:
        def drop_if_empty() -> None:
            if not client.search_model_versions(f"name = '{name}'", max_results=1):
                client.delete_registered_model(name)

        attempt(f"registered model {name}", drop_if_empty)
    if left:
        log.error("rollback of %s left: %s", name, "; ".join(left))
    return left


def _alias_holder(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if error_code(exc) in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _move_aliases(client: Any, name: str, mv: Any, budget_alias: str, undo: _Undo) -> list[str]:
    """Point `budget_alias` and `champion` at `mv` where it is at least as accurate as the holder."""
    moved = []
    acc = accuracy(mv)
    for alias in (budget_alias, CHAMPION):
        holder = _alias_holder(client, name, alias)
        if holder is not None and str(holder.version) == str(mv.version):
            moved.append(alias)
            continue
        if holder is None or acc >= accuracy(holder):
            undo.aliases[alias] = None if holder is None else str(holder.version)
            client.set_registered_model_alias(name, alias, str(mv.version))
            log.info("alias %s@%s -> version %s (val top-1 %.4f%s)", name, alias, mv.version, acc,
                     "" if holder is None else f", was version {holder.version} at {accuracy(holder):.4f}")
            moved.append(alias)
        else:
            log.info("alias %s@%s stays on version %s (val top-1 %.4f > %.4f)", name, alias, holder.version,
                     accuracy(holder), acc)
    return moved


def _clean_orphans(client: Any, experiment_id: str, digest: str) -> None:
    """Delete runs + logged models of earlier attempts for this model that never got a version.

    A registry that dies between logging the model and creating the version leaves them
    behind (the rollback cannot reach it); the next registration of the same model, with
    no version carrying its hash, removes them before starting over.
    """
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_HASH_TAG}` = '{digest}'")
    for run in runs:
        for lm in client.search_logged_models([experiment_id],
                                              filter_string=f"source_run_id = '{run.info.run_id}'"):
            client.delete_logged_model(lm.model_id)
        client.delete_run(run.info.run_id)
        log.info("removed run %s (and its logged model) of an earlier, unfinished registration", run.info.run_id)


def _find_by_hash(client: Any, name: str, digest: str) -> Any | None:
    found = client.search_model_versions(f"name = '{name}' and tags.`{HASH_TAG}` = '{digest}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def ensure_registered_model(client: Any, name: str, device: str) -> bool:
    """Create the registered model of `device` unless it exists; True when this call created it.
    (Also `evit grant-roles`: an admin creates the names first, so no other account claims them.)"""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return False
    except MlflowException as exc:
        if error_code(exc) not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            raise
    client.create_registered_model(
        name, tags={"evit.device": device},
        description=f"ElasticViT subnets for device {device}: one version per exported subnet; "
                    f"alias per budget and '{CHAMPION}' = most accurate across budgets.")
    return True


def _ensure_registered_model(client: Any, name: str, device: str, undo: _Undo) -> None:
    if ensure_registered_model(client, name, device):
        undo.created_model = True


def _signature_and_example(card: dict[str, Any]) -> tuple[Any, Any]:
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    r = int(card["arch"]["resolution"])
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, r, r))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(card["num_classes"])))]),
    )
    # Batch 2: torch.export would specialise a batch dimension of 1 to a constant.
    example = np.random.default_rng(0).standard_normal((2, 3, r, r)).astype(np.float32)
    return signature, example


def _logged_pt2_sha256(client: Any, model_id: str) -> str:
    """Hash the pt2 graph as stored (downloaded back), so fetch can verify it like the rest."""
    import mlflow

    location = client.get_logged_model(model_id).artifact_location.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="evit-pt2-") as tmp:
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/data/model.pt2", dst_path=tmp)
        return sha256_file(path)


def _logged_model_id(source: str | None) -> str | None:
    """The logged model a version was created from, read from its source `models:/<model_id>`
    (a sqlite registry does not return the version's `model_id`)."""
    m = re.fullmatch(r"models:/(m-[0-9a-f]+)", source or "")
    return m[1] if m else None


def _add_new_files(client: Any, name: str, mv: Any, folder: Path, tags: dict[str, str]) -> list[str]:
    """Bring an already registered version up to an export of the same model that has files
    the version lacks (e.g. `model.int8.pte` from a re-export with `export.quantize: [fp32,
    int8]`); returns the names uploaded, [] when the version already has every file.

    Only a file the version lacks triggers an update; then every file of the folder whose
    sha256 differs from the version's tag is uploaded into the logged model's `extra_files/`
    (the new files, and the card that now describes them), and only after all uploads are
    the `evit.sha256.<file>` tags set, so a version never records a hash of a file it does
    not hold (a fetch in between may see the new card before its tag: it refuses, as for
    any mismatch). A failed upload is retried whole (re-uploading is idempotent). Files the
    version has but the folder lacks stay (they are files of the same model)."""
    have = {k[len(FILE_TAG_PREFIX):]: v for k, v in mv.tags.items() if k.startswith(FILE_TAG_PREFIX)}
    want = {k[len(FILE_TAG_PREFIX):]: v for k, v in tags.items() if k.startswith(FILE_TAG_PREFIX)}
    if not set(want) - set(have):
        return []
    model_id = mv.model_id or _logged_model_id(mv.source)
    if not model_id:
        raise RegistryError(f"{name}/{mv.version} lacks {', '.join(sorted(set(want) - set(have)))} and has no "
                            "logged model to add them to (registered by an older evit); register under a new "
                            "export.model_name, or delete the version and export again")
    changed = sorted(f for f, digest in want.items() if have.get(f) != digest)
    for f in changed:
        client.log_model_artifact(model_id, str(folder / f), artifact_path="extra_files")
    for f in changed:
        client.set_model_version_tag(name, mv.version, FILE_TAG_PREFIX + f, want[f])
    log.info("%s version %s: added %s from %s", name, mv.version, ", ".join(changed), folder)
    return changed


def _register_once(client: Any, params: Params, name: str, folder: Path, card: dict[str, Any],
                   tags: dict[str, str], undo: _Undo, on_step: Callable[[str], None]) -> dict[str, Any]:
    import mlflow
    import torch

    label = card["budget"]["label"]
    alias = sanitize_alias(label)
    existing = _find_by_hash(client, name, tags[HASH_TAG])
    if existing is not None:
        budgets = sorted(set(existing.tags.get("evit.budgets", "").split(",")) - {""} | {label})
        if ",".join(budgets) != existing.tags.get("evit.budgets"):
            client.set_model_version_tag(name, existing.version, "evit.budgets", ",".join(budgets))
        added = _add_new_files(client, name, existing, folder, tags)
        if added:
            on_step("files-added")
        moved = _move_aliases(client, name, existing, alias, undo)
        on_step("reused")
        log.info("%s: same model already registered as version %s; no new version%s", name, existing.version,
                 f" (added {', '.join(added)})" if added else "")
        return {"version": str(existing.version), "created": False, "aliases": moved, "added": added}

    experiment_id = ensure_experiment(params)
    _clean_orphans(client, experiment_id, tags[HASH_TAG])
    _ensure_registered_model(client, name, card["device"]["name"], undo)
    on_step("registered-model")
    module = bundle.load_static(folder)
    signature, example = _signature_and_example(card)
    run_tags = {"evit.stage": "register", "evit.device": card["device"]["name"], "evit.budget": label,
                RUN_HASH_TAG: tags[HASH_TAG]}
    parent = parent_run_id()
    if parent:
        run_tags["mlflow.parentRunId"] = parent
    run = client.create_run(experiment_id, run_name=f"register-{name}-{label}", tags=run_tags)
    undo.run_id = run.info.run_id
    on_step("run")
    with mlflow.start_run(run_id=run.info.run_id, nested=mlflow.active_run() is not None):
        mlflow.log_metrics({k: float(v) for k, v in card["metrics"].items()}
                           | {"latency_predicted_ms": float(card["latency"]["predicted_ms"]),
                              "latency_measured_ms": float(card["latency"]["measured_ms"])})
        info = mlflow.pytorch.log_model(
            module, name="model", signature=signature, input_example=example,
            serialization_format="pt2", extra_files=[str(folder / f) for f in bundle.files_in(folder)],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
            tags={HASH_TAG: tags[HASH_TAG]},
        )
        undo.model_id = info.model_id
        on_step("logged-model")
    tags = {**tags, PT2_TAG: _logged_pt2_sha256(client, info.model_id)}
    mv = client.create_model_version(name, source=info.model_uri, run_id=run.info.run_id, tags=tags,
                                     model_id=info.model_id,
                                     description=f"{card['device']['name']} {card['budget']['text']}: "
                                                 f"val top-1 {card['metrics']['val_top1']:.4f}, "
                                                 f"{card['latency']['measured_ms']:.3f} ms measured")
    undo.version = str(mv.version)
    on_step("version")
    moved = _move_aliases(client, name, mv, alias, undo)
    on_step("aliases")
    log.info("registered %s version %s (%s), aliases %s", name, mv.version, label, moved)
    return {"version": str(mv.version), "created": True, "aliases": moved, "added": []}


def register_export(params: Params, folder: Path, *, on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Register one exported subnet folder (card.json + model files) as a model version.

    Returns {"name", "label", "version", "created", "aliases", "added"} (`added`: files
    uploaded to an existing version of the same model, e.g. an int8 file exported later). `on_step` is told each
    step as it completes (progress; tests use it to fail the registry at a given step).
    """
    folder = Path(folder)
    card = bundle.read_card(folder)
    for f in bundle.CORE_FILES:
        if not (folder / f).is_file():
            raise RegistryError(f"{folder}: {f} is missing; re-run `evit export -d {card['device']['name']}`")
    card_files = {f: sha256_file(folder / f) for f in bundle.files_in(folder)}
    for f, digest in card["files"].items():
        if (card_files.get(f) or sha256_file(folder / f)) != digest:
            raise RegistryError(f"{folder / f} does not match the sha256 in its card; re-run the export")
    tags = card_tags(card, card_files)
    name = params.export.model_name.format(device=card["device"]["name"])
    uri = registry_uri(params)
    retries = params.tracking.retries
    step = on_step or (lambda s: None)
    with http_policy():
        client = mlflow_client(params)
        undo = _Undo()
        left: list[str] = []

        def rollback() -> None:
            nonlocal undo
            left.extend(_rollback(client, name, undo))
            undo = _Undo()

        def attempt() -> dict[str, Any]:
            return _register_once(client, params, name, folder, card, tags, undo, step)

        try:
            out = retrying(f"registering {name} ({card['budget']['label']})", attempt, retries, uri,
                         on_failure=rollback)
        except RegistryError as exc:
            if left:
                raise RegistryError(f"{exc}\nCould not clean up (remove by hand): {'; '.join(left)}") from exc
            raise
        except Exception as exc:
            if error_code(exc) is not None:
                raise RegistryError(f"registering {name} at {uri} failed: {short(exc)}") from exc
            raise
    return {"name": name, "label": card["budget"]["label"], **out}


def missing_registrations(params: Params, device: str) -> list[Path]:
    """Exported folders of `device` (exports/<device>/index.json) whose model the configured
    registry does not hold (looked up by content hash): a new server, a wiped database."""
    index_path = paths.export_dir(params, device) / "index.json"
    if not index_path.is_file():
        return []
    name = params.export.model_name.format(device=device)
    folders = [Path(s["folder"]) for s in read_json(index_path).get("subnets", [])]
    uri = registry_uri_of(params)
    with http_policy():
        client = mlflow_client(params)
        missing = []
        for folder in folders:
            digest = content_hash(bundle.read_card(folder))
            found = retrying(f"looking up {name} in the registry", lambda d=digest: _find_by_hash(client, name, d),
                           params.tracking.retries, uri)
            if found is None:
                missing.append(folder)
    return missing


def restore_registrations(params: Params, device: str) -> list[dict[str, Any]]:
    """Register again, from the files already exported (no re-export), every subnet of
    `device` that the configured registry lacks; returns what was registered. The export
    stage's cache key covers its files, not the registry, so `evit pipeline` calls this for a
    cached export and `evit export --register-only` does it by hand (after `dvc repro`)."""
    missing = missing_registrations(params, device)
    if not missing:
        return []
    log.warning("%s: the registry at %s lacks %d subnet(s) that exports/%s recorded; registering them again "
                "from the exported files (no re-export)", params.export.model_name.format(device=device),
                registry_uri_of(params), len(missing), device)
    return [register_export(params, folder) for folder in missing]


def registry_uri_of(params: Params) -> str:
    return registry_uri(params)


