"""How much did a map change between two runs? Two maps of one image, class and method in; numbers out.

- ``spearman``: rank correlation of the two maps' cells (average ranks for ties), 1 = same order everywhere.
- ``top_fraction_iou``: IoU of the two maps' most salient 10 % of cells (the region an auditor looks at).

Maps must have one shape: compare them at the input size when the runs' models differ. NumPy only, so the light
install (``salient compare``) runs it without torch.
"""

from __future__ import annotations

import math

import numpy as np

TOP_FRACTION = 0.1


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size)
    ranks[order] = np.arange(values.size)
    sorted_values = values[order]
    # ties share the mean of their ranks
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], values.size]
    mean_rank = (starts + ends - 1) / 2
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def _same_shape(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"maps of shapes {a.shape} and {b.shape}: compare them at one size (the input's)")
    return a.ravel(), b.ravel()


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation of two maps; None where either map is constant (no order to compare)."""
    a, b = _same_shape(a, b)
    ra, rb = _ranks(a) - (a.size - 1) / 2, _ranks(b) - (b.size - 1) / 2
    denominator = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb) / denominator if denominator > 0 else None


def top_fraction_iou(a: np.ndarray, b: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """IoU of the ``fraction`` of cells with the highest values in each map (ties broken by position)."""
    a, b = _same_shape(a, b)
    k = max(1, math.ceil(fraction * a.size))
    top_a = np.zeros(a.size, bool)
    top_b = np.zeros(b.size, bool)
    top_a[np.argsort(-a, kind="stable")[:k]] = True
    top_b[np.argsort(-b, kind="stable")[:k]] = True
    return float((top_a & top_b).sum() / (top_a | top_b).sum())
