"""Turn user sources into a stream of image URIs, and read one URI's bytes.

Sources: files, folders (recursive), ``file://`` URIs, ``s3://bucket/prefix`` (paginated listing),
``http(s)://`` URLs, manifests (``.txt``, ``.csv``, ``.jsonl`` files of URIs or paths) and ``-`` for
URIs on standard input. Everything streams: a million URIs never sit in memory at once.

``.jsonl`` and ``.csv`` manifests may also carry ground truth per image (``iter_entries``): ``label`` (class id or
name), ``boxes`` (``[[x0, y0, x1, y1], ...]`` in the original image's pixels; in CSV a JSON string) and ``mask`` (the
URI of a PNG, nonzero = object; relative paths as for entries). Bad ground truth is that entry's ``problem``, the
reason its item fails, not the listing's.

Reading obeys storage/uri_policy.py (file roots, network checks, bucket list) before touching anything,
and caps what it reads: bytes (``max_bytes``) and, over HTTP, time (``http_timeout``) and redirects.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import http.client
import json
import os
import re
import socket
import ssl
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator
from urllib.parse import unquote_to_bytes, urljoin, urlparse, urlsplit

from .settings import Settings
from .uri_policy import Refused, check_bucket, check_file, vetted_addresses

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
MANIFEST_SUFFIXES = frozenset({".txt", ".csv", ".jsonl"})
URI_SCHEMES = frozenset({"file", "s3", "http", "https"})
_MANIFEST_COLUMNS = ("uri", "url", "path", "file")
_ANY_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
S3_LIST_PAGE_SIZE = 1000  # keys per ListObjectsV2 request (the S3 maximum)
HTTP_ATTEMPTS = 3
HTTP_REDIRECTS = frozenset({301, 302, 303, 307, 308})
HTTP_CHUNK = 64 * 1024
# What an image may be served as: image/*, or generic bytes (S3-backed servers and CDNs often say
# application/octet-stream); the decoder then judges the bytes themselves.
BYTES_CONTENT_TYPES = frozenset({"application/octet-stream", "binary/octet-stream"})


class SourceError(Exception):
    """An image that cannot be read; the message is the item's failure reason."""


def _walk_folder(folder: Path) -> Iterator[str]:
    # os.walk streams; sorting each directory keeps runs reproducible without listing everything first.
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(dirpath, name).absolute().as_uri()


@dataclass(frozen=True)
class Entry:
    """One image a source names: its URI, the ground truth a manifest gave for it (``label``, ``boxes``, ``mask``;
    None without any), and why that ground truth is unusable (``problem``), if it is."""

    uri: str
    truth: dict[str, Any] | None = None
    problem: str | None = None


def iter_uris(sources: list[str], settings: Settings | None = None, stdin: IO[str] | None = None) -> Iterator[str]:
    """Yield image URIs from the sources, in order (the database dedupes: a URI is one item per job)."""
    return (entry.uri for entry in iter_entries(sources, settings, stdin))


def iter_entries(sources: list[str], settings: Settings | None = None,
                 stdin: IO[str] | None = None) -> Iterator[Entry]:
    """Yield the sources' images with any ground truth their manifests give, in order."""
    for source in sources:
        parsed = urlparse(source)
        if source == "-":
            yield from _manifest_entries(stdin or sys.stdin, ".txt", Path.cwd())
            continue
        if parsed.scheme == "s3":
            yield from (Entry(uri) for uri in _list_s3(source, settings or Settings()))
            continue
        if parsed.scheme in ("http", "https"):
            yield Entry(source)
            continue
        if parsed.scheme == "file":
            path = _file_uri_path(parsed.path)
        elif parsed.scheme in ("", ) or (len(parsed.scheme) == 1 and os.name == "nt"):
            path = Path(source)
        else:
            raise SourceError(f"unsupported source {source!r}: give a file, a folder or a file:// URI")
        if path.is_dir():
            yield from (Entry(uri) for uri in _walk_folder(path))
        elif path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file():
            with open(path, newline="", encoding="utf-8") as f:
                yield from _manifest_entries(f, path.suffix.lower(), path.parent)
        elif path.exists() or path.is_symlink():
            yield Entry(path.absolute().as_uri())
        else:
            raise SourceError(f"source not found: {source}")


def _manifest_entries(stream: IO[str], suffix: str, base: Path) -> Iterator[Entry]:
    """Entries of a manifest: one per line (.txt, ``#`` comments), per row (.csv: the uri/url/path/file column,
    else the first; label/boxes/mask columns) or per JSON line (.jsonl: a string or an object with one of those
    keys, and label/boxes/mask). A plain path is relative to the manifest's folder (stdin: the current folder)."""
    records: Iterator[dict[str, Any]]
    if suffix == ".csv":
        rows: Iterator[list[str]] = csv.reader(stream)
        header = next(rows, None)
        if header is None:
            return
        names = [h.strip().lower() for h in header]
        column = next((names.index(n) for n in _MANIFEST_COLUMNS if n in names), None)
        if column is None:  # no header: the first row is an entry too
            column, names = 0, []
            rows = _prepend(header, rows)
        truth_columns = {n: names.index(n) for n in TRUTH_FIELDS if n in names}
        records = ({"uri": row[column],
                    **{n: row[i] for n, i in truth_columns.items() if len(row) > i and row[i].strip()}}
                   for row in rows if len(row) > column)
    elif suffix == ".jsonl":
        records = (_jsonl_record(line) for line in stream if line.strip())
    else:
        records = ({"uri": line} for line in stream if not line.lstrip().startswith("#"))
    for record in records:
        value = record.pop("uri").strip()
        if value:
            yield _entry(_entry_uri(value, base), record, base, from_csv=suffix == ".csv")


TRUTH_FIELDS = ("label", "boxes", "mask")


def truth_digest(truth: dict[str, Any] | None) -> int | None:
    """64 bits of the sha256 of the boxes and mask URI (what the localisation metrics depend on; not the label), as
    a signed integer for a BIGINT column; None without either. Equal digests: the same metrics for the same map."""
    region = {k: (truth or {}).get(k) for k in ("boxes", "mask")}
    if region == {"boxes": None, "mask": None}:
        return None
    digest = hashlib.sha256(json.dumps(region, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _entry(uri: str, fields: dict[str, Any], base: Path, from_csv: bool) -> Entry:
    truth = {k: v for k, v in fields.items() if k in TRUTH_FIELDS and v is not None}
    if not truth:
        return Entry(uri)
    try:
        return Entry(uri, _checked_truth(truth, base, from_csv))
    except ValueError as exc:
        return Entry(uri, None, f"bad ground truth: {exc}")


def _checked_truth(truth: dict[str, Any], base: Path, from_csv: bool) -> dict[str, Any]:
    checked: dict[str, Any] = {}
    if "label" in truth:
        label = truth["label"]
        if from_csv and isinstance(label, str) and label.strip().isdigit():
            label = int(label)
        if isinstance(label, bool) or not (isinstance(label, int) and label >= 0
                                           or isinstance(label, str) and label.strip()):
            raise ValueError(f"label must be a class id (integer >= 0) or a class name, not {label!r}")
        checked["label"] = label.strip() if isinstance(label, str) else label
    if "boxes" in truth:
        boxes = truth["boxes"]
        if from_csv:
            try:
                boxes = json.loads(boxes)
            except json.JSONDecodeError:
                raise ValueError(f"boxes must be JSON like [[x0, y0, x1, y1]], not {boxes[:100]!r}") from None
        if not isinstance(boxes, list) or not boxes:
            raise ValueError("boxes must be a non-empty list of [x0, y0, x1, y1]")
        for box in boxes:
            if (not isinstance(box, list) or len(box) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
                raise ValueError(f"a box is [x0, y0, x1, y1] in pixels, not {box!r}")
            if not (box[2] > box[0] and box[3] > box[1] and box[0] >= 0 and box[1] >= 0):
                raise ValueError(f"box {box} is empty or negative: x1 > x0 >= 0 and y1 > y0 >= 0")
        checked["boxes"] = boxes
    if "mask" in truth:
        mask = truth["mask"]
        if not isinstance(mask, str) or not mask.strip():
            raise ValueError(f"mask must be the URI of a PNG, not {mask!r}")
        checked["mask"] = _entry_uri(mask.strip(), base)
    return checked


def _prepend(first: list[str], rows: Iterator[list[str]]) -> Iterator[list[str]]:
    yield first
    yield from rows


def _jsonl_record(line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise SourceError(f"manifest line is not JSON ({exc}): {line[:200]!r}") from None
    if isinstance(record, str):
        return {"uri": record}
    if isinstance(record, dict):
        for key in _MANIFEST_COLUMNS:
            if isinstance(record.get(key), str):
                return {"uri": record[key], **{k: record[k] for k in TRUTH_FIELDS if k in record}}
    raise SourceError(f"manifest line has no uri/url/path/file string: {line[:200]!r}")


def _entry_uri(value: str, base: Path) -> str:
    if urlparse(value).scheme in URI_SCHEMES or _ANY_SCHEME.match(value):  # ftp://... fails as a URI, not a path
        return value
    return (base / value).absolute().as_uri()


def _list_s3(url: str, settings: Settings) -> Iterator[str]:
    """Image objects under an ``s3://bucket/prefix``, page by page (1000 keys a request); a URL whose key
    has an image suffix is that one object."""
    from .s3 import s3_client, split_s3_url

    bucket, prefix = split_s3_url(url)
    try:
        check_bucket(bucket, settings)
    except Refused as exc:
        raise SourceError(f"refused: {exc}") from None
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


def with_command_line_roots(settings: Settings, sources: list[str]) -> Settings:
    """``settings`` whose file roots also hold what a person named on an in-process command's command line:
    each folder, each image file, each manifest's own folder (its relative entries) and, for ``-``, the
    current folder. Anything else a manifest names must lie under SALIENT_FILE_ROOTS."""
    roots = list(settings.file_roots)
    for source in sources:
        parsed = urlparse(source)
        if source == "-":
            roots.append(Path.cwd())
        elif parsed.scheme in ("", "file"):
            path = _file_uri_path(parsed.path) if parsed.scheme == "file" else Path(source)
            is_manifest = path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file()
            roots.append(Path(os.path.realpath(path.parent if is_manifest else path)))
    return settings.model_copy(update={"file_roots": roots})


def allowed_local_path(location: str, settings: Settings) -> Path:
    """The real path of a local file named by a path or ``file://`` URI (a spec's weights, labels or
    TorchScript model), if the file roots allow it; SourceError if not."""
    parsed = urlparse(location)
    try:
        return check_file(_file_uri_path(parsed.path) if parsed.scheme == "file" else Path(location), settings)
    except Refused as exc:
        raise SourceError(f"refused: {exc}") from None


def read_uri(uri: str, max_bytes: int, settings: Settings | None = None, *, expect_image: bool = False) -> bytes:
    """The bytes behind ``uri``, if ``settings`` let this process read it (storage/uri_policy.py).

    A SourceError is the item's own fault (refused, missing, too big, not an image) and fails it; other
    errors (S3 or network down) are transient and left to the caller's retries. ``expect_image``: refuse
    an http(s) response whose Content-Type says it is something else (an HTML error page, JSON).
    """
    settings = settings or Settings()
    parsed = urlparse(uri)
    try:
        if parsed.scheme == "s3":
            return _read_s3(uri, max_bytes, settings)
        if parsed.scheme in ("http", "https"):
            return _read_http(uri, max_bytes, settings, expect_image)
        if parsed.scheme != "file":
            raise SourceError(f"unsupported URI scheme {parsed.scheme!r}")
        return _read_file(_file_uri_path(parsed.path), max_bytes, settings)
    except Refused as exc:
        raise SourceError(f"refused: {exc}") from None


def _read_file(path: Path, max_bytes: int, settings: Settings) -> bytes:
    real = check_file(path, settings)  # before any stat: nothing is told about files outside the roots
    try:
        # O_NOFOLLOW: a symlink swapped in after the check is not followed; O_NONBLOCK: opening a FIFO
        # does not wait for a writer (it is then refused as not a regular file).
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise SourceError("is a directory, not an image file")
            if not stat.S_ISREG(info.st_mode):
                raise SourceError("not a regular file (a pipe, socket or device)")
            if info.st_size > max_bytes:
                raise SourceError(f"file is {info.st_size} bytes, over the limit of {max_bytes}")
        except BaseException:
            os.close(fd)
            raise
        with open(fd, "rb") as f:
            data = f.read(max_bytes + 1)  # the file may have grown since fstat
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
    check_bucket(bucket, settings)
    try:
        response = s3_client(settings).get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code == "NoSuchBucket":
            raise SourceError("bucket not found") from None
        if code in ("NoSuchKey", "404") or status == 404:
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


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to an address checked beforehand, never looking the name up again (a second
    lookup could answer differently: DNS rebinding). The Host header, TLS SNI and the certificate check
    all use the name."""

    def __init__(self, host: str, port: int, address: str, timeout: float, tls: ssl.SSLContext | None):
        super().__init__(host, port, timeout=timeout)
        self.address, self.tls = address, tls
        self.default_port = 443 if tls else 80  # the Host header names the port only when it is not this

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(sock, server_hostname=self.host) if self.tls else sock


class _Redirect(Exception):
    def __init__(self, location: str):
        self.location = location


class _Retryable(Exception):
    """A 5xx answer, a name that did not resolve or a connection that failed: worth another attempt."""


def _read_http(uri: str, max_bytes: int, settings: Settings, expect_image: bool) -> bytes:
    """GET with the address checks and a byte cap; redirects are followed up to ``http_max_redirects``,
    each target checked like the first. An image must arrive whole within ``http_timeout``; any other
    download (weights, a manifest) may take longer but never waits that long for its next bytes.
    5xx and connection errors are retried a few times, then fail the item (a web server is not
    salient's storage: its being down is the image's problem); a timeout is not retried."""
    for hop in range(settings.http_max_redirects + 1):
        for attempt in range(HTTP_ATTEMPTS):
            try:
                return _get_once(uri, max_bytes, settings, expect_image)
            except _Redirect as redirect:
                uri = urljoin(uri, redirect.location)
                break
            except _Retryable as exc:
                if attempt == HTTP_ATTEMPTS - 1:
                    raise SourceError(str(exc)) from None
            except Refused as exc:
                raise Refused(f"redirect {hop}: {exc}" if hop else str(exc)) from None
            time.sleep(0.5 * 2 ** attempt)
    raise SourceError(f"more than {settings.http_max_redirects} redirects (SALIENT_HTTP_MAX_REDIRECTS)")


def _get_once(uri: str, max_bytes: int, settings: Settings, expect_image: bool) -> bytes:
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        raise SourceError(f"redirected to a {parts.scheme or 'scheme-less'} URI, which is not followed")
    if parts.username is not None or parts.password is not None:
        raise SourceError("URLs with a user name or password are not supported")
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise SourceError("the URL's port is not a number from 0 to 65535") from None
    if not host:
        raise SourceError("the URL names no host")
    try:
        host = host.encode("idna").decode("ascii")  # http.client sends the Host header as ASCII
    except UnicodeError:
        raise SourceError("the URL's host name is not a valid international domain name") from None
    deadline = time.monotonic() + settings.http_timeout if expect_image else None
    try:
        addresses = vetted_addresses(host, port, settings)
    except socket.gaierror as exc:
        raise _Retryable(f"cannot resolve {host}: {exc.strerror or exc}") from None
    tls = ssl.create_default_context() if parts.scheme == "https" else None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    failure = "no address"
    for address in addresses:
        try:
            timeout = _time_left(deadline, settings.http_timeout)
            with contextlib.closing(_PinnedConnection(host, port, address, timeout, tls)) as connection:
                connection.request("GET", target, headers={"User-Agent": "salient", "Accept": "image/*, */*;q=0.5"})
                sock = connection.sock  # kept: the response may outlive the connection object's hold on it
                return _body(connection.getresponse(), sock, max_bytes, deadline, settings.http_timeout,
                             expect_image)
        except TimeoutError:
            waited = "no complete answer within" if deadline else "no data for"
            raise SourceError(f"{waited} {settings.http_timeout:g}s (SALIENT_HTTP_TIMEOUT)") from None
        except ssl.SSLError as exc:
            raise SourceError(f"TLS failed: {getattr(exc, 'verify_message', None) or exc.reason or exc}") from None
        except (http.client.HTTPException, OSError) as exc:  # refused, reset, not HTTP: try the next address
            failure = (exc.strerror if isinstance(exc, OSError) else None) or type(exc).__name__
    raise _Retryable(f"cannot fetch: {failure}")


def _time_left(deadline: float | None, idle: float) -> float:
    """Seconds the next network wait may take: ``idle``, cut short by the deadline when there is one."""
    if deadline is None:
        return idle
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return min(left, idle)


def _body(response: http.client.HTTPResponse, sock: socket.socket, max_bytes: int, deadline: float | None,
          idle: float, expect_image: bool) -> bytes:
    """The response's bytes, read in chunks against the cap and the deadline. A Content-Length over the
    cap refuses at once; a missing one changes nothing, and a wrong one cannot make salient read more
    (http.client stops at the length announced; fewer bytes than announced fail)."""
    if response.status in HTTP_REDIRECTS:
        location = response.getheader("Location")
        if not location:
            raise SourceError(f"HTTP {response.status} redirect without a Location")
        raise _Redirect(location)
    if response.status >= 500:
        raise _Retryable(f"HTTP {response.status} {response.reason}")
    if response.status >= 300:
        raise SourceError(f"HTTP {response.status} {response.reason}")
    content_type = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
    if expect_image and content_type and not (content_type.startswith("image/")
                                             or content_type in BYTES_CONTENT_TYPES):
        raise SourceError(f"not an image: the server says Content-Type {content_type[:100]}")
    length = response.getheader("Content-Length", "")
    announced = int(length) if length.strip().isdigit() else None
    if announced is not None and announced > max_bytes:
        raise SourceError(f"response is {announced} bytes, over the limit of {max_bytes}")
    chunks: list[bytes] = []
    received = 0
    while True:
        sock.settimeout(_time_left(deadline, idle))  # a server sending a byte at a time still ends at the deadline
        chunk = response.read1(HTTP_CHUNK)
        if not chunk:
            break
        received += len(chunk)
        if received > max_bytes:
            raise SourceError(f"response is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    if announced is not None and received < announced:
        raise SourceError(f"connection closed after {received} of the {announced} bytes announced")
    if not received:
        raise SourceError("empty response")
    return b"".join(chunks)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a local file (weights, TorchScript models), read a megabyte at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
