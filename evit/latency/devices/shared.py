"""Where converted latency files are shared: a folder or s3://bucket/prefix (issue 24).

A `.pte` / `.tflite` file a table build times depends on the runtime's version, the evit
static-module code and the modules it holds (block, input shape), not on the device that
times it (`converting.ConvertingDevice._plan_files` names it by that content hash). So the
content-addressed cache can live in one shared place: a second phone, a second machine or
a teammate's build fetches what the first converted and converts nothing.

`shared_store(storage)` is the place `storage.share_models` names: the DVC remote's
`latency-models/` folder or prefix (`storage.remote`: a local folder or s3://bucket/prefix,
through boto3 in `evit.data.sources.s3`), or `EVIT_MODEL_CACHE_REMOTE` (a folder or an
s3:// URL) when set. Each file travels with a small JSON manifest (`<file>.json`: which
module is which signature / method), so a build whose plan groups modules differently
still finds every module already converted.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from evit.config import StorageParams

PREFIX = "latency-models"
ENV = "EVIT_MODEL_CACHE_REMOTE"


class SharedStore:
    """A flat namespace of files (names without folders): list, get (atomic), put."""

    def __init__(self, location: str, storage: StorageParams | None = None) -> None:
        self.location = location.rstrip("/")
        self._s3: Any = None
        if self.location.startswith("s3://"):
            from evit.data.sources.s3 import S3Files

            self._s3 = S3Files(self.location, storage or StorageParams())

    def __repr__(self) -> str:
        return f"SharedStore({self.location!r})"

    def names(self) -> set[str]:
        if self._s3 is not None:
            return {n for n in self._s3.names() if "/" not in n}
        root = Path(self.location)
        return {p.name for p in root.iterdir() if p.is_file() and ".part-" not in p.name} if root.is_dir() else set()

    def get(self, name: str, dest: Path) -> bool:
        """Copy `name` to `dest` (temp file + rename); False when the store lacks it."""
        if self._s3 is not None:
            return bool(self._s3.get(name, dest))
        src = Path(self.location) / name
        if not src.is_file():
            return False
        tmp = dest.with_name(f"{dest.name}.part-{os.getpid()}")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        return True

    def put(self, path: Path) -> None:
        """Store `path` under its own name (a reader never sees half a file)."""
        if self._s3 is not None:
            self._s3.put(path, path.name)
            return
        root = Path(self.location)
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f"{path.name}.part-{os.getpid()}"
        shutil.copyfile(path, tmp)
        os.replace(tmp, root / path.name)

    def close(self) -> None:
        if self._s3 is not None:
            self._s3.close()


def shared_store(storage: StorageParams) -> SharedStore | None:
    """The shared place `storage` names for converted files, or None (local cache only)."""
    env = os.environ.get(ENV)
    if env:
        return SharedStore(env, storage)
    if not storage.share_models:
        return None
    return SharedStore(f"{storage.remote.rstrip('/')}/{PREFIX}", storage)
