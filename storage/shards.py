"""Result shards: one batch's maps (and thumbnails) in one safetensors object; a row names its shard and slot.

In: named numpy arrays and the shard's description. Out: the bytes of a ``.safetensors`` file, its
content-derived object key, and, on read, any record's map at the layer's or the input's size and the
arrays derived from it. Numpy only (the light side reads shards too).

Why safetensors: a JSON header and raw little-endian tensors, readable from numpy (``safetensors.numpy``),
torch, JAX and Rust without salient, in one request (the header says where every tensor lies), and
nothing in it can run code, unlike pickles or ``.npz``'s object arrays.

A shard of N images with K target classes each holds, per method (``description["methods"]``):
``<method>.layer`` (N·K)×h×w float32: CAM family and Score-CAM, the map in [0, 1] at the target layer's
size (the input-size map is its bilinear upsampling; float32 so that upsampling gives back the map the
method returned); ``<method>.<attribution>`` (N·K)×3×H×W float16: input-gradient methods, the signed
attribution (the map and saliency's renderings are derived from it); ``<method>.map`` (N·K)×H×W float16
(+ ``<method>.<array>``): any other method, stored as it came. Slot ``n·K + k`` is image n's k-th target.
``thumbnail.<n>``: image n as a JPEG (uint8). With ``--localize``, ``<method>.localization_mask.<slot>``: that
record's GrabCut mask as an 8-bit grey PNG (uint8; 255 object) at the image's own size, absent where the map
could not seed GrabCut. ``__metadata__["salient"]`` is the JSON description
(format, input size, the images' sha256, K, per method how its map is stored).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

FORMAT = 1
_DTYPES: dict[np.dtype, str] = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.uint8): "U8",
           np.dtype(np.int32): "I32"}
_NUMPY: dict[str, np.dtype] = {name: dtype for dtype, name in _DTYPES.items()}
# saliency's usual renderings of its raw gradient, derived on read (see ``renderings``)
RENDERINGS = ("color", "gray", "positive", "negative")


def encode(tensors: dict[str, np.ndarray], description: dict) -> bytes:
    """safetensors bytes of ``tensors`` with ``description`` as JSON under ``__metadata__["salient"]``."""
    header: dict = {"__metadata__": {"salient": json.dumps(description, separators=(",", ":"))}}
    offset, parts = 0, []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _DTYPES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        parts.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header so tensors start 8-byte aligned
    return struct.pack("<Q", len(head)) + head + b"".join(parts)


def shard_key(data: bytes) -> str:
    """Content-derived: the same bytes always land on the same key, so a rewrite is a no-op."""
    digest = hashlib.sha256(data).hexdigest()
    return f"shards/{digest[:2]}/{digest}.safetensors"


def localization_mask_name(method: str, slot: int) -> str:
    """The tensor holding a record's ``--localize`` mask PNG (the results' ``localization_mask`` field)."""
    return f"{method}.localization_mask.{slot}"


class ShardError(ValueError):
    pass


@dataclass
class Shard:
    """A decoded shard; tensors are read lazily as views of ``data``."""

    data: bytes
    _header: dict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.data) < 8:
            raise ShardError("not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", self.data[:8])
        try:
            self._header = json.loads(self.data[8:8 + size])
        except ValueError as exc:
            raise ShardError(f"not a safetensors file: {exc}") from None
        self._start = 8 + size

    @cached_property
    def description(self) -> dict:
        try:
            description = json.loads(self._header["__metadata__"]["salient"])
        except (KeyError, TypeError, ValueError):
            raise ShardError("a safetensors file, but not a salient result shard") from None
        if description.get("format") != FORMAT:
            raise ShardError(f"result shard format {description.get('format')} (this salient reads {FORMAT})")
        return description

    def tensor(self, name: str) -> np.ndarray:
        try:
            info = self._header[name]
        except KeyError:
            raise ShardError(f"no tensor {name!r} in this shard") from None
        begin, end = info["data_offsets"]
        dtype = _NUMPY[info["dtype"]].newbyteorder("<")
        return np.frombuffer(self.data, dtype, offset=self._start + begin,
                             count=(end - begin) // dtype.itemsize).reshape(info["shape"])

    def _method(self, method: str) -> dict:
        try:
            return self.description["methods"][method]
        except KeyError:
            raise ShardError(f"no method {method!r} in this shard") from None

    def map(self, method: str, slot: int, size: str = "input") -> np.ndarray:
        """The map of one record, float32 in [0, 1]: at the input's size (``"input"``, the map the method
        returned) or as stored (``"layer"``: the layer's h×w for CAM methods, the input size otherwise)."""
        info = self._method(method)
        if info["map"] == "layer":
            layer = self.tensor(f"{method}.layer")[slot]
            return layer.copy() if size == "layer" else upsample(layer, tuple(self.description["input_size"]))
        if info["map"] == "attribution":
            magnitude = np.abs(self.tensor(f"{method}.{info['attribution']}")[slot].astype(np.float32))
            return scale_to_unit(magnitude.max(axis=0) if info["reduce"] == "max" else magnitude.sum(axis=0))
        return self.tensor(f"{method}.map")[slot].astype(np.float32)

    def arrays(self, method: str) -> tuple[str, ...]:
        """Names ``array`` accepts for this method (e.g. saliency: gradient, color, gray, positive, negative)."""
        info = self._method(method)
        if info["map"] == "attribution":
            return (info["attribution"], *(RENDERINGS if info.get("renderings") else ()))
        return tuple(info.get("arrays", ()))

    def array(self, method: str, slot: int, name: str) -> np.ndarray:
        """A stored array of one record (float32), or one of the renderings derived from it."""
        info = self._method(method)
        if info["map"] == "attribution" and name in RENDERINGS and info.get("renderings"):
            return renderings(self.tensor(f"{method}.{info['attribution']}")[slot].astype(np.float32))[name]
        if name not in self.arrays(method):
            raise ShardError(f"{method} has no array {name!r} (it has: {', '.join(self.arrays(method)) or 'none'})")
        return self.tensor(f"{method}.{name}")[slot].astype(np.float32)

    def signed(self, method: str, slot: int) -> np.ndarray | None:
        """The signed 3×H×W attribution an overlay with a polarity shows, when the method keeps one."""
        info = self._method(method)
        if info["map"] != "attribution":
            return None
        return self.tensor(f"{method}.{info['attribution']}")[slot].astype(np.float32)

    def thumbnail(self, image: int) -> bytes | None:
        name = f"thumbnail.{image}"
        return self.tensor(name).tobytes() if name in self._header else None

    def localization_mask(self, method: str, slot: int) -> bytes | None:
        """The record's ``--localize`` mask as PNG bytes, or None when it has none."""
        name = localization_mask_name(method, slot)
        return self.tensor(name).tobytes() if name in self._header else None

    @property
    def targets(self) -> int:
        return self.description["targets"]


def upsample(layer: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """h×w float map bilinearly resized to ``size`` as ``torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False)`` does (pixel centres aligned; float32; equal to torch's within 5e-7), clipped to [0, 1]."""
    layer = layer.astype(np.float32)

    def taps(n_in: int, n_out: int):
        src = np.float32(n_in / n_out) * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
        src = np.maximum(src, np.float32(0))
        lo = src.astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = (src - lo).astype(np.float32)
        return lo, hi, np.float32(1) - frac, frac

    h0, h1, hw0, hw1 = taps(layer.shape[-2], size[0])
    w0, w1, ww0, ww1 = taps(layer.shape[-1], size[1])
    top, bottom = layer[h0], layer[h1]
    out = (hw0[:, None] * (ww0 * top[:, w0] + ww1 * top[:, w1])
           + hw1[:, None] * (ww0 * bottom[:, w0] + ww1 * bottom[:, w1]))
    return np.clip(out, 0, 1, out=out)


def scale_to_unit(values: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant map becomes zeros (as the methods' own ``scale_to_unit``)."""
    lo, hi = values.min(), values.max()
    if hi <= lo:
        return np.zeros_like(values, dtype=np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


def _unit_by_max(values: np.ndarray) -> np.ndarray:
    peak = values.max()
    return (values / peak).astype(np.float32) if peak > 0 else np.zeros_like(values, dtype=np.float32)


def renderings(gradient: np.ndarray) -> dict[str, np.ndarray]:
    """saliency's pictures of a 3×H×W gradient g (as ``workers.methods.attribution.gradient_renderings``):
    ``color`` g min-max scaled to [0, 1]; ``gray`` Σ_c |g_c| / max; ``positive`` Σ_c max(g_c, 0) / max;
    ``negative`` Σ_c max(−g_c, 0) / max."""
    return {
        "color": scale_to_unit(gradient),
        "gray": _unit_by_max(np.abs(gradient).sum(axis=0)),
        "positive": _unit_by_max(np.maximum(gradient, 0).sum(axis=0)),
        "negative": _unit_by_max(np.maximum(-gradient, 0).sum(axis=0)),
    }
