"""Weakly supervised localisation (Simonyan et al. 2014, section 3.2): a saliency map seeds GrabCut,
and the largest foreground blob gives the object's bounding box."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from salient_maps.storage.overlays import fit_long_side

# GrabCut runs at this long side at most: its cost grows with the pixel count, a box needs no more.
WORK_SIDE = 256
SURE_FOREGROUND_PERCENTILE = 95  # map at or above it: sure foreground
SURE_BACKGROUND_PERCENTILE = 30  # map at or below it: sure background; between: probably background
GRABCUT_ITERATIONS = 5
PARAMS = {"work_side": WORK_SIDE, "foreground": SURE_FOREGROUND_PERCENTILE,
          "background": SURE_BACKGROUND_PERCENTILE, "iterations": GRABCUT_ITERATIONS}


@dataclass
class Localization:
    """``bbox`` (x0, y0, x1, y1) in the original image's pixels, x1 and y1 exclusive, around the largest
    connected foreground component; ``mask`` H×W bool at the original size, all of GrabCut's foreground."""

    bbox: tuple[int, int, int, int]
    mask: np.ndarray


def localize(rgb: np.ndarray, heat: np.ndarray,
             box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)) -> Localization | None:
    """Segment ``rgb`` (H×W×3 uint8, the original image) seeded by ``heat`` (h×w map, any size, e.g. the model's
    input size) of the part ``box`` of the image (x0, y0, x1, y1 in fractions of its sides: all of it, or a
    model's centre crop; the margin outside it, which the model never saw, is probably background). None when
    the map cannot seed GrabCut (e.g. a constant map).

    Seeds, with percentiles taken over the map at the working size: at or above the 95th sure
    foreground, at or below the 30th sure background, the rest probably background, so the
    foreground model starts from the peak and GrabCut grows it only over pixels that look alike.
    """
    small = np.ascontiguousarray(fit_long_side(rgb, WORK_SIDE))
    height, width = small.shape[:2]
    left, top = min(int(round(box[0] * width)), width - 1), min(int(round(box[1] * height)), height - 1)
    right, bottom = max(int(round(box[2] * width)), left + 1), max(int(round(box[3] * height)), top + 1)
    heat = cv2.resize(heat.astype(np.float32), (right - left, bottom - top), interpolation=cv2.INTER_LINEAR)
    high, low = np.percentile(heat, [SURE_FOREGROUND_PERCENTILE, SURE_BACKGROUND_PERCENTILE])
    if not high > low:
        return None
    seeds = np.full((height, width), cv2.GC_PR_BGD, np.uint8)
    inside = seeds[top:bottom, left:right]
    inside[heat >= high] = cv2.GC_FGD
    inside[heat <= low] = cv2.GC_BGD
    cv2.setRNGSeed(0)  # GrabCut's k-means draws from OpenCV's per-thread generator: same input, same box
    background_model, foreground_model = np.zeros((1, 65)), np.zeros((1, 65))
    # OpenCV's stubs want a rectangle, which GC_INIT_WITH_MASK ignores (None is what its documentation passes)
    cv2.grabCut(small, seeds, None, background_model, foreground_model,  # type: ignore[call-overload]
                GRABCUT_ITERATIONS, cv2.GC_INIT_WITH_MASK)
    foreground = ((seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)).astype(np.uint8)
    count, _labels, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
    if count < 2:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(v) for v in stats[largest, :4])
    full_h, full_w = rgb.shape[:2]
    sx, sy = full_w / width, full_h / height
    bbox = (int(np.floor(x * sx)), int(np.floor(y * sy)),
            min(full_w, int(np.ceil((x + w) * sx))), min(full_h, int(np.ceil((y + h) * sy))))
    mask = cv2.resize(foreground, (full_w, full_h), interpolation=cv2.INTER_NEAREST).astype(bool)
    return Localization(bbox=bbox, mask=mask)


def mask_png(mask: np.ndarray) -> bytes:
    """An H×W bool mask as an 8-bit grey PNG: 255 foreground, 0 background."""
    ok, png = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return png.tobytes()
