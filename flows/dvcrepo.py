"""The DVC side of the flow: is a stage up to date, record a stage run, the remote.

The Prefect flow and `dvc repro` must agree on what is up to date, so the flow does not
keep its own notion: it asks DVC, through DVC's Python API, about the stage declared in
dvc.yaml (`flows.dvcfile`). A stage is up to date when its dvc.lock entry matches the
current command, params values and dependency hashes, and its outputs on disk match the
hashes the lock recorded; that is `dvc status` being clean for it. After the flow runs a
stage it records it exactly as `dvc repro` would (`Repo.commit(stage, force=True)`: hash
deps and outs, store outs in the DVC cache and the run cache, write dvc.lock).

DVC's `Repo` objects are not thread-safe and its lock file is exclusive per process, while
Prefect runs per-device tasks in threads: every DVC call here holds one process-wide lock
and opens its own short-lived `Repo`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evit.config import StorageParams
from evit.io import sha256_json

log = logging.getLogger(__name__)

os.environ.setdefault("DVC_NO_ANALYTICS", "1")

REMOTE_NAME = "evit"
PIPELINE_ENV = "EVIT_IN_PIPELINE"
"""Set for `evit` processes the flow starts itself (torchrun ranks): the flow records the stage,
so the CLI must not record it a second time."""
_LOCK = threading.RLock()


def _quiet_dvc() -> None:
    """`import dvc` installs a stdout log handler; keep its INFO chatter ("Updating lock file")
    off stdout, where `evit pipeline` prints its JSON summary."""
    import dvc  # noqa: F401 - the import is what installs the handler

    if os.environ.get("EVIT_LOG_LEVEL", "").upper() != "DEBUG":
        logging.getLogger("dvc").setLevel(logging.WARNING)


@contextlib.contextmanager
def open_repo(root: str | os.PathLike[str], remote_config: dict[str, Any] | None = None) -> Iterator[Any]:
    """A DVC `Repo` at `root`, used under the process-wide DVC lock and closed afterwards
    (`remote_config` overrides settings of the default remote for this use only)."""
    from dvc.repo import Repo

    _quiet_dvc()
    with _LOCK:
        repo = Repo(os.fspath(root), remote_config=remote_config or None)
        try:
            yield repo
        finally:
            repo.close()


def ensure_repo(root: Path) -> bool:
    """`dvc init` in `root` when it is not a DVC project yet (no-scm outside git); True if created."""
    from dvc.repo import Repo

    _quiet_dvc()
    with _LOCK:
        if (root / ".dvc").is_dir():
            return False
        scm = (root / ".git").exists()
        repo = Repo.init(os.fspath(root), no_scm=not scm)
        try:
            with repo.config.edit("repo") as conf:
                conf["core"]["analytics"] = False
                conf["core"]["check_update"] = False
        finally:
            repo.close()
        log.info("initialised a DVC project in %s (%s)", root, "git" if scm else "no git")
        return True


def remote_config(storage: StorageParams, root: Path) -> dict[str, Any]:
    """The DVC remote section for `storage` (URLs of local remotes are absolute here; DVC
    writes them relative to .dvc/ so the project can move)."""
    url = storage.remote
    if url.startswith("s3://"):
        conf: dict[str, Any] = {"url": url, "region": storage.region}
        if storage.endpoint_url:
            conf["endpointurl"] = storage.endpoint_url
        return conf
    if "://" in url:
        return {"url": url}
    path = Path(url).expanduser()
    return {"url": os.fspath(path if path.is_absolute() else (root / path).resolve())}


def sync_remote(storage: StorageParams, root: Path) -> bool:
    """Make `storage.remote` the project's default DVC remote `evit` (no credentials are
    written: they come from the environment / AWS profile). True if .dvc/config changed."""
    want = remote_config(storage, root)
    with open_repo(root) as repo:
        current = dict(repo.config["remote"].get(REMOTE_NAME, {}))
        default = repo.config["core"].get("remote")
        same = default == REMOTE_NAME and all(_same_value(current.get(k), v) for k, v in want.items())
        if same:
            return False
        with repo.config.edit("repo") as conf:
            conf["remote"][REMOTE_NAME] = _as_written(want)
            conf["core"]["remote"] = REMOTE_NAME
    log.info("DVC remote '%s' -> %s", REMOTE_NAME, want["url"])
    return True


def _as_written(conf: dict[str, Any]) -> dict[str, Any]:
    """A local remote's absolute URL marked so DVC stores it relative to .dvc/ (movable project)."""
    from dvc.config_schema import RelPath

    url = conf["url"]
    return {**conf, "url": RelPath(url)} if os.path.isabs(url) else conf


def _same_value(have: Any, want: Any) -> bool:
    if isinstance(want, str) and isinstance(have, str) and os.path.isabs(want):
        return os.path.normpath(have) == os.path.normpath(want)
    return have == want


# --- stage state ------------------------------------------------------------------------------

@dataclass(frozen=True)
class StageState:
    """What DVC says about one stage right now."""

    name: str
    inputs: str
    """Fingerprint of the command, the params values and the dependency hashes."""
    up_to_date: bool
    """dvc.lock matches the inputs and the outputs on disk match dvc.lock."""
    outs: dict[str, str] = field(default_factory=dict)
    """Output path -> hash as recorded (when up to date)."""
    reason: str = ""
    """Why it is not up to date (for the log)."""

    @property
    def key(self) -> str:
        """The cache key of this exact state: inputs and the outputs they produced."""
        digest = sha256_json({"inputs": self.inputs, "outs": self.outs})[:32]
        return f"evit-{self.name.replace('@', '-at-')}-{digest}"


def _collect(repo: Any, name: str) -> Any:
    stages = repo.stage.collect(name)
    if len(stages) != 1:
        raise LookupError(f"dvc.yaml has no single stage {name!r} (found {len(stages)})")
    return stages[0]


def _hash_value(hash_info: Any) -> Any:
    return hash_info.value if hash_info else None


def _fingerprint(stage: Any) -> str:
    deps: dict[str, Any] = {}
    for dep in stage.deps:
        if dep.__class__.__name__ == "ParamsDependency":
            deps[f"params:{dep.def_path}"] = dep.read_params()
        else:
            deps[dep.def_path] = _hash_value(dep.get_hash()) if dep.exists else None
    return sha256_json({"stage": stage.addressing, "cmd": stage.cmd, "deps": deps})


def stage_state(root: Path, name: str, *, restore: bool = True) -> StageState:
    """DVC's view of stage `name`. With `restore`, outputs that are missing from the workspace
    but present in the DVC cache with the recorded hashes are checked out first (what
    `dvc repro` would get from its run cache), so a deleted output costs a copy, not a rerun."""
    with open_repo(root) as repo:
        with repo.lock:
            stage = _collect(repo, name)
            inputs = _fingerprint(stage)
            if not stage.outs or any(not o.hash_info for o in stage.outs):
                return StageState(name, inputs, False, reason="no dvc.lock entry")
            if stage.changed_stage():
                return StageState(name, inputs, False, reason="command or declaration changed")
            if stage.changed_deps():
                return StageState(name, inputs, False, reason="params or dependencies changed")
            outs_changed = stage.changed_outs()
        if outs_changed and restore:
            try:
                repo.checkout(targets=[name], force=True)  # takes the repo lock itself
                log.info("%s: restored its outputs from the DVC cache", name)
            except Exception as exc:  # noqa: BLE001 - not in the cache: the stage simply reruns
                log.info("%s: outputs not restorable from the DVC cache (%s)", name, type(exc).__name__)
        with repo.lock:
            stage = _collect(repo, name)
            if outs_changed and stage.changed_outs():
                return StageState(name, inputs, False, reason="outputs missing or modified")
            outs = {o.def_path: str(_hash_value(o.hash_info)) for o in stage.outs}
            return StageState(name, inputs, True, outs=outs)


def modified_outputs(root: Path, names: list[str]) -> dict[str, list[str]]:
    """Stage name -> its outputs that exist but differ from what dvc.lock recorded, for stages
    whose inputs did not change (so the pipeline would call them cached and restore the
    recorded outputs over these): produced or edited outside `evit pipeline` / `dvc repro`.
    Missing outputs are not listed: they are restored from the DVC cache, losing nothing."""
    found: dict[str, list[str]] = {}
    with open_repo(root) as repo, repo.lock:
        for name in names:
            try:
                stage = _collect(repo, name)
            except LookupError:
                continue
            if not stage.outs or any(not o.hash_info for o in stage.outs):
                continue  # never recorded: nothing to compare with
            if stage.changed_stage() or stage.changed_deps():
                continue  # its inputs changed: it reruns anyway (and resumes what an interrupted run left)
            changed = [o.def_path for o in stage.outs if o.exists and o.workspace_status()]
            if changed:
                found[name] = changed
    return found


def record_hand_run(root: Path, name: str) -> StageState | None:
    """Record a stage that the `evit` CLI just ran by hand in dvc.lock, as `evit pipeline` and
    `dvc repro` do, so neither overwrites (or restores over) what it produced. None when it
    was not recorded (see the log for why)."""
    try:
        return commit(root, name)
    except Exception as exc:  # noqa: BLE001 - the outputs are fine; only the record is missing
        log.warning("%s: ran, but could not be recorded in dvc.lock (%s: %s); run `dvc commit %s` to keep these "
                    "outputs, or the next `evit pipeline` will stop and ask", name, type(exc).__name__, exc, name)
        return None


def remove_outs(root: Path, name: str) -> None:
    """Delete the stage's non-persistent outputs before running it, as `dvc repro` does, so a
    run of either driver leaves the same files (no stale leftovers from an older run)."""
    with open_repo(root) as repo, repo.lock:
        stage = _collect(repo, name)
        stage.remove_outs(ignore_remove=False, force=False)


def commit(root: Path, name: str) -> StageState:
    """Record a finished stage in dvc.lock and the DVC cache, exactly as `dvc repro` would."""
    with open_repo(root) as repo:
        repo.commit(target=name, force=True)
    state = stage_state(root, name, restore=False)
    if not state.up_to_date:
        raise RuntimeError(f"{name}: recorded in dvc.lock but DVC still reports it changed ({state.reason})")
    return state


def lock_entry(root: Path, name: str) -> dict[str, Any] | None:
    """The stage's entry in dvc.lock as DVC wrote it (None if absent)."""
    import yaml

    lock = root / "dvc.lock"
    if not lock.is_file():
        return None
    data = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
    return (data.get("stages") or {}).get(name)


def status(root: Path) -> dict[str, Any]:
    """`dvc status` of the whole project: {} when everything is up to date."""
    with open_repo(root) as repo:
        return dict(repo.status())


def endpoint_override(root: Path) -> dict[str, Any]:
    """AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL win over the endpoint in .dvc/config for an S3
    remote (as for evit's own S3 reads), without rewriting the team's config."""
    env = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not env:
        return {}
    with open_repo(root) as repo:
        url = str(repo.config["remote"].get(REMOTE_NAME, {}).get("url", ""))
    return {"endpointurl": env} if url.startswith("s3://") else {}


def push(root: Path) -> int:
    """`dvc push` of every output to the project's remote; returns the number of files sent."""
    with open_repo(root, remote_config=endpoint_override(root)) as repo:
        return int(repo.push(remote=REMOTE_NAME))


SHARED_RECORD = (".dvc/config", "dvc.lock", "dvc.yaml")
"""What another machine needs from git to `dvc pull` this project's outputs (with params.yaml)."""


def uncommitted(root: Path, files: tuple[str, ...] = SHARED_RECORD) -> list[str]:
    """Of `files`, those with changes git has not committed (modified or untracked); [] outside a
    git checkout, where there is nothing to compare with."""
    import subprocess

    if not (root / ".git").exists():
        return []
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", *files], cwd=root,
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    changed = {line[3:].strip().strip('"') for line in out.splitlines() if len(line) > 3}
    return [f for f in files if f in changed]

