"""Fixtures shared by the whole test suite.

Servers (real processes on 127.0.0.1, never in-process mocks):
- `moto_server` (session): a real `moto_server` S3 endpoint; yields its URL and points the
  AWS credential chain at dummy credentials for the session. Every test that talks to S3
  (data sources, the DVC S3 remote, MLflow artifacts) shares this one process; use a
  fresh bucket per test (`s3_upload` makes one) because state persists for the session.
- `s3_client` (session): a boto3 S3 client bound to that endpoint.
- `s3_upload` (function): `s3_upload(local_dir, bucket=None, prefix="") -> "s3://bucket/prefix"`
  creates the bucket if needed (a unique name when None) and uploads the tree.

Project scaffolding:
- `tiny_params` (function): `tiny_params(overrides=None) -> Path` writes params.yaml into
  tmp_path = the repo's params.yaml deep-merged with `overrides` (dicts merge key by key;
  lists and scalars replace), and chdirs there, so stage functions and the CLI see a
  project rooted in tmp_path. The file is written as given, NOT validated, so it also
  serves config-error tests.
- `image_folder` (function): `image_folder(root, train={"cat": 6}, val=None, size=(20, 16))`
  writes an ImageFolder tree of real PNG/JPEG files (distinct, seeded content).
- `messy_image_folder` (function): `messy_image_folder(root, val=None)`: three classes plus
  one of every kind of bad file (truncated JPEG, fake PNG, empty file, .txt, hidden file,
  file outside a class directory).
- `prepared_digits` (session): the default digits source prepared once into a session
  directory (its Path); point `data.out_dir` at it to skip the prepare stage in tests.

MLflow's process-wide tracking/registry URIs (and the MLFLOW_*_URI variables that
`mlflow.set_tracking_uri` exports) are restored after every test (`_restore_mlflow_uris`).

Torch runs single-threaded in the test process (`pytest_configure`): CI has 2 cores and
intra-op threads only add contention to these tiny models. Code that needs a thread count
(latency devices) sets and restores its own.
"""

from __future__ import annotations

import copy
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
_AWS_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


MLFLOW_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def _restore_mlflow_uris() -> Iterator[None]:
    """Undo what a test's `mlflow.set_tracking_uri` / `set_registry_uri` leaves behind.

    Why: mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI (for subprocesses), and
    evit.tracking lets that variable win over params. A test that called it pointed every
    later test's tracking at its own (gone) store while their registry URI named the session
    server, so registering logged the model in one store and created the version in the
    other: MLflow 500 "Logged model with ID ... not found", depending on test order.
    """
    env = {k: os.environ.get(k) for k in MLFLOW_URI_VARS}
    fluent = _mlflow_fluent_uris()
    yield
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if "mlflow" in sys.modules:
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        tracking_utils._tracking_uri, registry_utils._registry_uri = fluent


def _mlflow_fluent_uris() -> tuple[str | None, str | None]:
    if "mlflow" not in sys.modules:
        return None, None
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    return tracking_utils._tracking_uri, registry_utils._registry_uri


TEST_DISK_GB = 5.0
"""Free space the run needs under the temp dir (measured: the tests' outputs, the servers'
stores and the LiteRT converter venv peaked at ~4 GB beyond the main venv)."""


def pytest_configure(config: pytest.Config) -> None:
    import tempfile

    import torch

    torch.set_num_threads(1)
    if not hasattr(config, "workerinput"):  # once, in the controller: before any test starts
        where = Path(config.option.basetemp or tempfile.gettempdir())
        where = next(p for p in (where, *where.parents) if p.exists())
        free = shutil.disk_usage(where).free / 1e9
        if free < TEST_DISK_GB:
            pytest.exit(f"only {free:.1f} GB free on the disk of {where}; the tests need ~{TEST_DISK_GB:g} GB there "
                        "while they run (a full disk fails dozens of tests with 'No space left on device'): free "
                        "space, or point TMPDIR at a larger disk", returncode=3)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print what tests recorded as `record_property("summary", ...)`: a test's own print is
    lost under pytest-xdist (`make test` runs two workers), its report's properties are not."""
    for outcome in ("passed", "failed"):
        for report in terminalreporter.stats.get(outcome, []):
            for name, value in getattr(report, "user_properties", ()):
                if name == "summary" and getattr(report, "when", "call") == "call":
                    terminalreporter.write_line(str(value))


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` applied: nested dicts merge, everything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> bool:
    """True once `url` answers any HTTP status; False if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            time.sleep(0.1)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real moto_server on 127.0.0.1 (free port); yields 'http://127.0.0.1:PORT'.

    For the whole session: dummy AWS credentials and region in the environment, no AWS
    profile or endpoint override, and no ~/.aws files, so nothing can reach real AWS.
    """
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        found = shutil.which("moto_server")
        if found is None:
            pytest.fail("moto_server not found: install the test extras (pip install 'moto[server]')")
        exe = Path(found)
    home = tmp_path_factory.mktemp("moto")
    mp = pytest.MonkeyPatch()
    for key, value in AWS_TEST_ENV.items():
        mp.setenv(key, value)
    for key in _AWS_UNSET:
        mp.delenv(key, raising=False)
    mp.setenv("AWS_CONFIG_FILE", str(home / "no-aws-config"))
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "no-aws-credentials"))
    proc = None
    try:
        for _attempt in range(3):  # a free port can be taken between probing and binding
            port = free_port()
            log = home / f"moto_server-{port}.log"
            with open(log, "wb") as fh:
                proc = subprocess.Popen([str(exe), "-p", str(port), "-H", "127.0.0.1"],
                                        stdout=fh, stderr=subprocess.STDOUT, env=os.environ.copy())
            url = f"http://127.0.0.1:{port}"
            if wait_http(f"{url}/moto-api/", proc):
                break
            _stop(proc)
        else:
            pytest.fail(f"moto_server did not start; last log:\n{log.read_text()[-2000:]}")
        yield url
    finally:
        if proc is not None:
            _stop(proc)
        mp.undo()


@pytest.fixture(scope="session")
def s3_client(moto_server: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=moto_server, region_name=AWS_TEST_ENV["AWS_DEFAULT_REGION"])


@pytest.fixture
def s3_upload(s3_client: Any) -> Callable[..., str]:
    """Upload a local tree to the moto server; returns its s3:// URL."""

    def upload(local_dir: str | os.PathLike[str], bucket: str | None = None, prefix: str = "") -> str:
        bucket = bucket or f"test-{uuid.uuid4().hex[:12]}"
        existing = {b["Name"] for b in s3_client.list_buckets().get("Buckets", [])}
        if bucket not in existing:
            s3_client.create_bucket(Bucket=bucket)
        root = Path(local_dir)
        prefix = prefix.strip("/")
        for path in sorted(root.rglob("*")):
            if path.is_file():
                rel = path.relative_to(root).as_posix()
                s3_client.upload_file(str(path), bucket, f"{prefix}/{rel}" if prefix else rel)
        return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"

    return upload


@pytest.fixture
def tiny_params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Factory: write tmp_path/params.yaml (repo defaults deep-merged with overrides) and chdir there."""
    monkeypatch.delenv("EVIT_PARAMS", raising=False)

    def make(overrides: Mapping[str, Any] | None = None, *, name: str = "params.yaml") -> Path:
        base = yaml.safe_load((REPO / "params.yaml").read_text())
        path = tmp_path / name
        path.write_text(yaml.safe_dump(deep_merge(base, overrides or {}), sort_keys=False))
        monkeypatch.chdir(tmp_path)
        return path

    return make


def write_image_folder(root: Path, train: Mapping[str, int], val: Mapping[str, int] | None = None,
                       size: tuple[int, int] = (20, 16), seed: int = 0) -> Path:
    """An ImageFolder tree of real images: even-numbered files PNG, odd JPEG, seeded noise + a class tint."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, classes in (("train", train), ("val", val or {})):
        for k, (cls, n) in enumerate(sorted(classes.items())):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                arr[..., k % 3] = (arr[..., k % 3] // 2 + 120).astype(np.uint8)
                if i % 2 == 0:
                    Image.fromarray(arr).save(d / f"img{i:03d}.png")
                else:
                    Image.fromarray(arr).save(d / f"img{i:03d}.jpg", quality=90)
    return root


@pytest.fixture
def image_folder() -> Callable[..., Path]:
    return write_image_folder


def write_messy_image_folder(root: Path, val: Mapping[str, int] | None = None) -> Path:
    """Classes ant/bee/cat (9 images each, plus a nested .bmp in ant) and one of every file
    prepare must exclude rather than crash on: a truncated JPEG, a non-image with a .png
    name, an empty .jpg, a .txt, a hidden file, a file outside any class directory."""
    import io

    import numpy as np
    from PIL import Image

    write_image_folder(root, train={"ant": 9, "bee": 9, "cat": 9}, val=val, size=(24, 18))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "train" / "bee" / "broken.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "train" / "bee" / "garbage.png").write_bytes(b"this is not a png at all")
    (root / "train" / "bee" / "empty.jpg").write_bytes(b"")
    (root / "train" / "cat" / "notes.txt").write_text("labelling notes")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0\0")
    (root / "train" / "README.md").write_text("dataset card")
    nested = root / "train" / "ant" / "extra"
    nested.mkdir()
    Image.new("RGB", (30, 40), (200, 10, 10)).save(nested / "tall.bmp")
    (root / "test").mkdir()  # ignored: only train/ and val/ are read
    return root


@pytest.fixture
def messy_image_folder() -> Callable[..., Path]:
    return write_messy_image_folder


@pytest.fixture(scope="session")
def prepared_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default digits data prepared once per session (data.out_dir = the returned Path)."""
    from evit.config import parse_params
    from evit.data.prepare import prepare_data

    out = tmp_path_factory.mktemp("prepared-digits") / "prepared"
    prepare_data(parse_params({"data": {"out_dir": str(out)}}))
    return out
