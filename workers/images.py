"""Bytes to RGB pixels to model input, with every way an image can be bad named in the error."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
import torch
from PIL import Image as PILImage
from PIL import ImageOps

from salient_maps.storage.input_crop import CROP_MODES, INTERPOLATIONS, crop_offset, input_box, resized_size
from salient_maps.storage.sources import SourceError

from .localization_metrics import InputFrame

PILImage.MAX_IMAGE_PIXELS = None  # salient applies its own limit before decoding
# A bad image is a failed item with its reason in the database; OpenCV's own log lines would only flood stderr.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_FATAL)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk type and its (fixed) CRC
_JPEG_START_OF_SCAN, _JPEG_END = b"\xff\xda", b"\xff\xd9"


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


@dataclass
class Decoded:
    """A decoded picture and the size of the image it came from (EXIF orientation applied to both)."""

    rgb: np.ndarray  # H×W×3 uint8; a JPEG may come out scaled by M/8 (``jpeg_eighths``)
    width: int
    height: int


def jpeg_eighths(width: int, height: int, short_side: int, long_side: int | None) -> int:
    """The smallest libjpeg-turbo scale M/8 (M = 1..8) that keeps the picture's short side >= ``short_side``
    (the model input, never enlarged) and its long side >= ``long_side`` (None: the full size is needed)."""
    if long_side is None:
        return 8
    short, long = min(width, height), max(width, height)
    for m in range(1, 8):
        if -(-short * m // 8) >= short_side and -(-long * m // 8) >= long_side:  # libjpeg rounds up
            return m
    return 8


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """RGB uint8 H×W×3 with EXIF orientation applied; 16-bit, grayscale, palette, CMYK and alpha become
    8-bit RGB (alpha dropped, 16-bit scaled by 1/256); animated and multi-page files give their first frame."""
    return decode_scaled(data, max_pixels).rgb


def decode_scaled(data: bytes, max_pixels: int, short_side: int = 0, long_side: int | None = None) -> Decoded:
    """``decode_image``, but a JPEG is decoded only as large as ``jpeg_eighths`` allows."""
    check_complete(data)
    width, height, fmt, orientation = _header(data, max_pixels)
    rgb = _decode_jpeg(data, width, height, short_side, long_side, orientation) if fmt == "JPEG" else None
    if rgb is None:
        rgb = _decode_with_opencv(data)  # whole, turned as OpenCV reads the EXIF orientation
        turned = (rgb.shape[0], rgb.shape[1]) != (height, width)
    else:
        turned = orientation in _TURNS
    if rgb.shape[0] * rgb.shape[1] > max_pixels:  # a decoder that disagrees with the header
        raise SourceError(f"decoded image has {rgb.shape[0] * rgb.shape[1]} pixels, over the limit of {max_pixels}")
    return Decoded(rgb, *((height, width) if turned else (width, height)))


def _header(data: bytes, max_pixels: int) -> tuple[int, int, str, int]:
    """(width, height, format, EXIF orientation) as stored; orientation 0: not a plain RGB or grey JPEG.
    An image over ``max_pixels`` is refused here, before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with PILImage.open(io.BytesIO(data)) as im:
                width, height, fmt, orientation = im.width, im.height, im.format or "?", 0
                # Only a JPEG's: its EXIF block is in the header, where a PNG's getexif decodes every pixel.
                if fmt == "JPEG" and im.mode in ("RGB", "L"):
                    try:
                        orientation = int(im.getexif().get(0x0112, 1))
                    except Exception:  # a damaged EXIF block: OpenCV reads what it can of it
                        pass
    except Exception:
        raise SourceError("not an image (unrecognised, corrupt or truncated header)") from None
    if width * height > max_pixels:
        raise SourceError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    return width, height, fmt, orientation


# EXIF orientations 1-8 as NumPy views of the stored pixels (as PIL's ImageOps.exif_transpose turns them);
# those in _TURNS swap width and height.
_ORIENTED = {
    1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2), 6: lambda a: a.transpose(1, 0, 2)[:, ::-1],
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1], 8: lambda a: a.transpose(1, 0, 2)[::-1],
}
_TURNS = (5, 6, 7, 8)


def _decode_jpeg(data: bytes, width: int, height: int, short_side: int, long_side: int | None,
                 orientation: int) -> np.ndarray | None:
    """A plain JPEG by libjpeg-turbo (simplejpeg), scaled by M/8 in its inverse DCT; None for anything it
    refuses (CMYK, odd orientation tags, damaged data: libjpeg's warnings are errors here), which goes to
    OpenCV. A 640×480 JPEG of bench/throughput.py for a 256 px resize and 224 crop: 4.3 ms decoded at 5/8 and
    cropped, against 6.3 decoded whole by OpenCV (one thread). The scaled inverse DCT itself is slower than
    the whole one (2.7 against 1.8 ms): the time is won by the resize reading 400×300 pixels, not 640×480."""
    if orientation not in _ORIENTED:
        return None
    m = jpeg_eighths(width, height, short_side, long_side)
    try:
        rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=-(-width * m // 8),
                                     min_height=-(-height * m // 8))
    except ValueError:
        return None
    return rgb if orientation == 1 else np.ascontiguousarray(_ORIENTED[orientation](rgb))


def _decode_with_opencv(data: bytes) -> np.ndarray:
    # IMREAD_COLOR applies EXIF orientation and scales 16-bit to 8-bit.
    try:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        bgr = None
    return _decode_with_pillow(data) if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _decode_with_pillow(data: bytes) -> np.ndarray:
    # OpenCV gives up on some valid files; Pillow reads the first frame. Same conventions as the OpenCV path.
    try:
        with PILImage.open(io.BytesIO(data)) as opened:
            opened.seek(0)
            im = ImageOps.exif_transpose(opened)
            if im.mode.startswith("I;16"):  # 16-bit grey: Pillow's convert would clip, not scale
                grey = (np.asarray(im).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            return np.asarray(im.convert("RGB"))
    except Exception as exc:
        raise SourceError(f"could not decode image (corrupt or truncated): {exc}") from None


# ``area`` (INTERPOLATIONS): salient's own filter, area averaging when shrinking (antialiased, as PIL's filters)
# and bilinear when enlarging (OpenCV). ``bilinear`` and ``bicubic``: PIL's antialiased filters, which
# torchvision's and timm's eval transforms apply (torchvision's tensor Resize reproduces them with antialias).
_PIL_FILTERS = {"bilinear": PILImage.Resampling.BILINEAR, "bicubic": PILImage.Resampling.BICUBIC}


@dataclass(frozen=True)
class Resizing:
    """How a picture becomes the model's ``size``×``size`` input: ``crop`` (storage/input_crop.py: ``whole``,
    or ``center``/``squash`` after a resize to ``resize``) and ``interpolation`` (``INTERPOLATIONS``)."""

    size: int = 224
    crop: str = "whole"
    resize: int | None = None
    interpolation: str = "area"

    def __post_init__(self) -> None:
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {', '.join(CROP_MODES)}, not {self.crop!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, not {self.interpolation!r}")
        if (self.crop == "whole") != (self.resize is None):
            raise ValueError("a resize side goes with a center or squash crop, and only with one")
        if self.resize is not None and self.resize < self.size:
            raise ValueError(f"resize {self.resize} is smaller than the {self.size} px crop")

    @property
    def decode_side(self) -> int:
        """The short side a decoded picture must keep so that nothing is enlarged that the resize shrinks."""
        return self.resize or self.size

    def frame(self, width: int, height: int) -> InputFrame:
        """Where a ``width``×``height`` image's pixels land in the model's input (for the localisation metrics)."""
        resized = resized_size(self.crop, self.resize, self.size, width, height)
        return InputFrame(width, height, resized, (self.size, self.size), crop_offset(resized, self.size))

    def box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The part of a ``width``×``height`` image the input shows, in fractions of its sides."""
        return input_box(self.params(), width, height)

    def params(self) -> dict:
        return {"input_size": self.size, "crop": self.crop, "resize": self.resize,
                "interpolation": self.interpolation}


def to_input(rgb: np.ndarray, resizing: Resizing | int, mean, std,
             original: tuple[int, int] | None = None) -> torch.Tensor:
    """float32 3×size×size, normalised, made as ``resizing`` says (an int: the whole image to that size, area
    filter). ``original``: the (width, height) of the image ``rgb`` was decoded from, when a JPEG was decoded
    reduced: the crop is taken at the same place of the image whatever the picture's own size."""
    r = resizing if isinstance(resizing, Resizing) else Resizing(resizing)
    size = r.size
    if r.crop == "whole" and r.interpolation == "area":
        interp = cv2.INTER_AREA if min(rgb.shape[:2]) > size else cv2.INTER_LINEAR
        resized = cv2.resize(rgb, (size, size), interpolation=interp)
    else:
        resized = _cropped(rgb, r, *(original or (rgb.shape[1], rgb.shape[0])))
    # NumPy, not torch: this runs on the decode threads, where torch's parallel ops cost ~5x the CPU
    # (6.4 against 1.2 ms per 224 px image here) and start thread teams that compete with the model's.
    # The result is channels last (3×size×size strided as size×size×3), the layout the engine's convolutions
    # take: ``stack_inputs`` then makes a batch without transposing it (2.3 against 7.5 ms per 32 images).
    # Scale and shift are tiled along a pixel row, so NumPy's inner loop runs over the row's 3×size
    # contiguous values: 0.14 ms, where broadcasting over the last axis of 3 took 0.64.
    std_ = np.asarray(std, np.float32)
    height, width = resized.shape[:2]
    x = resized.reshape(height, width * 3).astype(np.float32)
    x *= np.tile(np.float32(1 / 255) / std_, width)
    x -= np.tile(np.asarray(mean, np.float32) / std_, width)
    return torch.from_numpy(x.reshape(height, width, 3)).permute(2, 0, 1)


def stack_inputs(xs: list[torch.Tensor]) -> torch.Tensor:
    """B×3×H×W batch of model inputs, channels last when they all are (as ``to_input`` makes them)."""
    if all(x.permute(1, 2, 0).is_contiguous() for x in xs):
        return torch.stack([x.permute(1, 2, 0) for x in xs]).permute(0, 3, 1, 2)
    return torch.stack(xs)


def _cropped(rgb: np.ndarray, r: Resizing, width: int, height: int) -> np.ndarray:
    """The crop's pixels at size×size. PIL resizes only the box the crop keeps, with the filter's support
    reaching past the box as in a full resize: the same pixels as resizing all of it, then cropping."""
    resized = resized_size(r.crop, r.resize, r.size, width, height)
    left, top = crop_offset(resized, r.size)
    sx, sy = rgb.shape[1] / resized[0], rgb.shape[0] / resized[1]
    box = (left * sx, top * sy, (left + r.size) * sx, (top + r.size) * sy)
    if r.interpolation == "area":
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        cut = rgb[y0:y1, x0:x1]
        interp = cv2.INTER_AREA if min(cut.shape[:2]) > r.size else cv2.INTER_LINEAR
        return cv2.resize(cut, (r.size, r.size), interpolation=interp)
    target, resample = (r.size, r.size), _PIL_FILTERS[r.interpolation]
    if rgb.dtype == np.uint8:
        return np.asarray(PILImage.fromarray(np.ascontiguousarray(rgb)).resize(target, resample, box))
    # float pixels (0-255): PIL filters 32-bit float images one channel at a time
    return np.stack([np.asarray(PILImage.fromarray(np.ascontiguousarray(rgb[..., c], np.float32)).resize(
        target, resample, box)) for c in range(3)], axis=2)


def device_decodable(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) of a JPEG that nvJPEG can decode as salient would (RGB or grey, no EXIF turn: nvJPEG
    does not apply the orientation); None for any other image. Bad files fail here, as in ``decode_scaled``."""
    check_complete(data)
    width, height, _, orientation = _header(data, max_pixels)
    return (width, height) if orientation == 1 else None


def decode_jpegs_on_device(jpegs: list[bytes], device: torch.device, resizing: Resizing | int, mean, std,
                           picture_side: int | None) -> list[tuple[torch.Tensor, np.ndarray]]:
    """One batched nvJPEG call (on a CUDA ``device``; libjpeg elsewhere), resized on the device. Per image:
    the model input (float32 3×size×size on ``device``, normalised, made as ``resizing`` says; an int: the whole
    image) and the host picture (RGB uint8, long side fit to ``picture_side``; None: full size). Raises when any
    image fails: decode those one by one on the CPU.

    The whole-image ``area`` resize is antialiased bicubic, the nearest of torch's filters to OpenCV's INTER_AREA
    on the CPU path (mean 0.5-0.8, 99th percentile 2.5-6 of 255 levels on photos, 640×480 to 224). Bilinear and
    bicubic crops are torch's antialiased filters in PIL's two 8-bit passes, only over the rows and columns the crop
    keeps: torchvision's Resize + CenterCrop of a uint8 image (and PIL's filters on the CPU path) within a level."""
    from torchvision.io import ImageReadMode, decode_jpeg

    r = resizing if isinstance(resizing, Resizing) else Resizing(resizing)
    size = r.size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's notice that its decoders move to TorchCodec
        decoded = decode_jpeg([torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs],
                              mode=ImageReadMode.RGB, device=device)
    mean_ = torch.tensor(mean, device=device).view(3, 1, 1)
    std_ = torch.tensor(std, device=device).view(3, 1, 1)
    out = []
    for chw in decoded:
        pixels = chw[None].float()
        height, width = chw.shape[1:]
        if r.crop == "whole" and r.interpolation == "area":
            x = _resize(pixels, size, size, upsample=min(height, width) <= size)
        else:
            resized = resized_size(r.crop, r.resize, size, width, height)
            left, top = crop_offset(resized, size)
            x = _filtered(_filtered(pixels, height, resized[0], r.interpolation)[..., left:left + size],
                          resized[1], size, r.interpolation)[..., top:top + size, :]
        x = x.div_(255).squeeze(0).sub_(mean_).div_(std_)
        scale = 1.0 if picture_side is None else min(1.0, picture_side / max(height, width))
        picture = chw[None] if scale == 1.0 else _resize(
            pixels, max(1, round(height * scale)), max(1, round(width * scale))).round_().clamp_(0, 255).byte()
        out.append((x, picture[0].permute(1, 2, 0).cpu().numpy()))
    return out


def _filtered(pixels: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    # One pass of PIL's separable resize (rows first, then columns), rounded to 8 bits after each as PIL and
    # torchvision's uint8 kernel do: bicubic overshoots would otherwise differ by up to 5 levels.
    return torch.nn.functional.interpolate(pixels, (height, width), mode=mode, antialias=True,
                                           align_corners=False).round_().clamp_(0, 255)


def _resize(pixels: torch.Tensor, height: int, width: int, upsample: bool = False) -> torch.Tensor:
    # As ``to_input``: bilinear (OpenCV's INTER_LINEAR convention) when the image is not larger than the input.
    return torch.nn.functional.interpolate(pixels, (height, width), mode="bilinear" if upsample else "bicubic",
                                           antialias=not upsample, align_corners=False)
