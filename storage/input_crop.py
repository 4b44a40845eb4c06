"""Where the model's input lies in the original image: a result's preprocessing (``crop``, ``resize``,
``input_size``) and the image's width and height in; the resized image's size, the crop's offset in it, and
the input's box in the original image out. Numbers only: the workers cut pixels with them
(workers/images.py), readers place maps on pictures with them (storage/maps.py), and the localisation metrics
weigh map cells with them (workers/localization_metrics.py ``InputFrame``).

The crops are those of torchvision's and timm's eval transforms, to the pixel:
- ``whole``: the whole image to size×size, aspect not kept, nothing cut (salient's own default).
- ``center``: the short side to ``resize`` (the long side ``int(resize * long / short)``, as
  ``torchvision.transforms.Resize(resize)``), then a centre size×size crop at ``round((side - size) / 2)``
  (``CenterCrop``). timm's ``crop_mode="center"``; torchvision's weight transforms (resize 256, crop 224).
- ``squash``: both sides to ``resize``, then the centre crop (timm's ``crop_mode="squash"``).
"""

from __future__ import annotations

from typing import Mapping

CROP_MODES = ("whole", "center", "squash")
# The filters workers/images.py resizes with: ``area`` (salient's own: area-averaged down, bilinear up), and the
# antialiased ``bilinear`` and ``bicubic`` of torchvision's and timm's transforms.
INTERPOLATIONS = ("area", "bilinear", "bicubic")


def resized_size(crop: str, resize: int | None, size: int, width: int, height: int) -> tuple[int, int]:
    """(w, h) of the image after the resize, before the crop."""
    if crop == "whole":
        return size, size
    if crop not in CROP_MODES or resize is None:
        raise ValueError(f"crop must be one of {', '.join(CROP_MODES)}, not {crop!r}, and center or squash need "
                         "a resize side")
    if crop == "squash":
        return resize, resize
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def crop_offset(resized: tuple[int, int], size: int) -> tuple[int, int]:
    """(left, top) of the centre size×size crop in the resized image, as ``CenterCrop`` rounds it."""
    return int(round((resized[0] - size) / 2.0)), int(round((resized[1] - size) / 2.0))


def input_box(preprocessing: Mapping | None, width: int, height: int) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1): the part of the original image the model saw, in fractions of its width and height
    ((0, 0, 1, 1) for a whole-image resize, and for results made before crops were recorded)."""
    crop = (preprocessing or {}).get("crop", "whole")
    if preprocessing is None or crop == "whole":
        return 0.0, 0.0, 1.0, 1.0
    size = preprocessing["input_size"]
    resized = resized_size(crop, preprocessing["resize"], size, width, height)
    left, top = crop_offset(resized, size)
    return left / resized[0], top / resized[1], (left + size) / resized[0], (top + size) / resized[1]
