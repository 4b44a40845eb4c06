"""Turn user sources into a stream of image URIs, and read one URI's bytes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlparse

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


class SourceError(Exception):
    """An image that cannot be read; the message is the item's failure reason."""


def _walk_folder(folder: Path) -> Iterator[str]:
    # os.walk streams; sorting each directory keeps runs reproducible without listing everything first.
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(dirpath, name).absolute().as_uri()


def iter_uris(sources: list[str]) -> Iterator[str]:
    """Yield image URIs from files, folders (recursive) and ``file://`` URIs, in order, deduplicated
    within each folder walk (the database dedupes across sources)."""
    for source in sources:
        parsed = urlparse(source)
        if parsed.scheme == "file":
            path = Path(unquote(parsed.path))
        elif parsed.scheme in ("", ) or (len(parsed.scheme) == 1 and os.name == "nt"):
            path = Path(source)
        else:
            raise SourceError(f"unsupported source {source!r}: give a file, a folder or a file:// URI")
        if path.is_dir():
            yield from _walk_folder(path)
        elif path.exists() or path.is_symlink():
            yield path.absolute().as_uri()
        else:
            raise SourceError(f"source not found: {source}")


def read_uri(uri: str, max_bytes: int) -> bytes:
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise SourceError(f"unsupported URI scheme {parsed.scheme!r}")
    path = Path(unquote(parsed.path))
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise SourceError("is a directory, not an image file")
        if size > max_bytes:
            raise SourceError(f"file is {size} bytes, over the limit of {max_bytes}")
        data = path.read_bytes()
    except FileNotFoundError:
        raise SourceError("file not found (or a broken symlink)") from None
    except PermissionError:
        raise SourceError("permission denied") from None
    if not data:
        raise SourceError("empty file")
    return data
