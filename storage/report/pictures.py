"""The report's pictures: a record (``sha256``, ``method``, ``class_id``, ``shard``, ``slot``) in; its thumbnail
and overlay drawn from its shard into ``pictures/`` (overlays need OpenCV; without it the gallery shows thumbnails
only) and a relative address out, plus links to a local store's shards (the raw maps).

Only a bounded set of images is drawn (the report's first pages, each sort's first page, the audit's suspects):
a picture costs a shard read and a PNG encode (about a millisecond each), which fits thousands of images in a
report's time, not 10^6. File names come from the image's sha256 (checked to be hex) and the method's number,
never from text in the database.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import quote

from salient_maps.storage.maps import MapReader
from salient_maps.storage.objects import LocalObjectStore, ObjectStore

_HEX = re.compile(r"[0-9a-f]{24}")


class Pictures:
    def __init__(self, store: ObjectStore, out_dir: Path, methods: list[str], style: dict | None, copy: bool):
        self.reader = MapReader(store)
        self.folder = out_dir / "pictures"
        self.folder.mkdir(exist_ok=True)
        self.method_index = {m: i for i, m in enumerate(methods)}
        self.link_shards = isinstance(store, LocalObjectStore) and not copy
        if isinstance(store, LocalObjectStore) and not copy:
            self.root_from_report = Path(os.path.relpath(store.root.resolve(), out_dir.resolve())).as_posix()
        self.default_style = style
        self.styles: dict[str, object] = {}
        try:
            import cv2  # noqa: F401
            self.can_draw = True
        except ModuleNotFoundError:
            self.can_draw = False

    @staticmethod
    def name(record: dict) -> str | None:
        """The image's picture name (its sha256's first 24 hex digits), or None for a malformed sha256."""
        prefix = (record.get("sha256") or "")[:24]
        return prefix if _HEX.fullmatch(prefix) else None

    def _safely(self, name: str, render) -> str | None:
        target = self.folder / name
        if not target.exists():
            try:
                data = render()
            except Exception:  # a missing or unreadable shard: the page shows a gap, not a crash
                return None
            if data is None:
                return None
            target.write_bytes(data)
        return quote(f"pictures/{name}")

    def thumbnail(self, record: dict) -> str | None:
        name = self.name(record)
        return None if name is None else self._safely(f"{name}.jpg", lambda: self.reader.thumbnail(record))

    def overlay(self, record: dict, style: dict | None = None) -> str | None:
        name, method = self.name(record), self.method_index.get(record["method"])
        if not self.can_draw or name is None or method is None:
            return None
        from salient_maps.storage.overlays import OverlayStyle

        style = style if style is not None else self.default_style
        key = json.dumps(style or {}, sort_keys=True)
        if key not in self.styles:
            self.styles[key] = OverlayStyle(**(style or {}))
        return self._safely(f"{name}-{method}-{int(record['class_id'])}.png",
                            lambda: self.reader.overlay_png(record, self.styles[key]))

    def shard(self, key: str | None) -> str | None:
        if not key or not self.link_shards or ".." in key.split("/"):
            return None
        return quote(f"{self.root_from_report}/{key}")
