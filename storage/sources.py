"""Turn user sources into a stream of image URIs, and read one URI's bytes.

Sources: files, folders (recursive), ``file://`` URIs, ``s3://bucket/prefix`` (paginated listing),
``http(s)://`` URLs, manifests (``.txt``, ``.csv``, ``.jsonl`` files of URIs or paths) and ``-`` for
URIs on standard input. Everything streams: a million URIs never sit in memory at once.
"""

from __future__ import annotations

import csv
import json
import os
import stat
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Iterator
from urllib.parse import unquote_to_bytes, urlparse

from .settings import Settings

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
MANIFEST_SUFFIXES = frozenset({".txt", ".csv", ".jsonl"})
URI_SCHEMES = frozenset({"file", "s3", "http", "https"})
_MANIFEST_COLUMNS = ("uri", "url", "path", "file")
HTTP_TIMEOUT = 30
S3_LIST_PAGE_SIZE = 1000  # keys per ListObjectsV2 request (the S3 maximum)
HTTP_ATTEMPTS = 3


class SourceError(Exception):
    """An image that cannot be read; the message is the item's failure reason."""


def _walk_folder(folder: Path) -> Iterator[str]:
    # os.walk streams; sorting each directory keeps runs reproducible without listing everything first.
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(dirpath, name).absolute().as_uri()


def iter_uris(sources: list[str], settings: Settings | None = None, stdin: IO[str] | None = None) -> Iterator[str]:
    """Yield image URIs from the sources, in order (the database dedupes: a URI is one item per job)."""
    for source in sources:
        parsed = urlparse(source)
        if source == "-":
            yield from _manifest_entries(stdin or sys.stdin, ".txt", Path.cwd())
            continue
        if parsed.scheme == "s3":
            yield from _list_s3(source, settings or Settings())
            continue
        if parsed.scheme in ("http", "https"):
            yield source
            continue
        if parsed.scheme == "file":
            path = _file_uri_path(parsed.path)
        elif parsed.scheme in ("", ) or (len(parsed.scheme) == 1 and os.name == "nt"):
            path = Path(source)
        else:
            raise SourceError(f"unsupported source {source!r}: give a file, a folder or a file:// URI")
        if path.is_dir():
            yield from _walk_folder(path)
        elif path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file():
            with open(path, newline="", encoding="utf-8") as f:
                yield from _manifest_entries(f, path.suffix.lower(), path.parent)
        elif path.exists() or path.is_symlink():
            yield path.absolute().as_uri()
        else:
            raise SourceError(f"source not found: {source}")


def _manifest_entries(stream: IO[str], suffix: str, base: Path) -> Iterator[str]:
    """URIs of a manifest: one per line (.txt, ``#`` comments), per row (.csv: the uri/url/path/file column,
    else the first) or per JSON line (.jsonl: a string or an object with one of those keys). A plain path is
    relative to the manifest's folder (stdin: the current folder)."""
    if suffix == ".csv":
        rows = csv.reader(stream)
        header = next(rows, None)
        if header is None:
            return
        names = [h.strip().lower() for h in header]
        column = next((names.index(n) for n in _MANIFEST_COLUMNS if n in names), None)
        if column is None:  # no header: the first row is an entry too
            column = 0
            rows = _prepend(header, rows)
        values = (row[column] for row in rows if len(row) > column)
    elif suffix == ".jsonl":
        values = (_jsonl_value(line) for line in stream if line.strip())
    else:
        values = (line for line in stream if not line.lstrip().startswith("#"))
    for value in values:
        value = value.strip()
        if value:
            yield _entry_uri(value, base)


def _prepend(first: list[str], rows: Iterator[list[str]]) -> Iterator[list[str]]:
    yield first
    yield from rows


def _jsonl_value(line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise SourceError(f"manifest line is not JSON ({exc}): {line[:200]!r}") from None
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for key in _MANIFEST_COLUMNS:
            if isinstance(record.get(key), str):
                return record[key]
    raise SourceError(f"manifest line has no uri/url/path/file string: {line[:200]!r}")


def _entry_uri(value: str, base: Path) -> str:
    if urlparse(value).scheme in URI_SCHEMES:
        return value
    return (base / value).absolute().as_uri()


def _list_s3(url: str, settings: Settings) -> Iterator[str]:
    """Image objects under an ``s3://bucket/prefix``, page by page (1000 keys a request); a URL whose key
    has an image suffix is that one object."""
    from .s3 import s3_client, split_s3_url

    bucket, prefix = split_s3_url(url)
    if Path(prefix).suffix.lower() in IMAGE_SUFFIXES:
        yield url
        return
    pages = s3_client(settings).get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": S3_LIST_PAGE_SIZE})
    try:
        for page in pages:
            for obj in page.get("Contents", ()):
                if Path(obj["Key"]).suffix.lower() in IMAGE_SUFFIXES:
                    yield f"s3://{bucket}/{obj['Key']}"
    except Exception as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code")
        if code in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise SourceError(f"cannot list {url}: {code}") from None
        raise


def _file_uri_path(uri_path: str) -> Path:
    # as_uri() percent-encodes the raw file-name bytes, which need not be UTF-8: decode them the same way.
    return Path(os.fsdecode(unquote_to_bytes(uri_path)))


def read_uri(uri: str, max_bytes: int, settings: Settings | None = None) -> bytes:
    """The bytes behind ``uri``. A SourceError is the item's own fault (missing, too big, forbidden) and
    fails it; other errors (S3 or network down) are transient and left to the caller's retries."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return _read_s3(uri, max_bytes, settings or Settings())
    if parsed.scheme in ("http", "https"):
        return _read_http(uri, max_bytes)
    if parsed.scheme != "file":
        raise SourceError(f"unsupported URI scheme {parsed.scheme!r}")
    path = _file_uri_path(parsed.path)
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise SourceError("is a directory, not an image file")
        if not stat.S_ISREG(info.st_mode):  # reading a FIFO would wait forever
            raise SourceError("not a regular file (a pipe, socket or device)")
        if info.st_size > max_bytes:
            raise SourceError(f"file is {info.st_size} bytes, over the limit of {max_bytes}")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # the file may have grown since stat
    except FileNotFoundError:
        raise SourceError("file not found (or a broken symlink)") from None
    except PermissionError:
        raise SourceError("permission denied") from None
    except OSError as exc:  # a symlink loop, a name too long, an I/O error: this item fails, the job goes on
        raise SourceError(f"cannot read file: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise SourceError(f"file grew over the limit of {max_bytes} bytes while being read")
    if not data:
        raise SourceError("empty file")
    return data


def _read_s3(uri: str, max_bytes: int, settings: Settings) -> bytes:
    from botocore.exceptions import ClientError

    from .s3 import s3_client, split_s3_url

    bucket, key = split_s3_url(uri)
    try:
        response = s3_client(settings).get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in ("NoSuchKey", "404", "NoSuchBucket") or status == 404:
            raise SourceError("object not found") from None
        if status == 403:
            raise SourceError(f"access denied ({code})") from None
        raise
    size = response["ContentLength"]
    with response["Body"] as body:
        if size > max_bytes:
            raise SourceError(f"object is {size} bytes, over the limit of {max_bytes}")
        data = body.read(max_bytes + 1)
    if not data:
        raise SourceError("empty object")
    return data


def _read_http(uri: str, max_bytes: int) -> bytes:
    """GET with a size limit; 5xx and connection errors are retried a few times, then fail the item
    (a web server is not salient's storage: its being down is the image's problem)."""
    for attempt in range(HTTP_ATTEMPTS):
        try:
            request = urllib.request.Request(uri, headers={"User-Agent": "salient"})
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
                length = response.headers.get("Content-Length")
                if length is not None and int(length) > max_bytes:
                    raise SourceError(f"response is {length} bytes, over the limit of {max_bytes}")
                data = response.read(max_bytes + 1)
            break
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == HTTP_ATTEMPTS - 1:
                raise SourceError(f"HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            if attempt == HTTP_ATTEMPTS - 1:
                raise SourceError(f"cannot fetch: {getattr(exc, 'reason', exc)}") from None
        time.sleep(0.5 * 2 ** attempt)
    if len(data) > max_bytes:
        raise SourceError(f"response is over the limit of {max_bytes} bytes")
    if not data:
        raise SourceError("empty response")
    return data
