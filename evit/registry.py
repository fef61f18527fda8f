"""The MLflow model registry: register exported subnets, move aliases, fetch and verify.

Registration (`register_export`, called by the export stage per budget folder):
- Each exported subnet becomes one version of the registered model
  `export.model_name.format(device=...)` (default `evit-<device>`). The version's source
  is an MLflow 3 LoggedModel holding the static subnet as `mlflow.pytorch` in the `pt2`
  format (torch.export: no pickle), with a signature and an input example, plus the
  deployable files as extra files: model.onnx, arch.json, model.safetensors, card.json,
  card.md.
- Every fact of the model card is a version tag (`evit.*`), including the sha256 of each
  file (`evit.sha256.<file>`) and a content hash of the model itself (`evit.content_hash`:
  architecture + weights + space). Registering the same model again (a re-run, or the same
  subnet winning two budgets) finds that tag and creates no new version.
- Aliases: `<budget-label>` (e.g. `1_5ms`, `3ms`, `12mflops`; MLflow aliases allow only
  letters, digits, `_` and `-`) points at the most accurate version registered for that
  budget; `champion` points at the most accurate version of the device across all its
  budgets (what to deploy when any budget is acceptable). "Most accurate" is val top-1
  (tag `evit.val_top1`); an alias moves to a new version only when it is at least as
  accurate as the current holder (ties go to the newer version), never backwards.
- Transient failures (registry unreachable, 5xx) are retried `tracking.retries` times with
  exponential backoff; then `RegistryError` says what failed. A failed attempt is rolled
  back: aliases restored, the version, the logged model and the run deleted, and the
  registered model deleted if this attempt created it. So nothing half-registered stays.
  (MLflow soft-deletes runs; `mlflow gc` purges them.)

Fetch (`fetch_model`, `evit fetch NAME@ALIAS|NAME/VERSION --format onnx|torchscript|pytorch`):
downloads a version's files, checks every file against the sha256 tags recorded at
registration (a corrupt or tampered artifact store is an error, not a silent success),
writes the requested format and returns the card.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from evit.config import Params
from evit.errors import RegistryError
from evit.io import read_json, sha256_file, sha256_json, write_text_atomic
from evit.space import NON_STRUCTURAL

log = logging.getLogger(__name__)

T = TypeVar("T")

CHAMPION = "champion"
TAG_PREFIX = "evit."
HASH_TAG = "evit.content_hash"
RUN_HASH_TAG = "evit.register_hash"
PT2_TAG = "evit.pt2_sha256"
"""sha256 of the logged `data/model.pt2` (MLflow writes it, so it is hashed after logging)."""
FILE_TAG_PREFIX = "evit.sha256."
EXTRA_FILES = ("model.onnx", "arch.json", "model.safetensors", "card.json", "card.md")
MOBILE_FILES = {"tflite": "model.tflite", "pte": "model.pte"}
"""Mobile formats (export.formats): registered beside EXTRA_FILES when the export made them."""
FORMATS = ("onnx", "torchscript", "pytorch", "tflite", "pte")
_ALIAS_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_REF_RE = re.compile(r"^(?:models:/)?(?P<name>[^@/\s]+)(?:@(?P<alias>[^@/\s]+)|/(?P<version>\d+))$")

# MLflow error codes that will not go away by asking again.
_PERMANENT = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS",
              "PERMISSION_DENIED", "UNAUTHENTICATED", "INVALID_STATE", "BAD_REQUEST", "ENDPOINT_NOT_FOUND",
              "FEATURE_DISABLED", "NOT_FOUND", "ALREADY_EXISTS"}


# --- connection, retries -----------------------------------------------------------------------

@contextlib.contextmanager
def _mlflow_http_policy(timeout_s: int = 30) -> Iterator[None]:
    """Let our retry loop, not MLflow's internal one (7 tries, minutes of backoff), decide.

    A user's own MLFLOW_HTTP_REQUEST_* settings win.
    """
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s),
              "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    added = [k for k in wanted if k not in os.environ]
    for k in added:
        os.environ[k] = wanted[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _is_transient(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code not in _PERMANENT
    import requests

    return isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError))


def _error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)


def _retry(what: str, fn: Callable[[], T], retries: int, uri: str, *, base_delay: float = 0.5,
           on_failure: Callable[[], None] | None = None) -> T:
    """Call `fn`, retrying transient failures `retries` times with exponential backoff."""
    last: BaseException | None = None
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if on_failure is not None:
                on_failure()
            if not _is_transient(exc):
                raise
            last = exc
            if attempt < retries:
                delay = base_delay * 2**attempt
                log.warning("%s failed (%s); retry %d/%d in %.1fs", what, _short(exc), attempt + 1, retries, delay)
                time.sleep(delay)
    raise RegistryError(
        f"{what}: the MLflow registry at {uri} did not answer after {retries + 1} attempt(s) "
        f"(tracking.retries = {retries}); last error: {_short(last)}. Check that the server is running "
        "(MLFLOW_TRACKING_URI / tracking.uri in params.yaml)."
    ) from last


def _short(exc: BaseException | None) -> str:
    text = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else repr(exc)
    return text[:300]


def _client(params: Params) -> Any:
    from mlflow import MlflowClient

    from evit.tracking import configure, registry_uri, tracking_uri

    configure(params)
    return MlflowClient(tracking_uri=tracking_uri(params), registry_uri=registry_uri(params))


def sanitize_alias(label: str) -> str:
    """A budget label as an MLflow alias: only [A-Za-z0-9_-], not `latest`, not `v<digits>`."""
    alias = re.sub(r"[^A-Za-z0-9_-]", "_", label)
    if not alias or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        alias = f"budget-{alias}"
    return alias


# --- tags ------------------------------------------------------------------------------------

def content_hash(card: dict[str, Any]) -> str:
    """Identity of the model itself: architecture, weights and space (not budget, not timings)."""
    weights = card.get("weights_sha256") or card["files"]["model.safetensors"]
    return sha256_json({"arch": card["arch"], "weights": weights,
                        "space": {k: v for k, v in card["space"].items() if k not in NON_STRUCTURAL}})


def card_tags(card: dict[str, Any], card_files: dict[str, str]) -> dict[str, str]:
    """Everything on the card as flat MLflow tags (values are strings, JSON for structures)."""
    m, lat, prov, b = card["metrics"], card["latency"], card["provenance"], card["budget"]

    def js(obj: Any) -> str:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"))

    tags = {
        "evit.device": card["device"]["name"],
        "evit.budget": b["label"],
        "evit.budgets": b["label"],
        "evit.budget_kind": b["kind"],
        "evit.budget_value": repr(float(b["value"])),
        "evit.arch": js(card["arch"]),
        "evit.arch_key": card["arch_key"],
        "evit.resolution": str(card["arch"]["resolution"]),
        "evit.num_classes": str(card["num_classes"]),
        "evit.classes": _classes_tag(card.get("classes")),
        "evit.input": js(card["input"]),
        "evit.val_top1": repr(float(m["val_top1"])),
        "evit.search_top1": repr(float(m["search_top1"])),
        "evit.flops_m": repr(float(m["flops_m"])),
        "evit.params_m": repr(float(m["params_m"])),
        "evit.latency_predicted_ms": repr(float(lat["predicted_ms"])),
        "evit.latency_measured_ms": repr(float(lat["measured_ms"])),
        "evit.data_version": str(prov["data_version"]),
        "evit.supernet_sha256": str(prov["supernet_sha256"]),
        "evit.lut_sha256": str(prov.get("lut_sha256", "unknown")),
        "evit.git_commit": str(prov["git_commit"]),
        "evit.evit_version": str(prov["evit_version"]),
        "evit.device_params": js(card["device"]["params"]),
        "evit.device_host": js(card["device"]["host"]),
        "evit.space": js(card["space"]),
        "evit.onnx_opset": str(card["onnx"]["opset"]),
        "evit.weights_sha256": str(card.get("weights_sha256", "")),
        HASH_TAG: content_hash(card),
    }
    for name, digest in card_files.items():
        tags[FILE_TAG_PREFIX + name] = digest
    return tags


CLASSES_TAG_LIMIT = 5000
"""Longest `evit.classes` tag value (MLflow limits tag values); longer lists stay in card.json."""


def _classes_tag(classes: list[str] | None) -> str:
    """The class names in logit order as a JSON list, or a pointer to card.json when too long."""
    if not classes:
        return "unknown (card without class names)"
    text = json.dumps(classes, separators=(",", ":"))
    return text if len(text) <= CLASSES_TAG_LIMIT else f"{len(classes)} classes: see card.json (`classes`)"


def _accuracy(mv: Any) -> float:
    try:
        return float(mv.tags.get("evit.val_top1"))
    except (TypeError, ValueError):
        return float("-inf")


# --- registration ----------------------------------------------------------------------------

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
            left.append(f"{desc} ({_short(exc)})")

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
        if _error_code(exc) in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _move_aliases(client: Any, name: str, mv: Any, budget_alias: str, undo: _Undo) -> list[str]:
    """Point `budget_alias` and `champion` at `mv` where it is at least as accurate as the holder."""
    moved = []
    acc = _accuracy(mv)
    for alias in (budget_alias, CHAMPION):
        holder = _alias_holder(client, name, alias)
        if holder is not None and str(holder.version) == str(mv.version):
            moved.append(alias)
            continue
        if holder is None or acc >= _accuracy(holder):
            undo.aliases[alias] = None if holder is None else str(holder.version)
            client.set_registered_model_alias(name, alias, str(mv.version))
            log.info("alias %s@%s -> version %s (val top-1 %.4f%s)", name, alias, mv.version, acc,
                     "" if holder is None else f", was version {holder.version} at {_accuracy(holder):.4f}")
            moved.append(alias)
        else:
            log.info("alias %s@%s stays on version %s (val top-1 %.4f > %.4f)", name, alias, holder.version,
                     _accuracy(holder), acc)
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


def _ensure_registered_model(client: Any, name: str, device: str, undo: _Undo) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if _error_code(exc) not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            raise
    client.create_registered_model(
        name, tags={"evit.device": device},
        description=f"ElasticViT subnets for device {device}: one version per exported subnet; "
                    f"alias per budget and '{CHAMPION}' = most accurate across budgets.")
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


def load_static_from_folder(folder: Path) -> Any:
    """Rebuild the static subnet from arch.json + model.safetensors + the card's space."""
    from safetensors.torch import load_file

    from evit.arch import Arch
    from evit.space import SearchSpace
    from evit.nn.static import load_static

    card = read_json(folder / "card.json")
    arch = Arch.from_json((folder / "arch.json").read_text())
    space = SearchSpace.from_dict(card["space"])
    module = load_static(arch, space, load_file(str(folder / "model.safetensors")))
    return module.eval()


def _logged_pt2_sha256(client: Any, model_id: str) -> str:
    """Hash the pt2 graph as stored (downloaded back), so fetch can verify it like the rest."""
    import mlflow

    location = client.get_logged_model(model_id).artifact_location.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="evit-pt2-") as tmp:
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/data/model.pt2", dst_path=tmp)
        return sha256_file(path)


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
        moved = _move_aliases(client, name, existing, alias, undo)
        on_step("reused")
        log.info("%s: same model already registered as version %s; no new version", name, existing.version)
        return {"version": str(existing.version), "created": False, "aliases": moved}

    from evit.tracking import ensure_experiment, parent_run_id

    experiment_id = ensure_experiment(params)
    _clean_orphans(client, experiment_id, tags[HASH_TAG])
    _ensure_registered_model(client, name, card["device"]["name"], undo)
    on_step("registered-model")
    module = load_static_from_folder(folder)
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
            serialization_format="pt2", extra_files=[str(folder / f) for f in _artifact_files(folder)],
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
    return {"version": str(mv.version), "created": True, "aliases": moved}


def register_export(params: Params, folder: Path, *, on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Register one exported subnet folder (card.json + model files) as a model version.

    Returns {"name", "label", "version", "created", "aliases"}. `on_step` is told each
    step as it completes (progress; tests use it to fail the registry at a given step).
    """
    from evit.tracking import registry_uri

    folder = Path(folder)
    card = read_json(folder / "card.json")
    for f in EXTRA_FILES:
        if not (folder / f).is_file():
            raise RegistryError(f"{folder}: {f} is missing; re-run `evit export -d {card['device']['name']}`")
    for f, digest in card["files"].items():
        if sha256_file(folder / f) != digest:
            raise RegistryError(f"{folder / f} does not match the sha256 in its card; re-run the export")
    card_files = {f: sha256_file(folder / f) for f in _artifact_files(folder)}
    tags = card_tags(card, card_files)
    name = params.export.model_name.format(device=card["device"]["name"])
    uri = registry_uri(params)
    retries = params.tracking.retries
    step = on_step or (lambda s: None)
    with _mlflow_http_policy():
        client = _client(params)
        undo = _Undo()
        left: list[str] = []

        def rollback() -> None:
            nonlocal undo
            left.extend(_rollback(client, name, undo))
            undo = _Undo()

        def attempt() -> dict[str, Any]:
            return _register_once(client, params, name, folder, card, tags, undo, step)

        try:
            out = _retry(f"registering {name} ({card['budget']['label']})", attempt, retries, uri,
                         on_failure=rollback)
        except RegistryError as exc:
            if left:
                raise RegistryError(f"{exc}\nCould not clean up (remove by hand): {'; '.join(left)}") from exc
            raise
        except Exception as exc:
            if _error_code(exc) is not None:
                raise RegistryError(f"registering {name} at {uri} failed: {_short(exc)}") from exc
            raise
    return {"name": name, "label": card["budget"]["label"], **out}


# --- the registry as an output of the export stage -------------------------------------------

def missing_registrations(params: Params, device: str) -> list[Path]:
    """Exported folders of `device` (exports/<device>/index.json) whose model the configured
    registry does not hold (looked up by content hash): a new server, a wiped database."""
    from evit import paths

    index_path = paths.export_dir(params, device) / "index.json"
    if not index_path.is_file():
        return []
    name = params.export.model_name.format(device=device)
    folders = [Path(s["folder"]) for s in read_json(index_path).get("subnets", [])]
    uri = registry_uri_of(params)
    with _mlflow_http_policy():
        client = _client(params)
        missing = []
        for folder in folders:
            digest = content_hash(read_json(folder / "card.json"))
            found = _retry(f"looking up {name} in the registry", lambda d=digest: _find_by_hash(client, name, d),
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
    from evit.tracking import registry_uri

    return registry_uri(params)


# --- fetch -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelRef:
    name: str
    alias: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        return f"{self.name}@{self.alias}" if self.alias else f"{self.name}/{self.version}"


def parse_ref(ref: str) -> ModelRef:
    m = _REF_RE.match(ref.strip())
    if not m:
        raise RegistryError(
            f"model reference {ref!r} is not understood; accepted: NAME@ALIAS (e.g. evit-cpu-1t@champion, "
            "evit-cpu-1t@1_5ms) or NAME/VERSION (e.g. evit-cpu-1t/3), optionally prefixed with models:/"
        )
    return ModelRef(m["name"], m["alias"], m["version"])


def resolve(client: Any, ref: ModelRef, uri: str) -> Any:
    """The ModelVersion that `ref` names; RegistryError naming what exists when it does not."""
    from mlflow.exceptions import MlflowException

    try:
        if ref.alias:
            return client.get_model_version_by_alias(ref.name, ref.alias)
        return client.get_model_version(ref.name, ref.version)
    except MlflowException as exc:
        if _is_transient(exc):
            raise
        try:
            model = client.get_registered_model(ref.name)
        except MlflowException:
            names = sorted(m.name for m in client.search_registered_models(max_results=100))
            raise RegistryError(f"no registered model {ref.name!r} in {uri}; registered: {names or 'none'}") from None
        aliases = sorted(getattr(model, "aliases", {}) or {})
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{ref.name}'"))
        raise RegistryError(f"{ref} does not exist in {uri}; {ref.name} has aliases {aliases or 'none'} and "
                            f"versions {versions or 'none'}") from None


def verify_files(folder: Path, tags: dict[str, str], where: str) -> dict[str, str]:
    """Check every file with a recorded sha256 tag; returns name -> sha256."""
    expected = {k[len(FILE_TAG_PREFIX):]: v for k, v in tags.items() if k.startswith(FILE_TAG_PREFIX)}
    if not expected:
        raise RegistryError(f"{where} has no recorded file hashes (tags {FILE_TAG_PREFIX}*); it was not "
                            "registered by evit and cannot be verified")
    for name, digest in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            raise RegistryError(f"{where}: file {name} recorded at registration is missing from the download")
        got = sha256_file(path)
        if got != digest:
            raise RegistryError(f"{where}: {name} has sha256 {got} but {digest} was recorded at registration; "
                                "the stored artifact is corrupt or was modified. Not using it.")
    return expected


def _artifact_files(folder: Path) -> tuple[str, ...]:
    """The files registered with a version: the core ones plus the mobile formats present."""
    return EXTRA_FILES + tuple(f for f in MOBILE_FILES.values() if (folder / f).is_file())


def _write_format(fmt: str, src: Path, model_dir: Path, out: Path) -> dict[str, str]:
    """Write the requested format into `out`; returns role -> path."""
    files: dict[str, str] = {}

    def copy(name: str, base: Path = src) -> None:
        target = out / name
        tmp = out / f".{name}.tmp"
        shutil.copyfile(base / name, tmp)
        os.replace(tmp, target)
        files[name] = str(target)

    if fmt in MOBILE_FILES and not (src / MOBILE_FILES[fmt]).is_file():
        raise RegistryError(f"this model version has no {MOBILE_FILES[fmt]} (it was exported without "
                            f"'{fmt}' in export.formats); accepted here: onnx, torchscript, pytorch"
                            + "".join(f", {k}" for k, f in MOBILE_FILES.items() if (src / f).is_file()))
    copy("card.json")
    copy("card.md")
    if fmt in MOBILE_FILES:
        copy(MOBILE_FILES[fmt])
    elif fmt == "onnx":
        copy("model.onnx")
    elif fmt == "pytorch":
        copy("arch.json")
        copy("model.safetensors")
        pt2 = model_dir / "data" / "model.pt2"
        if pt2.is_file():
            copy("model.pt2", pt2.parent)
    elif fmt == "torchscript":
        import torch

        module = load_static_from_folder(src)
        r = int(read_json(src / "card.json")["arch"]["resolution"])
        try:
            scripted = torch.jit.script(module)
        except Exception as exc:  # noqa: BLE001 - scripting is best effort; tracing is exact for static nets
            log.info("torch.jit.script failed (%s); tracing instead", _short(exc))
            with torch.no_grad():
                scripted = torch.jit.trace(module, torch.zeros(1, 3, r, r))
        target = out / "model.torchscript.pt"
        tmp = out / ".model.torchscript.pt.tmp"
        torch.jit.save(scripted, str(tmp))
        os.replace(tmp, target)
        files["model.torchscript.pt"] = str(target)
    return files


def fetch_model(params: Params, ref: str, fmt: str, out: str | os.PathLike[str]) -> dict[str, Any]:
    """Download `ref`, verify it against its recorded hashes, write `fmt` into `out`, return the card."""
    import mlflow

    from evit.tracking import registry_uri

    if fmt not in FORMATS:
        raise RegistryError(f"--format {fmt!r} is not supported; accepted: {', '.join(FORMATS)}")
    model_ref = parse_ref(ref)
    uri = registry_uri(params)
    retries = params.tracking.retries
    out = Path(out)
    with _mlflow_http_policy(timeout_s=120):
        client = _client(params)
        mv = _retry(f"looking up {model_ref}", lambda: resolve(client, model_ref, uri), retries, uri)
        where = f"{mv.name}/{mv.version}"
        with tempfile.TemporaryDirectory(prefix="evit-fetch-") as tmp:
            local = _retry(
                f"downloading {where}",
                lambda: mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}",
                                                            dst_path=tmp),
                retries, uri)
            model_dir = Path(local)
            extra = model_dir / "extra_files"
            verify_files(extra, mv.tags, where)
            card = read_json(extra / "card.json")
            out.mkdir(parents=True, exist_ok=True)
            if fmt == "pytorch" and PT2_TAG in mv.tags:
                got = sha256_file(model_dir / "data" / "model.pt2")
                if got != mv.tags[PT2_TAG]:
                    raise RegistryError(f"{where}: data/model.pt2 has sha256 {got} but {mv.tags[PT2_TAG]} was "
                                        "recorded at registration; the stored artifact is corrupt or was modified")
            files = _write_format(fmt, extra, model_dir, out)
    aliases = sorted(getattr(mv, "aliases", []) or [])
    summary = {"model": mv.name, "version": str(mv.version), "aliases": aliases, "format": fmt,
               "out": str(out), "files": files, "card": card}
    write_text_atomic(out / "fetch.json", json.dumps({k: v for k, v in summary.items() if k != "card"},
                                                     indent=2, sort_keys=True) + "\n")
    log.info("fetched %s (%s) into %s, files verified", where, fmt, out)
    return summary


def fetch_report(summary: dict[str, Any]) -> str:
    """What `evit fetch` prints: a few lines a person reads (the full card is in card.json)."""
    from evit.card import classes_text

    card = summary["card"]
    m, lat, inp = card["metrics"], card["latency"], card["input"]
    r = inp.get("resolution", card["arch"]["resolution"])
    aliases = ", ".join(summary["aliases"]) or "none"
    classes = card.get("classes")
    lines = [
        f"{summary['model']} version {summary['version']} (aliases: {aliases}) -> {summary['out']}",
        f"  files:      {', '.join(sorted(Path(p).name for p in summary['files'].values()))} (sha256 verified)",
        f"  input:      1 x 3 x {r} x {r} float32 NCHW; {inp.get('normalization', '')}",
        f"  classes:    {classes_text(classes) if classes else str(card['num_classes']) + ' (names not recorded)'}",
        f"  val top-1:  {float(m['val_top1']):.4f}",
        f"  latency:    {float(lat['measured_ms']):.3f} ms measured, {float(lat['predicted_ms']):.3f} ms predicted "
        f"on {card['device']['name']} (budget {card['budget'].get('text', card['budget'].get('label'))})",
        f"  card:       {Path(summary['out']) / 'card.md'} (the full card: --card)",
    ]
    return "\n".join(lines)

