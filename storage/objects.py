"""Object stores behind one small interface; keys are content-addressed so writes are idempotent."""

from __future__ import annotations

import io
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Protocol
from urllib.parse import urlparse

from .s3 import s3_client, split_s3_url
from .settings import Settings


class ObjectStore(Protocol):
    url: str

    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def put_if_absent(self, key: str, render: Callable[[], bytes], content_type: str) -> None:
        """Write ``render()`` unless ``key`` exists: a content-addressed key that exists already holds
        these bytes. Costs one request on a remote store (no existence check first)."""
        ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove ``key``; one that is not there is no error."""
        ...

    def list(self, prefix: str) -> Iterator[tuple[str, datetime]]:
        """The keys under ``prefix`` with their last-modified times (UTC)."""
        ...


class LocalObjectStore:
    """A folder; writes go through a temp file and rename so a reader never sees half an object."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"object key escapes the store: {key!r}")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_if_absent(self, key: str, render: Callable[[], bytes], content_type: str) -> None:
        # A local check is free, and skips rendering: a rerun rewrites (and re-encodes) nothing.
        if not self.exists(key):
            self.put(key, render(), content_type)

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> Iterator[tuple[str, datetime]]:
        base = self._path(prefix)
        for path in sorted(base.rglob("*")) if base.is_dir() else ():
            if path.is_file() and not path.name.startswith(".tmp-"):
                yield (path.relative_to(self.root.resolve()).as_posix(),
                       datetime.fromtimestamp(path.stat().st_mtime, timezone.utc))


class S3ObjectStore:
    """A bucket and key prefix on any S3 API (AWS, MinIO, Ceph, SeaweedFS).

    Transient errors (5xx, throttling, dropped connections) are retried by botocore's standard retry
    mode with exponential backoff; objects over ``multipart_threshold`` go up in parallel parts.
    """

    def __init__(self, url: str, settings: Settings):
        self.url = url.rstrip("/")
        self.bucket, prefix = split_s3_url(self.url)
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.client = s3_client(settings)
        self.multipart_threshold = settings.s3_multipart_threshold

    def _key(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"object key escapes the store: {key!r}")
        return self.prefix + key

    def put(self, key: str, data: bytes, content_type: str) -> None:
        if len(data) <= self.multipart_threshold:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type)
            return
        from boto3.s3.transfer import TransferConfig

        transfer = TransferConfig(multipart_threshold=self.multipart_threshold,
                                  multipart_chunksize=self.multipart_threshold)
        self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(key),
                                   ExtraArgs={"ContentType": content_type}, Config=transfer)

    def put_if_absent(self, key: str, render: Callable[[], bytes], content_type: str) -> None:
        """One conditional PUT (``If-None-Match: *``): the server keeps an existing object and answers
        412. A server without conditional writes overwrites it with the same bytes, which is harmless."""
        from botocore.exceptions import ClientError

        data = render()
        if len(data) > self.multipart_threshold:  # s3transfer's multipart uploads take no condition
            self.put(key, data, content_type)
            return
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type,
                                   IfNoneMatch="*")
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 412:  # already there
                return
            if status == 409:  # a concurrent write of the same key raced this one: make sure one lands
                self.put(key, data, content_type)
                return
            raise

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str) -> Iterator[tuple[str, datetime]]:
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=self._key(prefix)):
            for obj in page.get("Contents", ()):
                yield obj["Key"].removeprefix(self.prefix), obj["LastModified"]


def open_store(url: str, settings: Settings | None = None) -> ObjectStore:
    """``file:///path`` -> LocalObjectStore, ``s3://bucket/prefix`` -> S3ObjectStore (endpoint from settings)."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalObjectStore(Path(parsed.path))
    if parsed.scheme == "s3":
        return S3ObjectStore(url, settings or Settings())
    raise ValueError(f"unsupported object store URL scheme {parsed.scheme!r} (use file:// or s3://)")
