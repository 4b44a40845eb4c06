"""Maps rendered on top of the original image."""

from __future__ import annotations

import cv2
import numpy as np


def fit_long_side(rgb: np.ndarray, max_side: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return rgb
    return cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def overlay_png(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.4, colormap: int = cv2.COLORMAP_JET) -> bytes:
    """PNG bytes of ``heat`` (H×W in [0, 1], any size) coloured and blended onto ``rgb``."""
    h, w = rgb.shape[:2]
    heat = cv2.resize(heat.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    colored = cv2.applyColorMap(np.clip(heat * 255, 0, 255).astype(np.uint8), colormap)  # BGR
    blended = cv2.addWeighted(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), 1 - alpha, colored, alpha, 0)
    ok, png = cv2.imencode(".png", blended)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return png.tobytes()
