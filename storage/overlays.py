"""Maps rendered on top of an image (OpenCV: the worker extra), with the visualisation knobs users know from
Vertex AI and pytorch-grad-cam: colour map, alpha, polarity, clip percentiles and overlay type."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import cv2
import numpy as np

POLARITIES = ("positive", "negative", "both")
OVERLAY_TYPES = ("original", "grayscale", "mask-black", "none")


def colormap_names() -> list[str]:
    """Every OpenCV colour map, by the lower-case name after ``COLORMAP_`` (jet, viridis, turbo, ...)."""
    return sorted(name.removeprefix("COLORMAP_").lower() for name in dir(cv2) if name.startswith("COLORMAP_"))


@dataclass(frozen=True)
class OverlayStyle:
    """How a map becomes an overlay PNG.

    ``polarity`` None renders the method's map (already in [0, 1]); positive/negative/both render the
    method's signed attribution array instead when it keeps one (saliency's raw gradient): its
    positive part, its negative part, or both signs (zero at the colour map's middle).
    ``clip_lower``/``clip_upper`` are percentiles of the attribution magnitude: values below the lower
    one count as zero, values above the upper one saturate. ``overlay``: original (blend onto the
    picture), grayscale (blend onto a grey copy), mask-black (the picture dimmed by the attribution,
    no colours) or none (the coloured map alone).
    """

    colormap: str = "jet"
    alpha: float = 0.4
    polarity: str | None = None
    clip_lower: float = 0.0
    clip_upper: float = 99.9
    overlay: str = "original"

    def __post_init__(self) -> None:
        if not hasattr(cv2, f"COLORMAP_{self.colormap.upper()}"):
            raise ValueError(f"unknown colormap {self.colormap!r}; choose from: {', '.join(colormap_names())}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], not {self.alpha}")
        if self.polarity is not None and self.polarity not in POLARITIES:
            raise ValueError(f"polarity must be one of {', '.join(POLARITIES)}, not {self.polarity!r}")
        if not 0 <= self.clip_lower < self.clip_upper <= 100:
            raise ValueError(f"need 0 <= clip lower ({self.clip_lower}) < clip upper ({self.clip_upper}) <= 100")
        if self.overlay not in OVERLAY_TYPES:
            raise ValueError(f"overlay must be one of {', '.join(OVERLAY_TYPES)}, not {self.overlay!r}")

    def params(self) -> dict:
        return asdict(self)

    @property
    def key(self) -> str:
        """Short digest of the settings; part of the overlay's object key so different styles never collide."""
        return hashlib.sha256(json.dumps(self.params(), sort_keys=True).encode()).hexdigest()[:10]


def fit_long_side(rgb: np.ndarray, max_side: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return rgb
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    # Exact halves first: OpenCV averages 2×2 blocks on a fast path (640×480 to 160 px: 0.16 ms against
    # 0.5 in one INTER_AREA step, within one level of it), then one area step for what is left.
    while rgb.shape[0] % 2 == 0 and rgb.shape[1] % 2 == 0 and rgb.shape[1] >= 2 * size[0] \
            and rgb.shape[0] >= 2 * size[1]:
        rgb = cv2.resize(rgb, (rgb.shape[1] // 2, rgb.shape[0] // 2), interpolation=cv2.INTER_AREA)
    if (rgb.shape[1], rgb.shape[0]) == size:
        return rgb
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def attribution_to_unit(values: np.ndarray, style: OverlayStyle) -> np.ndarray:
    """H×W (or C×H×W, summed over channels as Vertex AI does) attributions -> H×W float32 in [0, 1].

    positive/negative (and None): magnitude of that sign scaled between the clip percentiles.
    both: 0.5 + 0.5 · sign · scaled magnitude, so zero sits at the middle of the colour map.
    """
    values = values.astype(np.float32)
    if values.ndim == 3:
        values = values.sum(axis=0)
    if style.polarity == "negative":
        values = np.maximum(-values, 0)
    elif style.polarity != "both":
        values = np.maximum(values, 0)
    magnitude = np.abs(values)
    lo, hi = np.percentile(magnitude, (style.clip_lower, style.clip_upper))
    if hi <= lo:  # constant map: nothing stands out
        scaled = np.zeros_like(magnitude)
    else:
        scaled = np.clip((magnitude - lo) / (hi - lo), 0, 1)
    if style.polarity == "both":
        return 0.5 + 0.5 * np.sign(values) * scaled
    return scaled


def overlay_png(rgb: np.ndarray, values: np.ndarray, style: OverlayStyle = OverlayStyle(),
                box: tuple[float, float, float, float] | None = None) -> bytes:
    """PNG bytes of ``values`` (H×W map in [0, 1] or signed C×H×W / H×W attributions, any size) rendered
    with ``style`` onto ``rgb`` (H×W×3 uint8). ``box`` (x0, y0, x1, y1, fractions of the picture's width and
    height; default all of it): the part of the image the map covers, a model's centre crop
    (``storage.input_crop.input_box``). Outside it the margin the model never saw is blank: the picture as the
    overlay type shows it (original, grayscale) or black (mask-black, none)."""
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = box or (0.0, 0.0, 1.0, 1.0)
    left, top = min(int(round(x0 * w)), w - 1), min(int(round(y0 * h)), h - 1)
    right, bottom = max(int(round(x1 * w)), left + 1), max(int(round(y1 * h)), top + 1)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if style.overlay == "grayscale":
        bgr = cv2.cvtColor(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    out = bgr.copy() if style.overlay in ("original", "grayscale") else np.zeros_like(bgr)
    out[top:bottom, left:right] = _rendered(bgr[top:bottom, left:right], values, style)
    ok, png = cv2.imencode(".png", out)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return png.tobytes()


def _rendered(bgr: np.ndarray, values: np.ndarray, style: OverlayStyle) -> np.ndarray:
    """``values`` resized to ``bgr`` (already grey for a grayscale overlay) and drawn as ``style`` says."""
    h, w = bgr.shape[:2]
    heat = cv2.resize(attribution_to_unit(values, style), (w, h), interpolation=cv2.INTER_LINEAR)
    if style.overlay == "mask-black":
        strength = np.abs(2 * heat - 1) if style.polarity == "both" else heat
        return (bgr.astype(np.float32) * strength[..., None]).round().astype(np.uint8)
    colormap = getattr(cv2, f"COLORMAP_{style.colormap.upper()}")
    colored = cv2.applyColorMap(np.clip(heat * 255, 0, 255).round().astype(np.uint8), colormap)
    if style.overlay == "none":
        return colored
    return cv2.addWeighted(bgr, 1 - style.alpha, colored, style.alpha, 0)
