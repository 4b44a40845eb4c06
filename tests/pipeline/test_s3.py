"""The S3 object store and the s3:// and http(s):// sources against a real S3 server (SeaweedFS,
signatures checked) and a real HTTP server on loopback."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading

import pytest
from botocore.exceptions import ClientError

from salient_maps.storage import s3 as s3_module
from salient_maps.storage import sources
from salient_maps.storage.objects import S3ObjectStore, open_store
from salient_maps.storage.settings import Settings
from salient_maps.storage.sources import SourceError, iter_uris, read_uri


def test_put_get_exists_under_a_prefix_with_content_type(pipeline):
    store = open_store(f"s3://{pipeline.bucket}/some/prefix/", Settings())
    assert isinstance(store, S3ObjectStore)
    assert not store.exists("maps/a.npy")
    store.put("maps/a.npy", b"\x93NUMPY", "application/octet-stream")
    store.put("overlays/a.png", b"\x89PNG", "image/png")
    assert store.exists("maps/a.npy") and store.get("overlays/a.png") == b"\x89PNG"
    assert sorted(pipeline.bucket_keys()) == ["some/prefix/maps/a.npy", "some/prefix/overlays/a.png"]
    head = pipeline.s3.head_object(Bucket=pipeline.bucket, Key="some/prefix/overlays/a.png")
    assert head["ContentType"] == "image/png"
    with pytest.raises(ValueError):
        store.put("../escape.png", b"x", "image/png")


def test_list_and_delete_under_a_prefix(pipeline):
    """What ``salient gc`` uses: keys under the store's prefix with their times; deleting twice is no error."""
    from salient_maps.storage.database import utcnow

    store = open_store(f"s3://{pipeline.bucket}/some/prefix", Settings())
    for key in ("shards/ab/1.safetensors", "shards/cd/2.safetensors", "overlays/ab/1.tar"):
        store.put(key, b"x", "application/octet-stream")
    pipeline.s3.put_object(Bucket=pipeline.bucket, Key="elsewhere/shards/3.safetensors", Body=b"x")
    listed = list(store.list("shards/"))
    assert sorted(key for key, _ in listed) == ["shards/ab/1.safetensors", "shards/cd/2.safetensors"]
    assert all(modified.tzinfo is not None and modified <= utcnow() for _, modified in listed)  # comparable, UTC
    store.delete("shards/ab/1.safetensors")
    store.delete("shards/ab/1.safetensors")
    assert not store.exists("shards/ab/1.safetensors") and store.exists("shards/cd/2.safetensors")
    assert sorted(pipeline.bucket_keys()) == ["elsewhere/shards/3.safetensors", "some/prefix/overlays/ab/1.tar",
                                              "some/prefix/shards/cd/2.safetensors"]


def test_large_objects_go_up_in_parts(pipeline):
    settings = Settings(s3_multipart_threshold=5 * 1024 * 1024)
    store = open_store(f"s3://{pipeline.bucket}", settings)
    data = hashlib.sha256(b"seed").digest() * (6 * 1024 * 1024 // 32 + 1)  # just over 6 MiB
    store.put("big.npy", data, "application/octet-stream")
    assert store.get("big.npy") == data
    head = pipeline.s3.head_object(Bucket=pipeline.bucket, Key="big.npy")
    assert head["ETag"].strip('"').endswith("-2")  # a multipart upload's ETag counts its parts
    assert head["ContentType"] == "application/octet-stream"


def test_requests_are_signed_and_a_wrong_secret_is_refused(pipeline, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    s3_module._client.cache_clear()
    try:
        with pytest.raises(ClientError) as refused:
            open_store(f"s3://{pipeline.bucket}", Settings()).put("x.png", b"x", "image/png")
        assert refused.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    finally:
        s3_module._client.cache_clear()


def test_listing_a_prefix_follows_every_page(pipeline, monkeypatch):
    for i in range(20):
        pipeline.s3.put_object(Bucket=pipeline.bucket, Key=f"photos/{i:02d}.jpg", Body=b"x")
    pipeline.s3.put_object(Bucket=pipeline.bucket, Key="photos/notes.txt", Body=b"x")
    pipeline.s3.put_object(Bucket=pipeline.bucket, Key="other/99.jpg", Body=b"x")
    monkeypatch.setattr(sources, "S3_LIST_PAGE_SIZE", 7)  # 3 pages
    uris = list(iter_uris([f"s3://{pipeline.bucket}/photos"]))
    assert uris == [f"s3://{pipeline.bucket}/photos/{i:02d}.jpg" for i in range(20)]
    assert list(iter_uris([f"s3://{pipeline.bucket}/other/99.jpg"])) == [f"s3://{pipeline.bucket}/other/99.jpg"]
    with pytest.raises(SourceError, match="NoSuchBucket"):
        list(iter_uris(["s3://no-such-bucket-here/x"]))


def test_read_s3_objects_with_limits(pipeline):
    pipeline.s3.put_object(Bucket=pipeline.bucket, Key="in/a.png", Body=b"12345")
    assert read_uri(f"s3://{pipeline.bucket}/in/a.png", 100) == b"12345"
    with pytest.raises(SourceError, match="over the limit"):
        read_uri(f"s3://{pipeline.bucket}/in/a.png", 4)
    with pytest.raises(SourceError, match="not found"):
        read_uri(f"s3://{pipeline.bucket}/in/missing.png", 100)


@pytest.fixture
def http_folder(tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_read_http_urls_with_limits(http_folder):
    folder, base = http_folder
    loopback = Settings(allow_private_networks=True)  # closed by default (tests/test_uri_policy.py)
    (folder / "a.png").write_bytes(b"abcdef")
    assert list(iter_uris([f"{base}/a.png"])) == [f"{base}/a.png"]
    assert read_uri(f"{base}/a.png", 100, loopback) == b"abcdef"
    with pytest.raises(SourceError, match="over the limit"):
        read_uri(f"{base}/a.png", 3, loopback)
    with pytest.raises(SourceError, match="HTTP 404"):
        read_uri(f"{base}/missing.png", 100, loopback)
