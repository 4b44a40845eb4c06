"""Does a map point at the object? Localisation metrics of one map against ground truth (or without any).

In: a map over the model's input (h×w at any resolution: the target layer's or the input's), the ``InputFrame`` that
says where the original image's pixels landed in the model's input (resize, then crop), and ground truth in the
original image's pixels: boxes ``[[x0, y0, x1, y1], ...]`` (x1, y1 exclusive) and/or a mask (H×W, nonzero = object).
Out: the result fields ``pointing_game``, ``energy_in_box``, ``localization_iou``, ``localization_correct`` and,
needing no ground truth, ``border_energy``.

Every map cell covers a rectangle of original pixels; the metrics weigh each cell by the exact share of that rectangle
inside the region (an integral image interpolated bilinearly, which is exact for a piecewise-constant region), so a
7×7 layer map and its 224×224 upsampling are compared with the same boxes, on square and non-square images alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import cv2
import numpy as np

POINTING_TOLERANCE = 15  # pixels of the original image (Zhang et al. 2016)
BORDER_FRACTION = 0.1  # the outer 10 % of the image's width and height on each side
IOU_CORRECT = 0.5  # Simonyan et al. 2014's localisation criterion

Box = Sequence[float]


@dataclass(frozen=True)
class InputFrame:
    """The original image (``width`` × ``height``) resized to ``resized`` (w, h), then cropped at ``offset`` (left,
    top) to the model's ``size`` (w, h). A whole-image resize has ``resized == size`` and a zero offset."""

    width: int
    height: int
    resized: tuple[int, int]
    size: tuple[int, int]
    offset: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def whole(cls, width: int, height: int, size: tuple[int, int]) -> "InputFrame":
        return cls(width, height, size, size)

    def cell_edges(self, map_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """The edges of a map's cells in original pixels: (w + 1 x-edges, h + 1 y-edges)."""
        h, w = map_shape
        sx, sy = self.resized[0] / self.width, self.resized[1] / self.height
        xs = (np.arange(w + 1) * (self.size[0] / w) + self.offset[0]) / sx
        ys = (np.arange(h + 1) * (self.size[1] / h) + self.offset[1]) / sy
        return xs, ys


def region_mask(height: int, width: int, boxes: Sequence[Box] = (), mask: np.ndarray | None = None) -> np.ndarray:
    """The ground-truth region at the original size: the union of the boxes and the mask (H×W bool)."""
    region = np.zeros((height, width), bool) if mask is None else np.asarray(mask) != 0
    if region.shape != (height, width):
        raise ValueError(f"mask is {region.shape[1]}×{region.shape[0]}, the image {width}×{height}")
    for x0, y0, x1, y1 in boxes:
        # A pixel belongs to a box when its centre does: integer boxes cover exactly their pixels.
        c0, c1 = int(np.ceil(x0 - 0.5)), int(np.ceil(x1 - 0.5))
        r0, r1 = int(np.ceil(y0 - 0.5)), int(np.ceil(y1 - 0.5))
        region[max(r0, 0):max(r1, 0), max(c0, 0):max(c1, 0)] = True
    return region


def border_region(height: int, width: int) -> np.ndarray:
    region = np.ones((height, width), bool)
    bw, bh = int(round(BORDER_FRACTION * width)), int(round(BORDER_FRACTION * height))
    region[bh:height - bh, bw:width - bw] = False
    return region


def cell_coverage(region: np.ndarray, frame: InputFrame, map_shape: tuple[int, int]) -> np.ndarray:
    """h×w: the share of each map cell's footprint (clipped to the image) that lies inside ``region``; 0 for a cell
    wholly outside the image."""
    height, width = region.shape
    integral = np.zeros((height + 1, width + 1))
    integral[1:, 1:] = region.astype(np.float64).cumsum(0).cumsum(1)
    xs, ys = frame.cell_edges(map_shape)
    xs, ys = np.clip(xs, 0, width), np.clip(ys, 0, height)

    def at(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        # The integral of a piecewise-constant image is bilinear inside each pixel: interpolation is exact.
        x0, y0 = np.minimum(np.floor(x).astype(int), width - 1), np.minimum(np.floor(y).astype(int), height - 1)
        fx, fy = x - x0, y - y0
        top = integral[y0, x0] * (1 - fx) + integral[y0, x0 + 1] * fx
        bottom = integral[y0 + 1, x0] * (1 - fx) + integral[y0 + 1, x0 + 1] * fx
        return top * (1 - fy) + bottom * fy

    Y, X = np.meshgrid(ys, xs, indexing="ij")
    F = at(Y, X)
    inside = F[1:, 1:] - F[:-1, 1:] - F[1:, :-1] + F[:-1, :-1]
    area = np.outer(np.diff(ys), np.diff(xs))
    return np.divide(inside, area, out=np.zeros_like(inside), where=area > 0)


def mass_share(heat: np.ndarray, coverage: np.ndarray) -> float | None:
    """Share of the map's positive mass inside a region given as per-cell coverage; None for a map with none."""
    positive = np.asarray(heat, np.float64).ravel()
    if positive.min() < 0:  # maps in [0, 1] need no clipped copy
        positive = np.clip(positive, 0, None)
    total = positive.sum()
    # einsum's own loop, not a BLAS dot: OpenBLAS would start a thread per core whose spinning took a worker's
    # host threads ~17 % more CPU (`explain_sources`, Grad-CAM top-3 on 2 cores)
    return float(np.einsum("i,i->", positive, np.ravel(coverage)) / total) if total > 0 else None


def peak_point(heat: np.ndarray, frame: InputFrame) -> tuple[float, float]:
    """The centre of the map's maximum cell (the first, in row order, on ties) in original pixels (x, y)."""
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    xs, ys = frame.cell_edges(heat.shape)
    return float((xs[col] + xs[col + 1]) / 2), float((ys[row] + ys[row + 1]) / 2)


def pointing_hit(point: tuple[float, float], region: np.ndarray, tolerance: float = POINTING_TOLERANCE) -> bool:
    """Whether ``point`` (x, y, original pixels) lies within ``tolerance`` pixels of the region."""
    height, width = region.shape
    col, row = min(max(int(point[0]), 0), width - 1), min(max(int(point[1]), 0), height - 1)
    if region[row, col]:
        return True
    if not region.any():
        return False
    distance = cv2.distanceTransform((~region).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return bool(distance[row, col] <= tolerance)


def box_iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def localization_metrics(heat: np.ndarray, frame: InputFrame, boxes: Sequence[Box] = (),
                         mask: np.ndarray | None = None, localized_box: Box | None = None) -> dict[str, float | int]:
    """The metric fields one explanation gets: ``border_energy`` always, the others where their ground truth is."""
    return GroundTruth(frame, boxes, mask).metrics(heat, localized_box)


@lru_cache(maxsize=64)
def _border_coverage(frame: InputFrame, map_shape: tuple[int, int]) -> np.ndarray:
    # Most datasets have few image sizes: the border's coverage is computed once per size and map shape.
    return cell_coverage(border_region(frame.height, frame.width), frame, map_shape)


@dataclass
class GroundTruth:
    """One image's frame and ground truth, for the metrics of all its maps: the region and its per-cell coverage
    are computed once per map shape, not once per map."""

    frame: InputFrame
    boxes: Sequence[Box] = ()
    mask: np.ndarray | None = None
    _region: np.ndarray | None = field(default=None, repr=False)
    _coverage: dict = field(default_factory=dict, repr=False)

    @property
    def region(self) -> np.ndarray | None:
        if self._region is None and (self.boxes or self.mask is not None):
            self._region = region_mask(self.frame.height, self.frame.width, self.boxes, self.mask)
        return self._region

    def metrics(self, heat: np.ndarray, localized_box: Box | None = None) -> dict[str, float | int]:
        heat = np.asarray(heat, np.float64)
        fields: dict[str, float | int] = {}
        share = mass_share(heat, _border_coverage(self.frame, heat.shape))
        if share is not None:
            fields["border_energy"] = share
        if (region := self.region) is not None:
            fields["pointing_game"] = int(pointing_hit(peak_point(heat, self.frame), region))
            if heat.shape not in self._coverage:
                self._coverage[heat.shape] = cell_coverage(region, self.frame, heat.shape)
            share = mass_share(heat, self._coverage[heat.shape])
            if share is not None:
                fields["energy_in_box"] = share
        if self.boxes and localized_box is not None:
            iou = max(box_iou(localized_box, box) for box in self.boxes)
            fields["localization_iou"] = iou
            fields["localization_correct"] = int(iou >= IOU_CORRECT)
        return fields
