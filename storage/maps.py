"""Reading results back: a record (a row of ``salient results``: ``shard``, ``slot``, ``method``) in; its map,
arrays, thumbnail or overlay out. Numpy only, except overlays (OpenCV, imported when one is drawn).

    from salient_maps.storage.maps import MapReader
    reader = MapReader.for_settings(Settings())
    for record in iter_results(Settings(), job_id):
        heat = reader.map(record)                    # H×W float32 in [0, 1], the model's input size
        small = reader.map(record, size="layer")     # e.g. 7×7 for Grad-CAM on a ResNet's layer4
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import Mapping
from urllib.parse import unquote

import numpy as np

from .objects import ObjectStore, open_store
from .settings import Settings
from .shards import Shard, localization_mask_name


class MapReader:
    """Reads records' maps from their shards; the last ``keep`` shards stay in memory, since the records
    of one shard (one batch) come one after another."""

    def __init__(self, store: ObjectStore, keep: int = 8):
        self.store = store
        self.keep = keep
        self._shards: OrderedDict[str, Shard] = OrderedDict()
        self._picture: tuple = (None, None)

    @classmethod
    def for_settings(cls, settings: Settings) -> "MapReader":
        return cls(open_store(settings.resolved_object_store_url, settings))

    def shard(self, key: str) -> Shard:
        if key in self._shards:
            self._shards.move_to_end(key)
            return self._shards[key]
        shard = Shard(self.store.get(key))
        self._shards[key] = shard
        if len(self._shards) > self.keep:
            self._shards.popitem(last=False)
        return shard

    def map(self, record: Mapping, size: str = "input") -> np.ndarray:
        """The record's map, float32 in [0, 1]: ``"input"`` at the model's input size (what the method
        returned), ``"layer"`` as stored (the target layer's size for CAM methods)."""
        return _shard_of(self, record).map(record["method"], record["slot"], size)

    def arrays(self, record: Mapping) -> tuple[str, ...]:
        return _shard_of(self, record).arrays(record["method"])

    def array(self, record: Mapping, name: str) -> np.ndarray:
        """A named array of the record: saliency's ``gradient`` (3×H×W) and ``color``/``gray``/``positive``/
        ``negative`` derived from it, Integrated Gradients' ``attribution``, ..."""
        return _shard_of(self, record).array(record["method"], record["slot"], name)

    def thumbnail(self, record: Mapping) -> bytes | None:
        """The image's JPEG thumbnail kept in the shard."""
        shard = _shard_of(self, record)
        return shard.thumbnail(record["slot"] // shard.targets)

    def localization_mask_png(self, record: Mapping) -> bytes:
        """The record's ``--localize`` GrabCut mask: an 8-bit grey PNG (255 object) at the image's own size."""
        png = _shard_of(self, record).localization_mask(record["method"], record["slot"])
        if png is None:
            raise LookupError(f"{record.get('uri', 'this record')} has no localisation mask "
                              "(run with --localize; a map that cannot seed GrabCut gets none)")
        return png

    def overlay_png(self, record: Mapping, style=None, picture: np.ndarray | None = None) -> bytes:
        """The record's overlay as PNG bytes, drawn now onto ``picture`` (H×W×3 RGB, the whole image at any
        size; default the thumbnail) with ``style`` (``storage.overlays.OverlayStyle``; default the plain one),
        the map on the record's ``input_box`` (a centre crop's margin left blank). Needs OpenCV."""
        import cv2

        from .overlays import OverlayStyle, overlay_png

        style = style or OverlayStyle()
        shard = _shard_of(self, record)
        if picture is None:
            picture = self._thumbnail_rgb(record, shard, cv2)
        values = shard.signed(record["method"], record["slot"]) if style.polarity is not None else None
        if values is None:  # at the layer's size: overlay_png resizes it to the picture in one step
            values = shard.map(record["method"], record["slot"], "layer")
        box = record.get("input_box")
        if isinstance(box, str):  # a row of open_results' Arrow table or of an export: JSON text
            box = json.loads(box)
        return overlay_png(picture, values, style, tuple(box) if box else None)


    def _thumbnail_rgb(self, record: Mapping, shard: Shard, cv2) -> np.ndarray:
        """The decoded thumbnail; the last one is kept, since an image's records come together."""
        key = (record["shard"], record["slot"] // shard.targets)
        if self._picture[0] != key:
            jpeg = shard.thumbnail(key[1])
            if jpeg is None:
                raise LookupError("this shard keeps no thumbnail: pass the picture")
            bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
            self._picture = (key, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        return self._picture[1]


def _shard_of(reader: MapReader, record: Mapping) -> Shard:
    if not record.get("shard"):
        raise LookupError(f"{record.get('uri', 'this record')} has no map ({record.get('status')}: "
                          f"{record.get('error') or 'not explained'})")
    return reader.shard(record["shard"])


def read_map(record: Mapping, size: str = "input", settings: Settings | None = None) -> np.ndarray:
    """One record's map (see ``MapReader.map``), from the object store ``settings`` name."""
    return MapReader.for_settings(settings or Settings()).map(record, size)


def picture_of(record: Mapping, settings: Settings, max_side: int, local_files: bool = False) -> np.ndarray | None:
    """The record's original image (RGB, long side at most ``max_side``), or None when it cannot be read
    now (moved, offline, refused): callers fall back to the thumbnail. ``local_files``: a command run by
    the user on this machine may read the job's ``file://`` images whatever ``SALIENT_FILE_ROOTS`` says
    (the service side never passes it). Needs OpenCV."""
    import cv2

    from .overlays import fit_long_side
    from .sources import SourceError, read_uri, with_command_line_roots

    if local_files and record["uri"].startswith("file://"):
        settings = with_command_line_roots(settings, [record["uri"]])
    try:
        data = read_uri(record["uri"], settings.max_image_bytes, settings, expect_image=True)
    except (SourceError, OSError):
        return None
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return None if bgr is None else fit_long_side(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), max_side)


def _folder_name(uri: str) -> str:
    """The image's file name without its suffix, as the user named it (a URI's percent-escapes decoded), never a
    path: separators and leading dots become underscores."""
    name = unquote(uri.rstrip("/").rsplit("/", 1)[-1]).rsplit(".", 1)[0]
    return re.sub(r"^\.+|[/\\\x00]", "_", name) or "image"


def image_folder(uri: str, sha256: str) -> str:
    """The folder of an image's files: ``<image name>-<sha256[:8]>`` (``export_maps``, stored overlays)."""
    return f"{_folder_name(uri)}-{sha256[:8]}"


def export_maps(settings: Settings, records, out: Path, fmt: str = "npy", size: str = "input",
                arrays: bool = False, overlays: bool = False, style=None,
                methods: set[str] | None = None, classes: set[int] | None = None) -> int:
    """Write the chosen records' maps under ``out/<image name>-<sha256[:8]>/<method>/<class id>.<fmt>``
    (``npy``: float32; ``png``: viridis), with ``arrays`` each named array beside it, with ``overlays``
    ``<class id>.overlay.png`` drawn on the original image (the thumbnail when it cannot be read), and
    ``<class id>.localization_mask.png`` where the job ran with ``--localize`` and found a box.
    Returns how many records were written."""
    from .report.charts import heat_png

    if fmt not in ("npy", "png"):
        raise ValueError("map format must be npy or png")
    reader = MapReader.for_settings(settings)
    written = 0
    picture_for: dict[str, np.ndarray | None] = {}  # the one image whose records are being written
    for record in records:
        if not record.get("shard") or (methods and record["method"] not in methods) or \
                (classes and record["class_id"] not in classes):
            continue
        folder = out / image_folder(record["uri"], record["sha256"]) / record["method"]
        folder.mkdir(parents=True, exist_ok=True)
        stem = folder / str(record["class_id"])
        values = {"": reader.map(record, size)}
        if arrays:
            values.update({f".{a}": reader.array(record, a) for a in reader.arrays(record)})
        for suffix, array in values.items():
            if fmt == "npy":
                np.save(f"{stem}{suffix}.npy", array.astype(np.float32), allow_pickle=False)
            elif array.ndim == 2:
                Path(f"{stem}{suffix}.png").write_bytes(heat_png(array))
        if record.get("localization_mask") == localization_mask_name(record["method"], record["slot"]):
            Path(f"{stem}.localization_mask.png").write_bytes(reader.localization_mask_png(record))
        if overlays:
            if record["sha256"] not in picture_for:
                picture_for.clear()  # one image's records come together
                picture_for[record["sha256"]] = picture_of(record, settings, settings.overlay_max_side,
                                                           local_files=True)
            Path(f"{stem}.overlay.png").write_bytes(
                reader.overlay_png(record, style, picture_for[record["sha256"]]))
        written += 1
    return written
