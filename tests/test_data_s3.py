"""The S3 source against a real moto_server process on 127.0.0.1 (no in-process mocks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evit.config import load_params
from evit.data.prepare import prepare_data
from evit.errors import DataError

pytestmark = pytest.mark.slow
OUT = Path("data/prepared")


def _manifest() -> dict:
    return json.loads((OUT / "manifest.json").read_text())


def test_s3_matches_the_same_local_folder(tiny_params, messy_image_folder, s3_upload, moto_server,
                                          tmp_path: Path) -> None:
    src = messy_image_folder(tmp_path / "src", val={"ant": 2, "bee": 2, "cat": 3})
    url = s3_upload(src, prefix="datasets/tiny")
    data = {"storage_resolution": 16, "val_fraction": 0.0, "read_threads": 3}

    prepare_data(load_params(tiny_params({"data": {**data, "source": str(src)}})))
    local = _manifest()
    prepare_data(load_params(tiny_params({"data": {**data, "source": url}, "storage": {"endpoint_url": moto_server}})))
    remote = _manifest()

    assert remote["source"] == {"kind": "s3", "uri": url, "has_val": True}
    assert remote["content_hash"] == local["content_hash"]  # same pixels, labels, paths, split
    assert remote["counts"] == local["counts"] and remote["excluded"] == local["excluded"]
    assert {e["path"] for e in remote["excluded"]} >= {"train/bee/broken.jpg", "train/cat/notes.txt"}


def test_env_endpoint_overrides_params(tiny_params, image_folder, s3_upload, moto_server, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    url = s3_upload(image_folder(tmp_path / "src", train={"ant": 8, "bee": 8}))
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    params = tiny_params({"data": {"source": url, "storage_resolution": 8},
                          "storage": {"endpoint_url": "http://127.0.0.1:9"}})  # nothing listens there
    prepare_data(load_params(params))
    assert _manifest()["totals"]["train"] == 12


def test_s3_empty_class_marker_is_an_error(tiny_params, image_folder, s3_upload, s3_client, moto_server,
                                           tmp_path: Path) -> None:
    url = s3_upload(image_folder(tmp_path / "src", train={"ant": 8, "bee": 8}))
    s3_client.put_object(Bucket=url[len("s3://"):], Key="train/dog/", Body=b"")  # a console "folder"
    params = tiny_params({"data": {"source": url}, "storage": {"endpoint_url": moto_server}})
    with pytest.raises(DataError, match="'dog' has no readable images in train/"):
        prepare_data(load_params(params))
    assert not OUT.exists()


def test_missing_bucket_and_prefix(tiny_params, image_folder, s3_upload, moto_server, tmp_path: Path) -> None:
    params = tiny_params({"data": {"source": "s3://no-such-bucket-here/x"}, "storage": {"endpoint_url": moto_server}})
    with pytest.raises(DataError) as info:
        prepare_data(load_params(params))
    assert "'no-such-bucket-here' does not exist" in str(info.value) and moto_server in str(info.value)

    url = s3_upload(image_folder(tmp_path / "src", train={"ant": 8, "bee": 8}), prefix="real")
    bucket = url.split("/")[2]
    params = tiny_params({"data": {"source": f"s3://{bucket}/typo"}, "storage": {"endpoint_url": moto_server}})
    with pytest.raises(DataError) as info:
        prepare_data(load_params(params))
    msg = str(info.value)
    assert f"s3://{bucket}/typo/train/" in msg and "real/" in msg  # says what is there instead
    assert not OUT.exists()


def test_unreachable_endpoint_and_missing_credentials(tiny_params, moto_server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    params = tiny_params({"data": {"source": "s3://some-bucket/x"}, "storage": {"endpoint_url": "http://127.0.0.1:9"}})
    with pytest.raises(DataError, match=r"cannot reach endpoint http://127\.0\.0\.1:9"):
        prepare_data(load_params(params))

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    params = tiny_params({"data": {"source": "s3://some-bucket/x"}, "storage": {"endpoint_url": moto_server}})
    with pytest.raises(DataError, match="no usable AWS credentials"):
        prepare_data(load_params(params))
