"""Bytes to RGB pixels to model input, with every way an image can be bad named in the error."""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
import torch
from PIL import Image as PILImage

from storage.sources import SourceError

PILImage.MAX_IMAGE_PIXELS = None  # salient applies its own limit before decoding


def probe_size(data: bytes) -> tuple[int, int, str]:
    """(width, height, format) from the header alone, without decoding pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with PILImage.open(io.BytesIO(data)) as im:
                return im.width, im.height, im.format or "?"
    except Exception:
        raise SourceError("not an image (unrecognised or corrupt header)") from None


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """RGB uint8 H×W×3 with EXIF orientation applied; 16-bit, grayscale, palette and alpha become 8-bit RGB."""
    width, height, fmt = probe_size(data)
    if width * height > max_pixels:
        raise SourceError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    if fmt == "JPEG" and b"\xff\xd9" not in data[-4096:]:
        # libjpeg decodes a truncated file into a half-grey image without failing.
        raise SourceError("truncated JPEG (no end-of-image marker)")
    # IMREAD_COLOR applies EXIF orientation and scales 16-bit to 8-bit.
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        rgb = _decode_with_pillow(data)
    else:
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if rgb.shape[0] * rgb.shape[1] > max_pixels:
        raise SourceError(f"decoded image has {rgb.shape[0] * rgb.shape[1]} pixels, over the limit of {max_pixels}")
    return rgb


def _decode_with_pillow(data: bytes) -> np.ndarray:
    # OpenCV gives up on some valid files (animated GIF, some palette/CMYK variants); Pillow reads the first frame.
    try:
        with PILImage.open(io.BytesIO(data)) as im:
            im.seek(0)
            return np.asarray(im.convert("RGB"))
    except Exception as exc:
        raise SourceError(f"could not decode image (corrupt or truncated): {exc}") from None


def to_input(rgb: np.ndarray, size: int, mean, std) -> torch.Tensor:
    """Whole image resized (no crop) so the map covers all of it: float32 3×size×size, normalised."""
    interp = cv2.INTER_AREA if min(rgb.shape[:2]) > size else cv2.INTER_LINEAR
    resized = cv2.resize(rgb, (size, size), interpolation=interp)
    x = torch.from_numpy(resized).permute(2, 0, 1).float().div_(255)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
