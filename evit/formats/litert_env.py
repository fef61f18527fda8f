"""The LiteRT converter's own Python environment, created on demand.

`litert-torch` (the PyTorch -> .tflite converter) cannot share `requirements.lock`: its
dependency chain needs typing-extensions < 4.13 while the main lock's anyio/pydantic
need >= 4.16. So it lives in its own venv, installed exactly from
`requirements-litert.lock` with `pip install --no-deps` (never re-resolved), the first
time a `.tflite` is needed. The main process never imports it: it talks to
`evit/formats/litert_worker.py` running in that venv (evit.formats.tflite).

Where: `EVIT_LITERT_VENV` or `<repo>/.venv-litert`; the lock: `EVIT_LITERT_LOCK` or
`<repo>/requirements-litert.lock`. A marker file records the lock's sha256, so a changed
lock rebuilds the venv, and a half-built venv (no marker) is rebuilt rather than used.
Creation is guarded by a file lock (parallel stages wait for one build). Cost here:
~1.5 min and ~6.6 GB (torch with its CUDA libraries, jax) from the local wheel cache, of
which ~5.3 GB (torch, triton, the nvidia libraries: the same wheels as the main venv's) are
then hard-linked to the main venv's identical files (`share_identical_files`): two full
copies once filled a CI machine's disk.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from evit.errors import UserError

log = logging.getLogger(__name__)

MARKER = ".evit-litert-lock.sha256"
_PKG_ROOT = Path(__file__).resolve().parents[2]


class LiteRTEnvError(UserError):
    """The LiteRT converter environment cannot be created or used."""


def lock_file() -> Path:
    return Path(os.environ.get("EVIT_LITERT_LOCK") or _PKG_ROOT / "requirements-litert.lock")


def venv_dir() -> Path:
    return Path(os.environ.get("EVIT_LITERT_VENV") or _PKG_ROOT / ".venv-litert")


def venv_python(venv: Path | None = None) -> Path:
    return (venv or venv_dir()) / "bin" / "python"


def _lock_digest(lock: Path) -> str:
    return hashlib.sha256(lock.read_bytes()).hexdigest()


def is_ready() -> bool:
    """True when the venv exists and was built from the current lock file."""
    venv, lock = venv_dir(), lock_file()
    marker = venv / MARKER
    return (lock.is_file() and marker.is_file() and venv_python(venv).exists()
            and marker.read_text().strip() == _lock_digest(lock))


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def ensure_env(*, timeout_s: float = 1800.0) -> Path:
    """The converter venv's python, creating the venv first if needed (LiteRTEnvError if it cannot)."""
    from filelock import FileLock

    lock, venv = lock_file(), venv_dir()
    if not lock.is_file():
        raise LiteRTEnvError(f"the LiteRT converter lock file {str(lock)!r} is missing (EVIT_LITERT_LOCK); "
                             "it ships at the repository root as requirements-litert.lock")
    if is_ready():
        return venv_python(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(venv) + ".lock", timeout=timeout_s):
        if is_ready():
            return venv_python(venv)
        log.warning("creating the LiteRT converter environment in %s from %s (first .tflite; takes minutes, "
                    "several GB)", venv, lock.name)
        t0 = time.monotonic()
        shutil.rmtree(venv, ignore_errors=True)
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(venv_python(venv)), "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
             "-r", str(lock)],
        ]
        for cmd in steps:
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise LiteRTEnvError(f"could not create the LiteRT converter environment in {venv}: {exc}; "
                                     f"create it by hand: python -m venv {venv} && {venv}/bin/pip install "
                                     f"--no-deps -r {lock}") from None
            if proc.returncode != 0:
                raise LiteRTEnvError(
                    f"could not create the LiteRT converter environment in {venv} (`{' '.join(cmd[:4])} ...` "
                    f"exited {proc.returncode}); is a package index or wheel cache with the pinned versions "
                    f"reachable? Create it by hand: python -m venv {venv} && {venv}/bin/pip install --no-deps "
                    f"-r {lock}\n{_tail(proc.stderr or proc.stdout)}")
        saved = share_identical_files(venv, Path(sys.prefix))
        (venv / MARKER).write_text(_lock_digest(lock) + "\n")
        log.warning("LiteRT converter environment ready in %.0f s (%.1f GB shared with %s by hard links)",
                    time.monotonic() - t0, saved / 1e9, sys.prefix)
    return venv_python(venv)


def _site_packages(venv: Path) -> Path | None:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    return found[0] if found else None


def share_identical_files(venv: Path, other: Path, *, min_bytes: int = 1 << 20) -> int:
    """Hard-link the converter venv's large files to byte-identical ones of another venv.

    Both venvs install the same torch/triton/nvidia wheels (several GB); pip never writes a
    file in place (upgrades unlink and recreate), so a shared inode cannot change under
    either venv. Only files at the same path under site-packages, of the same size and
    content, are linked; another filesystem (or a venv without site-packages) shares nothing.
    Returns the bytes saved.
    """
    import filecmp

    mine, theirs = _site_packages(venv), _site_packages(other)
    if mine is None or theirs is None or mine.resolve() == theirs.resolve():
        return 0
    saved = 0
    for path in mine.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        size = path.stat().st_size
        twin = theirs / path.relative_to(mine)
        if size < min_bytes or not twin.is_file() or twin.is_symlink():
            continue
        if twin.stat().st_size != size or path.stat().st_ino == twin.stat().st_ino:
            continue
        if not filecmp.cmp(path, twin, shallow=False):
            continue
        tmp = path.with_name(path.name + ".evit-link")
        try:
            os.link(twin, tmp)
        except OSError:  # another filesystem, or links not allowed: keep the copies
            return saved
        os.replace(tmp, path)
        saved += size
    return saved
