"""Atomic file writes, content hashing, and the one reader of a user's files.

Every stage output goes through these helpers so that an interrupted run never leaves a
half-written file that a later stage (or DVC, or a Prefect cache key) would take for done.

Every file a user hands to evit (params and override YAML, arch JSON, reference space
configs, checkpoints to import, cards) is read through `read_user_yaml` / `read_user_json`
/ `read_user_text` (or checked with `check_input_file` when a library reads it), and every
path a user names for evit to write into through `check_output_file` / `check_output_dir`.
Whatever is wrong with it (missing, a folder, unreadable, a symlink loop, too large, not
UTF-8, not YAML/JSON, the wrong shape) becomes one `UserError` line naming the path and
what was expected, raised before any expensive work; the CLI prints it with exit code 2.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from evit.errors import UserError

_CHUNK = 1 << 20


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `target`; rename it over `target` only on success.

    The temporary file lives in the same directory so the final `os.replace` is atomic on
    POSIX file systems. On error the temporary file is removed and `target` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; give the final file the permissions a plain open() would.
    os.chmod(tmp_path, 0o666 & ~_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(target, text.encode("utf-8"))


def write_json_atomic(target: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> None:
    """Write JSON with sorted keys so the bytes (and so DVC's hash) depend only on content."""
    write_text_atomic(target, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a directory under a temporary name and swap it in as a whole on success.

    A previous complete `target` survives until the new one is finished, so a killed run
    leaves either the old complete output or nothing, never a mix.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(path: str | os.PathLike[str]) -> str:
    """Hash a file or a directory (relative paths + contents, in sorted order)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if any(part.startswith(".") and part.endswith(".tmp") for part in rel.split("/")):
            continue
        h.update(rel.encode())
        h.update(b"\0")
        h.update(sha256_file(file).encode())
        h.update(b"\n")
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_figure_atomic(fig: Any, target: str | os.PathLike[str]) -> Path:
    """Save a matplotlib figure as PNG through a temporary file, then close it.

    Plots are DVC outputs and MLflow artifacts; a killed run must not leave a truncated PNG.
    """
    import matplotlib.pyplot as plt

    try:
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return Path(target)


# --- reading a user's files -----------------------------------------------------------------

MAX_TEXT_BYTES = 64 << 20
"""The largest YAML / JSON file evit reads from a user: 64 MiB, checked with stat() before
reading. The real ones are kilobytes (params.yaml ~10 kB, an arch ~0.3 kB, a reference space
config ~12 kB); anything this large is a wrong file (a dataset, a checkpoint), and loading
it would take the memory and minutes a parser needs for it before failing anyway."""

MAX_CHECKPOINT_BYTES = 16 << 30
"""The largest checkpoint evit imports: 16 GiB (the paper's released supernet is ~0.1 GB;
it is loaded into memory whole)."""


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n:,} bytes ({n / scale:.1f} {unit})"
    return f"{n:,} bytes"


def _os_problem(exc: OSError) -> str:
    """What an OSError from stat/open/read means for the user, in a few words."""
    reasons = {errno.ENOENT: "not found", errno.ELOOP: "a symlink loop (it points back at itself)",
               errno.EACCES: "not readable (permission denied)", errno.EPERM: "not readable (permission denied)",
               errno.ENOTDIR: "not found (a part of the path is a file, not a folder)",
               errno.EISDIR: "a folder", errno.ENAMETOOLONG: "not a usable path (name too long)"}
    return reasons.get(exc.errno or 0, f"not readable ({exc.strerror or exc})")


def check_input_file(path: str | os.PathLike[str], what: str, *, max_bytes: int | None = MAX_TEXT_BYTES,
                     error: type[UserError] = UserError) -> Path:
    """`path` as a Path when it is a readable regular file of at most `max_bytes`; else
    `error` naming it. Only stat() and access(): nothing is read, so a huge file costs nothing."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        if exc.errno == errno.ENOENT and os.path.islink(p):
            raise error(f"{what} {str(p)!r} is a symlink to a missing file ({os.readlink(p)!r})") from None
        raise error(f"{what} {str(p)!r}: {_os_problem(exc)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {str(p)!r} is a folder; expected a file")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {str(p)!r} is not a regular file (a pipe, socket or device); expected a file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise error(f"{what} {str(p)!r} is {_size(st.st_size)}; expected at most {_size(max_bytes)}: is it the "
                    "right file?")
    if not os.access(p, os.R_OK):
        raise error(f"{what} {str(p)!r}: not readable (permission denied)")
    return p


def read_user_bytes(path: str | os.PathLike[str], what: str, *, max_bytes: int = MAX_TEXT_BYTES,
                    error: type[UserError] = UserError) -> bytes:
    """The bytes of a user's file, checked first (`check_input_file`); never more than `max_bytes`."""
    p = check_input_file(path, what, max_bytes=max_bytes, error=error)
    try:
        with open(p, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{what} {str(p)!r}: {_os_problem(exc)}") from None
    if len(data) > max_bytes:  # grew since stat()
        raise error(f"{what} {str(p)!r} is larger than {_size(max_bytes)}: is it the right file?")
    return data


def read_user_text(path: str | os.PathLike[str], what: str, *, expect: str = "UTF-8 text",
                   max_bytes: int = MAX_TEXT_BYTES, error: type[UserError] = UserError) -> str:
    """The UTF-8 text of a user's file (a leading BOM dropped); `error` naming it when it is not text."""
    data = read_user_bytes(path, what, max_bytes=max_bytes, error=error)
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        kind = "binary, not text" if b"\0" in data[:8192] else "not UTF-8 text"
        raise error(f"{what} {str(path)!r} is {kind} (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                    f"expected {expect}") from None


def _check_top(data: Any, path: str | os.PathLike[str], what: str, expect: str, top: type | None,
               error: type[UserError]) -> Any:
    if top is not None and not isinstance(data, top):
        got = "nothing (an empty document)" if data is None else f"a {type(data).__name__}"
        raise error(f"{what} {str(path)!r} holds {got}; expected {expect}")
    return data


def yaml_problem(exc: Exception) -> str:
    """A YAML parse error in one line: the problem and where (PyYAML's own message spans lines)."""
    import yaml

    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{exc.problem}{where}"
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _read_document(path: str | os.PathLike[str], what: str, *, language: str, parse: Callable[[str], Any],
                   syntax_error: type[Exception], problem: Callable[[Any], str], expect: str, top: type | None,
                   max_bytes: int, error: type[UserError]) -> Any:
    """A user's text file parsed by `parse`: empty, malformed, too deep or of the wrong top-level
    type, each `error` on one line naming the file and what was expected."""
    text = read_user_text(path, what, expect=expect, max_bytes=max_bytes, error=error)
    if not text.strip():
        raise error(f"{what} {str(path)!r} is empty; expected {expect}")
    try:
        data = parse(text)
    except syntax_error as exc:
        raise error(f"{what} {str(path)!r} is not valid {language} ({problem(exc)}); expected {expect}") from None
    except RecursionError:
        raise error(f"{what} {str(path)!r} is nested too deeply to be {expect}") from None
    return _check_top(data, path, what, expect, top, error)


def read_user_yaml(path: str | os.PathLike[str], what: str, *, expect: str = "a YAML mapping",
                   top: type | None = dict, max_bytes: int = MAX_TEXT_BYTES,
                   error: type[UserError] = UserError) -> Any:
    """The YAML document in a user's file (JSON is YAML too), of type `top` (None: any).

    An empty file is an error when `top` is given: a file named on purpose that holds
    nothing is a failed download or a wrong path, not a request for the defaults."""
    import yaml

    return _read_document(path, what, language="YAML", parse=yaml.safe_load, syntax_error=yaml.YAMLError,
                          problem=yaml_problem, expect=expect, top=top, max_bytes=max_bytes, error=error)


def read_user_json(path: str | os.PathLike[str], what: str, *, expect: str = "a JSON object",
                   top: type | None = dict, max_bytes: int = MAX_TEXT_BYTES,
                   error: type[UserError] = UserError) -> Any:
    """The JSON document in a user's file, of type `top` (None: any)."""
    return _read_document(path, what, language="JSON", parse=json.loads, syntax_error=json.JSONDecodeError,
                          problem=lambda exc: f"{exc.msg} at line {exc.lineno}, column {exc.colno}",
                          expect=expect, top=top, max_bytes=max_bytes, error=error)


def _check_parent(p: Path, what: str, error: type[UserError]) -> None:
    """The nearest existing folder above `p` must be a writable folder (the rest is created)."""
    parent = p.parent if str(p.parent) else Path(".")
    while True:
        try:
            st = os.stat(parent)
        except FileNotFoundError:
            if parent == parent.parent:
                return
            parent = parent.parent
            continue
        except OSError as exc:
            raise error(f"{what} {str(p)!r}: its folder {str(parent)!r} is {_os_problem(exc)}") from None
        break
    if not stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {str(p)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"{what} {str(p)!r}: the folder {str(parent)!r} is not writable (permission denied)")


def check_output_file(path: str | os.PathLike[str], what: str, *, error: type[UserError] = UserError) -> Path:
    """`path` as a Path when evit can write a file there (replacing a file, creating folders);
    else `error` naming it. Checked before the work whose result it will hold."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if os.path.islink(p):
            raise error(f"{what} {str(p)!r} is a symlink to a missing file ({os.readlink(p)!r})") from None
        st = None
    except OSError as exc:
        raise error(f"{what} {str(p)!r}: {_os_problem(exc)}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {str(p)!r} is a folder; expected a file path to write")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {str(p)!r} is not a regular file (a pipe, socket or device)")
    _check_parent(p, what, error)
    return p


def check_output_dir(path: str | os.PathLike[str], what: str, *, error: type[UserError] = UserError) -> Path:
    """`path` as a Path when evit can write files into it (created if missing); else `error` naming it."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if os.path.islink(p):
            raise error(f"{what} {str(p)!r} is a symlink to a missing folder ({os.readlink(p)!r})") from None
        _check_parent(p, what, error)
        return p
    except OSError as exc:
        raise error(f"{what} {str(p)!r}: {_os_problem(exc)}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {str(p)!r} is a file; expected a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise error(f"{what} {str(p)!r} is not writable (permission denied)")
    return p
