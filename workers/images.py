"""Bytes to RGB pixels to model input, with every way an image can be bad named in the error."""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
import torch
from PIL import Image as PILImage
from PIL import ImageOps

from salient_maps.storage.sources import SourceError

PILImage.MAX_IMAGE_PIXELS = None  # salient applies its own limit before decoding
# A bad image is a failed item with its reason in the database; OpenCV's own log lines would only flood stderr.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_FATAL)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk type and its (fixed) CRC
_JPEG_START_OF_SCAN, _JPEG_END = b"\xff\xda", b"\xff\xd9"


def probe_size(data: bytes) -> tuple[int, int, str]:
    """(width, height, format) from the header alone, without decoding pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with PILImage.open(io.BytesIO(data)) as im:
                return im.width, im.height, im.format or "?"
    except Exception:
        raise SourceError("not an image (unrecognised, corrupt or truncated header)") from None


def check_complete(data: bytes) -> None:
    """Refuse a file cut short: decoders fill a truncated JPEG's missing rows with grey instead of failing,
    so each format must end with its end marker (trailing bytes after it are allowed, as cameras pad)."""
    if data.startswith(b"\xff\xd8"):
        end = data.rfind(_JPEG_END)
        if end < 0 or end < data.rfind(_JPEG_START_OF_SCAN):
            raise SourceError("truncated JPEG (no end-of-image marker after the image data)")
    elif data.startswith(_PNG_SIGNATURE):
        if _PNG_END not in data:
            raise SourceError("truncated PNG (no IEND chunk)")
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        declared = int.from_bytes(data[4:8], "little") + 8
        if len(data) < declared:
            raise SourceError(f"truncated WebP ({len(data)} of the {declared} bytes its header declares)")


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """RGB uint8 H×W×3 with EXIF orientation applied; 16-bit, grayscale, palette, CMYK and alpha become
    8-bit RGB (alpha dropped, 16-bit scaled by 1/256); animated and multi-page files give their first frame."""
    check_complete(data)
    width, height, _fmt = probe_size(data)
    if width * height > max_pixels:
        raise SourceError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    # IMREAD_COLOR applies EXIF orientation and scales 16-bit to 8-bit.
    try:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        bgr = None
    rgb = _decode_with_pillow(data) if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if rgb.shape[0] * rgb.shape[1] > max_pixels:
        raise SourceError(f"decoded image has {rgb.shape[0] * rgb.shape[1]} pixels, over the limit of {max_pixels}")
    return rgb


def _decode_with_pillow(data: bytes) -> np.ndarray:
    # OpenCV gives up on some valid files; Pillow reads the first frame. Same conventions as the OpenCV path.
    try:
        with PILImage.open(io.BytesIO(data)) as im:
            im.seek(0)
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I;16"):  # 16-bit grey: Pillow's convert would clip, not scale
                grey = (np.asarray(im).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            return np.asarray(im.convert("RGB"))
    except Exception as exc:
        raise SourceError(f"could not decode image (corrupt or truncated): {exc}") from None


def to_input(rgb: np.ndarray, size: int, mean, std) -> torch.Tensor:
    """Whole image resized (no crop) so the map covers all of it: float32 3×size×size, normalised."""
    interp = cv2.INTER_AREA if min(rgb.shape[:2]) > size else cv2.INTER_LINEAR
    resized = cv2.resize(rgb, (size, size), interpolation=interp)
    x = torch.from_numpy(resized).permute(2, 0, 1).float().div_(255)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
