"""``--overlays store``: a batch's overlay PNGs as files, written in bulk: one tar per shard, beside it.

In: a shard's key and bytes, the batch's records (as ``salient results`` gives them: ``shard``, ``slot``,
``method``, ``class_id``, ``uri``, ``sha256``), the pictures they are drawn on and the job's overlay style.
Out: the tar's bytes, holding ``<image>-<sha256[:8]>/<method>/<class id>.png`` (the layout ``salient maps
--overlays`` writes), each the very PNG ``MapReader.overlay_png`` draws for that record on that picture (the
reader's own code draws them, from the shard's stored values); its key ``overlays/<ab>/<digest>.tar``, the
shard's own digest, so a record's archive is found from its ``shard`` field and goes when the shard goes.

Why one tar per batch: the same number of PUTs as shards (not one per image and class, the cost at scale
the shards remove), written after the shard by the same writer, off the model's path; any tool unpacks it
(``tar xf``) and a reader can take one member without salient. Loose files in a folder of one's choice come
from ``salient maps --overlays`` instead.
"""

from __future__ import annotations

import io
import tarfile
from typing import Iterable, Mapping

import numpy as np

from .maps import MapReader, image_folder

SHARDS, OVERLAYS = "shards/", "overlays/"


def archive_key(shard_key: str) -> str:
    """``shards/ab/<digest>.safetensors`` -> ``overlays/ab/<digest>.tar``."""
    return OVERLAYS + shard_key.removeprefix(SHARDS).removesuffix(".safetensors") + ".tar"


def shard_of_archive(key: str) -> str:
    return SHARDS + key.removeprefix(OVERLAYS).removesuffix(".tar") + ".safetensors"


def member_name(record: Mapping) -> str:
    return f"{image_folder(record['uri'], record['sha256'])}/{record['method']}/{record['class_id']}.png"


class _JustWritten:
    """The store a reader sees while the batch is being written: its one shard."""

    def __init__(self, key: str, data: bytes):
        self.key, self.data = key, data

    def get(self, key: str) -> bytes:
        if key != self.key:
            raise KeyError(key)
        return self.data


def overlay_archive(shard_key: str, data: bytes, records: Iterable[Mapping], pictures: Mapping[str, np.ndarray],
                    style) -> bytes:
    """A tar of every record's overlay drawn on ``pictures[record["sha256"]]`` (H×W×3 RGB) in ``style``.
    Members carry no time or owner, so the same batch gives the same bytes."""
    reader = MapReader(_JustWritten(shard_key, data))  # type: ignore[arg-type]  # a reader only gets
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for record in records:
            png = reader.overlay_png(record, style, pictures[record["sha256"]])
            info = tarfile.TarInfo(member_name(record))
            info.size, info.mode = len(png), 0o644
            tar.addfile(info, io.BytesIO(png))
    return buffer.getvalue()

