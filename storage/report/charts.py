"""Inline SVG plots and small PNG images, drawn without a plotting or imaging library."""

from __future__ import annotations

import struct
import zlib
from html import escape

import numpy as np

# One colour per method, in order (Okabe-Ito: distinguishable with colour blindness).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
# Viridis at 9 evenly spaced points; linear interpolation between them is visually indistinguishable.
_VIRIDIS = np.array([
    (68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
    (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37),
], dtype=np.float64)


def colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def histogram_svg(counts: dict[str, list[int]], title: str, lo: float = 0.0, hi: float = 1.0,
                  width: int = 260, height: int = 130) -> str:
    """Overlaid outline histograms of each named series' bin counts (equal bins over [lo, hi])."""
    pad_left, pad_bottom, pad_top = 30, 18, 18
    plot_w, plot_h = width - pad_left - 6, height - pad_bottom - pad_top
    bins = max((len(c) for c in counts.values()), default=1)
    peak = max((max(c) for c in counts.values() if c), default=0) or 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
             f'<text x="{pad_left}" y="12" class="t">{escape(title)}</text>',
             f'<line x1="{pad_left}" y1="{pad_top + plot_h}" x2="{pad_left + plot_w}" y2="{pad_top + plot_h}" '
             'class="ax"/>',
             f'<text x="{pad_left}" y="{height - 4}" class="l">{lo:g}</text>',
             f'<text x="{pad_left + plot_w}" y="{height - 4}" class="l" text-anchor="end">{hi:g}</text>',
             f'<text x="{pad_left - 4}" y="{pad_top + 8}" class="l" text-anchor="end">{peak}</text>']
    bar_w = plot_w / bins
    for i, (name, c) in enumerate(counts.items()):
        points = [f"{pad_left},{pad_top + plot_h}"]
        for b, count in enumerate(c):
            y = pad_top + plot_h - plot_h * count / peak
            points += [f"{pad_left + b * bar_w:.1f},{y:.1f}", f"{pad_left + (b + 1) * bar_w:.1f},{y:.1f}"]
        points.append(f"{pad_left + plot_w},{pad_top + plot_h}")
        parts.append(f'<polyline points="{" ".join(points)}" fill="{colour(i)}" fill-opacity="0.15" '
                     f'stroke="{colour(i)}"><title>{escape(name)}</title></polyline>')
    parts.append("</svg>")
    return "".join(parts)


def curves_svg(series: dict[str, list[float]], title: str, width: int = 260, height: int = 130) -> str:
    """Line plot of each named curve, its points spread evenly over x in [0, 1], y in [0, max]."""
    pad_left, pad_bottom, pad_top = 30, 18, 18
    plot_w, plot_h = width - pad_left - 6, height - pad_bottom - pad_top
    top = max((max(c) for c in series.values() if c), default=1.0) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
             f'<text x="{pad_left}" y="12" class="t">{escape(title)}</text>',
             f'<line x1="{pad_left}" y1="{pad_top + plot_h}" x2="{pad_left + plot_w}" y2="{pad_top + plot_h}" '
             'class="ax"/>',
             f'<line x1="{pad_left}" y1="{pad_top}" x2="{pad_left}" y2="{pad_top + plot_h}" class="ax"/>',
             f'<text x="{pad_left}" y="{height - 4}" class="l">0%</text>',
             f'<text x="{pad_left + plot_w}" y="{height - 4}" class="l" text-anchor="end">100% of pixels</text>',
             f'<text x="{pad_left - 4}" y="{pad_top + 8}" class="l" text-anchor="end">{top:.2g}</text>']
    for i, (name, curve) in enumerate(series.items()):
        if len(curve) < 2:
            continue
        points = " ".join(f"{pad_left + plot_w * j / (len(curve) - 1):.1f},{pad_top + plot_h - plot_h * v / top:.1f}"
                          for j, v in enumerate(curve))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colour(i)}" stroke-width="2">'
                     f'<title>{escape(name)}</title></polyline>')
    parts.append("</svg>")
    return "".join(parts)


def heat_png(values: np.ndarray) -> bytes:
    """PNG of an H×W map scaled by its own min and max, coloured with viridis."""
    values = np.asarray(values, dtype=np.float64)
    span = values.max() - values.min()
    unit = (values - values.min()) / span if span > 0 else np.zeros_like(values)
    position = unit * (len(_VIRIDIS) - 1)
    rgb = np.stack([np.interp(position, np.arange(len(_VIRIDIS)), _VIRIDIS[:, c]) for c in range(3)], axis=-1)
    return png_rgb(rgb.round().astype(np.uint8))


def png_rgb(pixels: np.ndarray) -> bytes:
    """8-bit RGB PNG bytes of an H×W×3 uint8 array."""
    h, w = pixels.shape[:2]
    rows = np.concatenate([np.zeros((h, 1), np.uint8), pixels.reshape(h, w * 3)], axis=1)  # filter byte 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b""))
