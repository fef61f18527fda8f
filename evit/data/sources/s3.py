"""S3 (AWS, MinIO, moto_server) as an image source: the boto3 client and the S3 data source.

Endpoint: `AWS_ENDPOINT_URL_S3`, then `AWS_ENDPOINT_URL`, then `storage.endpoint_url`
(None means AWS itself), so one environment variable points a whole run at MinIO or a
local moto_server without editing params.yaml. Credentials come from boto3's standard chain
(environment, ~/.aws, instance roles); they are never read from params.yaml.

botocore errors are translated into `DataError`s that say what to fix (the bucket, the
endpoint, the credentials), because a raw `ClientError` traceback tells a user nothing.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from evit.config import StorageParams
from evit.data.images import BadImage, decode
from evit.data.sources.base import LAYOUT_HINT, SOURCE_SPLITS, Item, Listing, Source, classify, merge
from evit.errors import DataError

log = logging.getLogger(__name__)

_MISSING_CODES = {"NoSuchBucket", "404", "NotFound"}
_DENIED_CODES = {"AccessDenied", "403", "AllAccessDisabled"}
_BAD_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}


def parse_s3_url(url: str) -> tuple[str, str]:
    """'s3://bucket/some/prefix/' -> ('bucket', 'some/prefix')."""
    if not url.startswith("s3://"):
        raise DataError(f"{url!r} is not an S3 URL; accepted: s3://bucket/prefix")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket:
        raise DataError(f"{url!r} has no bucket name; accepted: s3://bucket/prefix")
    return bucket, prefix.strip("/")


def resolve_endpoint(storage: StorageParams) -> str | None:
    """The S3 endpoint to use: environment first (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL), then params."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or storage.endpoint_url


def make_client(storage: StorageParams, *, max_pool_connections: int = 10) -> Any:
    """A boto3 S3 client for `storage` (endpoint as in `resolve_endpoint`), with standard retries."""
    import boto3
    from botocore.config import Config

    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS", "5"))  # boto3's own variable; Config would hide it
    config = Config(
        retries={"max_attempts": attempts, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=max(10, max_pool_connections),
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or storage.region
    return boto3.session.Session().client("s3", endpoint_url=resolve_endpoint(storage), region_name=region, config=config)


def translate_error(exc: BaseException, *, url: str, endpoint: str | None) -> DataError | None:
    """A botocore exception -> a DataError saying what to fix; None if it is not an S3 access problem."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    where = f"endpoint {endpoint}" if endpoint else "AWS S3 (no endpoint_url set)"
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return DataError(
            f"{url}: no usable AWS credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE / ~/.aws/credentials)"
        )
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
        return DataError(
            f"{url}: cannot reach {where} ({exc}); check storage.endpoint_url in params.yaml or AWS_ENDPOINT_URL"
        )
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        bucket = parse_s3_url(url)[0]
        if code in _MISSING_CODES:
            return DataError(f"{url}: bucket {bucket!r} does not exist at {where}")
        if code in _DENIED_CODES:
            return DataError(f"{url}: access denied at {where}; check the credentials' permissions on {bucket!r}")
        if code in _BAD_CREDENTIAL_CODES:
            return DataError(f"{url}: the credentials were rejected by {where} ({code})")
        return DataError(f"{url}: S3 error {code or type(exc).__name__} at {where}: {exc}")
    return None


class _S3Prefix:
    """A client bound to s3://bucket/prefix whose calls raise evit's one-line errors."""

    def __init__(self, url: str, storage: StorageParams, *, max_pool_connections: int = 10) -> None:
        self.uri = url
        self.bucket, self.prefix = parse_s3_url(url)
        self.endpoint = resolve_endpoint(storage)
        self.client = make_client(storage, max_pool_connections=max_pool_connections)

    def _call(self, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except Exception as exc:  # botocore raises many unrelated types; translate what we know
            err = translate_error(exc, url=self.uri, endpoint=self.endpoint)
            if err is None:
                raise
            raise err from None

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def close(self) -> None:
        self.client.close()


class S3Source(_S3Prefix, Source):
    """The ImageFolder layout under s3://bucket/prefix (train/<class>/..., optional val/<class>/...)."""

    kind = "s3"

    def __init__(self, url: str, storage: StorageParams, *, threads: int = 4) -> None:
        super().__init__(url, storage, max_pool_connections=threads * 2)
        self._call(self.client.head_bucket, Bucket=self.bucket)

    def _keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")

        def pages() -> list[dict[str, Any]]:
            return list(paginator.paginate(Bucket=self.bucket, Prefix=prefix))

        for page in self._call(pages):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return sorted(keys)

    def list(self) -> Listing:
        parts = []
        for split in SOURCE_SPLITS:
            base = self._key(f"{split}/")
            keys = self._keys(base)
            if split == "train" and not keys:
                raise DataError(f"data.source: no objects under s3://{self.bucket}/{base}; {self._what_is_there()}; "
                                f"{LAYOUT_HINT}")
            rel = [k[len(base):] for k in keys]
            # Zero-byte "folder" markers (what consoles create for an empty directory).
            dirs = [r.rstrip("/") for r in rel if r.endswith("/") and r.count("/") == 1]
            files = [r for r in rel if r and not r.endswith("/")]
            if keys:
                parts.append(classify(split, files, dirs))
        return merge(parts)

    def _what_is_there(self) -> str:
        """Name what exists under the prefix, or next to it when it is empty (a typo'd prefix)."""
        candidates = [self.prefix, self.prefix.rpartition("/")[0]] if self.prefix else [""]
        for prefix in candidates:
            listed = f"{prefix}/" if prefix else ""
            top = self._call(self.client.list_objects_v2, Bucket=self.bucket, Prefix=listed, Delimiter="/", MaxKeys=20)
            found = [p["Prefix"] for p in top.get("CommonPrefixes", [])] + [o["Key"] for o in top.get("Contents", [])]
            if found:
                return f"s3://{self.bucket}/{listed} holds {found}"
        return f"bucket {self.bucket!r} holds nothing at or next to {self.prefix or 'its top level'!r}"

    def read(self, item: Item, size: int) -> np.ndarray:
        return decode(self.read_bytes(item, size), size)

    def read_bytes(self, item: Item, size: int) -> bytes:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(item.path))["Body"]
            return bytes(body.read())
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in {"NoSuchKey", "404", *_DENIED_CODES}:
                raise BadImage(f"unreadable object ({code})") from None
            raise self._translated(exc) from None
        except Exception as exc:
            raise self._translated(exc) from None

    def _translated(self, exc: BaseException) -> BaseException:
        return translate_error(exc, url=self.uri, endpoint=self.endpoint) or exc


class S3Files(_S3Prefix):
    """Plain files under s3://bucket/prefix: list, fetch (atomically), put. What other stages
    share through the bucket (the latency tables' converted files, `evit.latency.devices.shared`)
    use this, so boto3 stays in this module."""

    def names(self) -> list[str]:
        """Every object name under the prefix (relative to it), sorted."""
        base = self._key("")
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=base)))
        return sorted(o["Key"][len(base):] for p in pages for o in p.get("Contents", []))

    def get(self, rel: str, dest: str | os.PathLike[str]) -> bool:
        """Download `rel` to `dest` (temp file + rename); False when there is no such object."""
        from botocore.exceptions import ClientError

        tmp = f"{os.fspath(dest)}.part-{os.getpid()}"
        try:
            self.client.download_file(self.bucket, self._key(rel), tmp)
        except Exception as exc:  # noqa: BLE001 - botocore raises many unrelated types; translated below
            if os.path.exists(tmp):
                os.unlink(tmp)
            code = str(exc.response.get("Error", {}).get("Code", "")) if isinstance(exc, ClientError) else ""
            if code in {"NoSuchKey", "404"}:
                return False
            raise translate_error(exc, url=self.uri, endpoint=self.endpoint) or exc from None
        os.replace(tmp, dest)
        return True

    def put(self, path: str | os.PathLike[str], rel: str) -> None:
        self._call(self.client.upload_file, Filename=os.fspath(path), Bucket=self.bucket, Key=self._key(rel))
