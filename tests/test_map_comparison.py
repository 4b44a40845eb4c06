"""Run-to-run map comparison against SciPy and hand counts."""

import numpy as np
import pytest
from scipy.stats import spearmanr

from salient_maps.storage.map_comparison import spearman, top_fraction_iou


@pytest.mark.parametrize("seed", range(4))
def test_spearman_equals_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    a = rng.random((7, 7))
    b = a + rng.normal(0, 0.3, (7, 7))
    a[a < 0.3] = 0  # a ReLU'd map: many tied zeros
    assert spearman(a, b) == pytest.approx(spearmanr(a.ravel(), b.ravel()).statistic, abs=1e-12)


def test_spearman_of_a_constant_map_is_none_and_shapes_must_agree():
    assert spearman(np.zeros((7, 7)), np.ones((7, 7))) is None
    with pytest.raises(ValueError, match="at one size"):
        spearman(np.zeros((7, 7)), np.zeros((14, 14)))


def test_top_fraction_iou_counts_the_shared_top_cells():
    a = np.arange(100.0).reshape(10, 10)  # top 10 %: cells 90..99
    b = a.copy()
    assert top_fraction_iou(a, b) == 1.0
    b = np.roll(a.ravel(), 5).reshape(10, 10)  # its top 10 % are cells 95..99 and 0..4
    assert top_fraction_iou(a, b) == pytest.approx(5 / 15)
    assert top_fraction_iou(a, -a) == 0.0
