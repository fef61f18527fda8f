"""Every file argument of the CLI fed every kind of damaged input (issue 27).

The cases come from the CLI itself: every command of `evit.cli.app` (walked through its
click tree), every argument that carries a `PathArg` in its annotation, every bad input of
that kind. A new command or file argument is swept without anyone adding it here, and an
argument that looks like a path but carries no `PathArg` fails
`test_every_path_argument_declares_what_it_expects`.

Each case runs the CLI in this process (click's runner, no subprocess: ~10 ms a case) in a
workspace holding only a params file, and expects exit code 2, exactly one line on stderr
(`error: ...` naming the bad file), no traceback, and no file created or changed in the
workspace or among the inputs. The stages, the pipeline, the scheduler, the registry
client and the reference supernet are replaced by a tripwire: a bad input must be refused
before any of them starts, so a case that gets that far fails at once instead of training.
"""

from __future__ import annotations

import hashlib
import http.server
import inspect
import json
import os
import random
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import pytest
import typer
from typer.core import TyperArgument, TyperGroup
from typer.testing import CliRunner

from evit import io
from evit.cli import PathArg, app

COMMAND = typer.main.get_command(app)
RUNNER = CliRunner()

SAMPLE_VALUES = {"device": "cpu-1t", "ref": "evit-cpu-1t@champion"}
"""A valid value for each required argument that is not a path (add one for a new command)."""

PATH_LIKE = ("path", "file", "params", "arch", "dir", "init", "config", "out", "weights", "checkpoint", "ckpt",
             "folder", "overrides", "model")
"""Name fragments of arguments that name files or folders: such an argument must carry a PathArg."""

NOT_PATHS = {"ref": "a registry reference (NAME@ALIAS or NAME/VERSION), not a path"}

WORKSPACE_PARAMS = "tracking:\n  retries: 0\n"
"""The workspace's params.yaml: valid (defaults), no retries, so nothing waits."""

REFERENCE_CONFIG = {  # a shrunk reference space config (the fixture's, ../shared/fixtures/reference-supernet)
    "norm_layer": "LN", "pre_norm": True, "classifer_head_dim": [16, 32], "dataloader": {"num_classes": 10},
    "search_space": {
        "res": [32, 48, 80], "downsampling": [True, True, True, False, True, True],
        "se": [False, True, True, False, False, False], "classifier_mul": 2, "stage": ["C", "C", "T", "T", "T", "T"],
        "max_depth": [2, 2, 2, 2, 2, 2], "min_depth": [1, 1, 1, 1, 1, 1],
        "max_channels": [24, 24, 32, 32, 32, 48], "min_channels": [16, 16, 16, 16, 16, 32],
        "limit_flops": 500, "min_flops": 100, "big_bank_choices": [700, 900, 1200], "head_dims": 16,
        "flops_bound": 10, "conv_ratio": [4, 3], "mlp_ratio": [3, 2], "qk_scale": [[1]] * 4,
        "v_scale": [[3, 2]] * 4, "windows_size": [[1]] * 4},
}

TEXT_KINDS = ("missing", "empty", "binary", "non_utf8", "truncated", "syntax", "wrong_top", "wrong_fields",
              "directory", "unreadable", "huge", "symlink_loop", "dangling_symlink")
KINDS: dict[PathArg, tuple[str, ...]] = {
    PathArg.PARAMS: TEXT_KINDS,
    PathArg.OVERRIDE: TEXT_KINDS,
    PathArg.ARCH: TEXT_KINDS,
    PathArg.REFERENCE_CONFIG: TEXT_KINDS,
    PathArg.CHECKPOINT: TEXT_KINDS,
    PathArg.OUTPUT_FILE: ("directory", "under_a_file", "unwritable", "symlink_loop"),
    PathArg.OUTPUT_DIR: ("a_file", "under_a_file", "unwritable", "symlink_loop", "dangling_symlink"),
}
"""The bad inputs of each kind of argument. Text kinds: missing, empty, binary garbage,
non-UTF-8 text, a valid document cut short, broken syntax, the wrong top-level type, fields
of the wrong type, a folder where the file belongs, no read permission, a file above the
reader's limit (sparse: costs nothing), a symlink loop, a symlink to nothing. Outputs: a
folder where the file belongs and the reverse, a path under a file, no write permission, a
symlink loop (and a dangling symlink where a folder belongs)."""

SUFFIX = {PathArg.PARAMS: ".yaml", PathArg.OVERRIDE: ".yaml", PathArg.ARCH: ".json",
          PathArg.REFERENCE_CONFIG: ".yaml", PathArg.CHECKPOINT: ".pth", PathArg.OUTPUT_FILE: ".pt",
          PathArg.OUTPUT_DIR: ""}


# --- the CLI's own parameter list -----------------------------------------------------------

def commands(cmd: Any = COMMAND, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(argv prefix, command) of every leaf command (typer's own click commands)."""
    if isinstance(cmd, TyperGroup):
        for name in sorted(cmd.commands):
            yield from commands(cmd.commands[name], (*prefix, name))
    else:
        yield prefix, cmd


def _annotations(cmd: Any) -> dict[str, Any]:
    assert cmd.callback is not None
    return {name: prm.annotation for name, prm in inspect.signature(cmd.callback, eval_str=True).parameters.items()}


def path_args(cmd: Any) -> dict[str, PathArg]:
    """The command's arguments that name a file or folder, from the PathArg in their annotations."""
    found = {}
    for name, annotation in _annotations(cmd).items():
        if get_origin(annotation) is Annotated:
            marks = [m for m in get_args(annotation)[1:] if isinstance(m, PathArg)]
            if marks:
                found[name] = marks[0]
    return found


def _mentions_path(annotation: Any) -> bool:
    """Whether a parameter's type is or holds pathlib.Path (Path, Path | None, list[Path], ...)."""
    if annotation is Path:
        return True
    return any(_mentions_path(a) for a in get_args(annotation)[:1 if get_origin(annotation) is Annotated else None])


def _argv_item(param: Any, value: str) -> list[str]:
    return [value] if isinstance(param, TyperArgument) else [param.opts[0], value]


@dataclass(frozen=True)
class Case:
    argv_prefix: tuple[str, ...]
    param: str
    kind: PathArg
    bad: str

    @property
    def name(self) -> str:
        return f"evit {' '.join(self.argv_prefix)} {self.param}={self.bad}"


def all_cases() -> list[Case]:
    return [Case(prefix, name, kind, bad)
            for prefix, cmd in commands() for name, kind in path_args(cmd).items() for bad in KINDS[kind]]


# --- the inputs -------------------------------------------------------------------------------

def _valid_text(kind: PathArg) -> str:
    from evit.released import released

    model = released("T1")
    assert model is not None
    return json.dumps({PathArg.PARAMS: {"data": {"seed": 0, "val_fraction": 0.2}, "tracking": {"retries": 0}},
                       PathArg.OVERRIDE: {"train": {"epochs": 2, "batch_size": 8}},
                       PathArg.ARCH: model.arch.to_dict(),
                       PathArg.REFERENCE_CONFIG: REFERENCE_CONFIG}[kind])


def _text_content(kind: PathArg, bad: str) -> bytes:
    """The bytes of a bad text input (YAML / JSON) of `kind`."""
    if bad == "empty":
        return b""
    if bad == "binary":
        rnd = random.Random(27)
        return b"\x89\x00\xff" + bytes(rnd.randrange(256) for _ in range(4096))
    if bad == "non_utf8":
        return '{"data": {"source": "café"}}\n'.encode("latin-1") if kind is not PathArg.ARCH \
            else '{"resolution": "café"}'.encode("latin-1")
    if bad == "truncated":  # a valid document cut short (flow style, so YAML too sees it is cut)
        text = _valid_text(kind)
        return text[: len(text) * 3 // 5].encode()
    if bad == "syntax":
        return b'{"resolution": 128,, "stem": }\n' if kind is PathArg.ARCH else b"data: [unclosed\n  : : -\n"
    if bad == "wrong_top":
        return b'["resolution", 128]\n' if kind is PathArg.ARCH else b"- data\n- train\n"
    if bad == "wrong_fields":
        return {PathArg.PARAMS: b"data:\n  seed: zero\n",
                PathArg.OVERRIDE: b"train:\n  epochs: many\n",
                PathArg.ARCH: b'{"resolution": "big", "stem": {"width": 16, "depth": 1, "kernel": 3}, "stages": []}',
                PathArg.REFERENCE_CONFIG: json.dumps(
                    {**REFERENCE_CONFIG, "search_space": {**REFERENCE_CONFIG["search_space"], "stage": 6,
                                                          "max_depth": "two"}}).encode(),
                }[kind]
    raise AssertionError(bad)


def _checkpoint_content(bad: str) -> bytes:
    import torch

    def saved(obj: Any) -> bytes:
        import io as _io

        buf = _io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    if bad == "empty":
        return b""
    if bad == "binary":
        rnd = random.Random(27)
        return bytes(rnd.randrange(256) for _ in range(4096))
    if bad == "non_utf8":
        return "poids: café\n".encode("latin-1")
    if bad == "truncated":
        data = saved({"state_dict": {"w": torch.zeros(64, 64)}})
        return data[: len(data) // 2]
    if bad == "syntax":  # a zip header (what torch.save writes) over garbage
        return b"PK\x03\x04" + bytes(range(256)) * 4
    if bad == "wrong_top":
        return saved([1, 2, 3])
    if bad == "wrong_fields":
        return saved({"state_dict": {"w": [1.0, 2.0]}, "epoch": "three"})
    raise AssertionError(bad)


def make_input(root: Path, kind: PathArg, bad: str) -> Path:
    """The bad input `bad` for an argument of `kind`, under `root` (outside the workspace)."""
    folder = root / kind.name.lower()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{bad}{SUFFIX[kind]}"
    if path.exists() or path.is_symlink():
        return path
    if bad == "missing":
        return path
    if bad == "directory":
        path.mkdir()
    elif bad == "a_file":
        path.write_text("not a folder\n")
    elif bad == "under_a_file":
        (folder / "plain-file").write_text("a file, not a folder\n")
        path = folder / "plain-file" / f"out{SUFFIX[kind]}"
    elif bad == "unwritable":
        path = folder / "read-only" / (f"out{SUFFIX[kind]}" if kind is PathArg.OUTPUT_FILE else "out")
        path.parent.mkdir(exist_ok=True)
        path.parent.chmod(0o555)
    elif bad == "unreadable":
        path.write_bytes(_text_content(PathArg.ARCH, "truncated") if kind is PathArg.ARCH else b"data: {}\n")
        path.chmod(0)
    elif bad == "huge":
        limit = io.MAX_CHECKPOINT_BYTES if kind is PathArg.CHECKPOINT else io.MAX_TEXT_BYTES
        with open(path, "wb") as fh:
            fh.truncate(limit + 1)  # sparse: no blocks written
    elif bad == "symlink_loop":
        path.symlink_to(path.name)
    elif bad == "dangling_symlink":
        path.symlink_to(folder / "nothing-here")
    elif kind is PathArg.CHECKPOINT:
        path.write_bytes(_checkpoint_content(bad))
    else:
        path.write_bytes(_text_content(kind, bad))
    return path


def valid_value(kind: PathArg, root: Path) -> str:
    """A value of `kind` that passes every check done before the argument under test is read."""
    folder = root / "valid"
    folder.mkdir(exist_ok=True)
    path = folder / f"ok-{kind.name.lower()}{SUFFIX[kind]}"
    if kind is PathArg.CHECKPOINT:
        path.write_bytes(b"only read after the other arguments are checked\n")
    elif kind in (PathArg.OUTPUT_FILE, PathArg.OUTPUT_DIR):
        pass
    else:
        path.write_text(_valid_text(kind))
    return str(path)


def argv_for(case: Case, bad_path: Path, root: Path) -> list[str]:
    cmd = COMMAND
    for name in case.argv_prefix:
        assert isinstance(cmd, TyperGroup)
        cmd = cmd.commands[name]
    kinds = path_args(cmd)
    argv = list(case.argv_prefix)
    for param in cmd.params:
        if param.name == case.param:
            argv += _argv_item(param, str(bad_path))
        elif param.required:
            if param.name in kinds:
                argv += _argv_item(param, valid_value(kinds[param.name], root))
            else:
                assert param.name in SAMPLE_VALUES, f"add a sample value for {case.argv_prefix} {param.name}"
                argv += _argv_item(param, SAMPLE_VALUES[param.name])
    return argv


def listing(root: Path) -> dict[str, str]:
    """Every entry under `root` with what it is: sha256 of small files, size+mtime of large ones."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = f"link:{os.readlink(p)}"
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = f"dir:{stat.S_IMODE(st.st_mode):o}"
            elif st.st_size > 1 << 20 or not os.access(p, os.R_OK):
                out[rel] = f"file:{st.st_size}:{st.st_mtime_ns}:{stat.S_IMODE(st.st_mode):o}"
            else:
                out[rel] = "file:" + hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class ReachedWork(Exception):
    """A bad input got past every check into the work it should have stopped before."""


def _tripwire(what: str) -> Any:
    def trip(*args: Any, **kwargs: Any) -> Any:
        raise ReachedWork(what)

    return trip


@pytest.fixture
def sweep_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(workspace, inputs): the CLI runs in the workspace; the expensive entry points trip."""
    import evit.cli
    import evit.nn.reference
    import evit.registry.fetch
    import flows.deploy
    import flows.pipeline

    for var in ("EVIT_PARAMS", "EVIT_OVERRIDES", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(var, "")  # recorded, so what the CLI sets for its children is undone after the test
        monkeypatch.delenv(var)
    monkeypatch.setattr(evit.cli, "_writer", _tripwire("a stage (the workspace lock)"))
    monkeypatch.setattr(flows.pipeline, "run_pipeline", _tripwire("the pipeline"))
    monkeypatch.setattr(flows.deploy, "serve_deployments", _tripwire("the scheduler"))
    monkeypatch.setattr(evit.registry.fetch, "mlflow_client", _tripwire("the registry client"))
    monkeypatch.setattr(evit.nn.reference, "ReferenceSupernet", _tripwire("building the reference supernet"))
    workspace, inputs = tmp_path / "workspace", tmp_path / "inputs"
    workspace.mkdir()
    inputs.mkdir()
    (workspace / "params.yaml").write_text(WORKSPACE_PARAMS)
    monkeypatch.chdir(workspace)
    return workspace, inputs


def _problem(case: Case, result: Any, bad_path: Path) -> str | None:
    stderr = result.stderr
    lines = stderr.splitlines()
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return f"raised {type(result.exception).__name__}: {result.exception}"
    if "Traceback" in result.output:
        return "printed a traceback"
    if result.exit_code != 2:
        return f"exit code {result.exit_code}"
    if len(lines) != 1:
        return f"{len(lines)} lines on stderr"
    if not lines[0].startswith("error: "):
        return "the line is not an `error: ...` message"
    named = bad_path.name if case.bad != "under_a_file" else bad_path.parent.name
    if named not in lines[0]:
        return f"the message does not name {named!r}"
    return None


def test_every_file_argument_rejects_every_bad_input(sweep_env: tuple[Path, Path],
                                                    record_property: Callable[[str, object], None]) -> None:
    workspace, inputs = sweep_env
    root_user = os.geteuid() == 0
    cases = all_cases()
    failures, skipped, ran = [], [], 0
    t0 = time.perf_counter()
    for case in cases:
        if case.bad in ("unreadable", "unwritable") and root_user:
            skipped.append(case.name)  # root reads and writes anything
            continue
        bad_path = make_input(inputs, case.kind, case.bad)
        argv = argv_for(case, bad_path, inputs)
        before = listing(workspace), listing(inputs)
        result = RUNNER.invoke(app, argv, catch_exceptions=True)
        ran += 1
        problem = _problem(case, result, bad_path)
        if problem is None and (listing(workspace), listing(inputs)) != before:
            problem = "files were created or changed"
        if problem:
            failures.append(f"{case.name}: {problem}\n    argv: {argv}\n    stderr: {result.stderr.strip()[:400]}")
    elapsed = time.perf_counter() - t0
    commands_swept = len({c.argv_prefix for c in cases})
    args_swept = len({(c.argv_prefix, c.param) for c in cases})
    record_property("summary", f"CLI sweep: {len(cases)} cases ({commands_swept} commands, {args_swept} file "
                    f"arguments, {len({c.bad for c in cases})} kinds of bad input); ran {ran} in {elapsed:.1f}s, "
                    f"skipped {len(skipped)} (permissions, running as root)")  # shown by conftest's summary hook
    assert ran > 0
    assert not failures, f"{len(failures)} of {ran} cases failed:\n" + "\n".join(failures)


def test_every_command_is_swept_and_every_path_argument_declares_what_it_expects() -> None:
    """A path-looking argument without a PathArg would escape the sweep: name it here."""
    undeclared = []
    for prefix, cmd in commands():
        declared, annotations = path_args(cmd), _annotations(cmd)
        for param in cmd.params:
            name = param.name or ""
            looks = _mentions_path(annotations.get(name)) or any(f in name.lower() for f in PATH_LIKE)
            if looks and name not in declared and name not in NOT_PATHS:
                undeclared.append(f"evit {' '.join(prefix)}: {name}")
    assert not undeclared, ("arguments that look like paths but carry no PathArg in evit/cli.py (add one, or list "
                            f"them in NOT_PATHS with the reason): {undeclared}")
    swept = {c.argv_prefix for c in all_cases()}
    reading = {p for p, cmd in commands() if path_args(cmd)}
    assert swept == reading and len(swept) >= 12, swept
    # every kind of bad input the issue names is fed to every argument that reads a file
    for kind in (PathArg.PARAMS, PathArg.OVERRIDE, PathArg.ARCH, PathArg.REFERENCE_CONFIG, PathArg.CHECKPOINT):
        assert set(KINDS[kind]) >= {"missing", "empty", "binary", "non_utf8", "truncated", "syntax", "wrong_top",
                                    "wrong_fields", "directory", "unreadable", "huge", "symlink_loop"}


def test_reader_refuses_an_unreadable_file_even_as_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The permission branch of the reader, which the sweep skips as root (root reads anything)."""
    path = tmp_path / "params.yaml"
    path.write_text("data: {}\n")
    monkeypatch.setattr(io.os, "access", lambda *a, **k: False)
    with pytest.raises(io.UserError, match=r"params file '.*params\.yaml': not readable \(permission denied\)"):
        io.read_user_yaml(path, "params file")
    (tmp_path / "out").mkdir()
    with pytest.raises(io.UserError, match=r"out' is not writable"):
        io.check_output_dir(tmp_path / "out", "--out")


# --- servers a user configures: unreachable or wrong, one line naming them ---------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _NotMlflow(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<html><body>Welcome to nginx!</body></html>"
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def not_mlflow() -> Iterator[str]:
    """An HTTP server that answers everything with an nginx-style 404 page: not an MLflow server."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotMlflow)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _one_line_error(argv: list[str], *names: str) -> str:
    t0 = time.perf_counter()
    result = RUNNER.invoke(app, argv, catch_exceptions=True)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for name in names:
        assert name in lines[0], lines[0]
    assert time.perf_counter() - t0 < 10
    return lines[0]


@pytest.mark.parametrize("server", ["unreachable", "not-mlflow"])
def test_tracking_server_unreachable_or_wrong_is_one_line(server: str, sweep_env: tuple[Path, Path],
                                                          not_mlflow: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import evit.registry.connection
    import evit.registry.fetch

    monkeypatch.setattr(evit.registry.fetch, "mlflow_client", evit.registry.connection.mlflow_client)  # the real one
    uri = f"http://127.0.0.1:{_closed_port()}" if server == "unreachable" else not_mlflow
    workspace, _ = sweep_env
    before = listing(workspace)
    for cmd in (["fetch", "evit-cpu-1t@champion", "--out", "fetched"], ["pipeline"]):
        _one_line_error([*cmd, "--set", f"tracking.uri={uri}", "--set", "tracking.retries=0"], uri)
    assert listing(workspace) == before


class _NoLock:
    """`_writer` without the workspace lock file (the sweep's workspace must stay unchanged)."""

    def __init__(self, *args: Any) -> None:
        pass

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_s3_endpoint_unreachable_is_one_line(sweep_env: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import evit.cli

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(evit.cli, "_writer", _NoLock)
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    workspace, _ = sweep_env
    before = listing(workspace)
    _one_line_error(["prepare", "--set", "data.source=s3://evit-sweep/data", "--set",
                     f"storage.endpoint_url={endpoint}"], endpoint)
    assert listing(workspace) == before
