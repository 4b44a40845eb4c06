"""Localisation metrics against brute force on non-square images, layer-size and input-size maps alike."""

import numpy as np
import pytest

from salient_maps.workers.localization_metrics import (
    InputFrame,
    box_iou,
    cell_coverage,
    localization_metrics,
    region_mask,
)


def block_coverage(region: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Coverage of cells that are whole blocks of original pixels, by counting pixels."""
    h, w = region.shape
    return region.reshape(rows, h // rows, cols, w // cols).mean((1, 3))


def sampled_coverage(region: np.ndarray, frame: InputFrame, shape: tuple[int, int], k: int = 16) -> np.ndarray:
    """Coverage by sampling each map cell at k×k points mapped back into the original image."""
    h, w = shape
    sx, sy = frame.resized[0] / frame.width, frame.resized[1] / frame.height
    out = np.zeros(shape)
    offsets = (np.arange(k) + 0.5) / k
    for r in range(h):
        for c in range(w):
            xin = (c + offsets) * frame.size[0] / w + frame.offset[0]
            yin = (r + offsets) * frame.size[1] / h + frame.offset[1]
            xo, yo = np.floor(xin / sx).astype(int), np.floor(yin / sy).astype(int)
            out[r, c] = region[np.ix_(yo, xo)].mean()
    return out


def test_coverage_of_aligned_cells_equals_pixel_counts_on_a_non_square_image():
    rng = np.random.default_rng(0)
    region = rng.random((160, 320)) < 0.3  # 320 wide, 160 high
    frame = InputFrame.whole(320, 160, (224, 224))
    # an 8×4 map: each cell is a 40×40 block of original pixels although the input is square
    np.testing.assert_allclose(cell_coverage(region, frame, (4, 8)), block_coverage(region, 4, 8), atol=1e-12)


@pytest.mark.parametrize("shape", [(7, 7), (224, 224), (14, 10)])
def test_coverage_matches_sampling_with_resize_and_crop(shape):
    region = region_mask(200, 300, boxes=[[30, 20, 130, 150], [200, 100, 290, 190]])
    frame = InputFrame(300, 200, resized=(336, 224), size=(224, 224), offset=(56, 0))  # resize short side, centre crop
    exact = cell_coverage(region, frame, shape)
    sampled = sampled_coverage(region, frame, shape, k=64 if shape[0] < 20 else 4)
    tolerance = 0.02 if shape[0] < 20 else 0.13  # sampling error only; coarse cells sampled 64×64
    np.testing.assert_allclose(exact, sampled, atol=tolerance)
    assert abs(exact.mean() - sampled.mean()) < 0.005


def test_energy_in_box_and_pointing_game_on_a_non_square_image():
    frame = InputFrame.whole(640, 320, (224, 224))
    heat = np.zeros((224, 224))
    # map mass in the input's left half = the original's left 320 px (x scaled by 0.35, y by 0.7)
    heat[:, :112] = 1.0
    box = [0, 0, 320, 320]
    fields = localization_metrics(heat, frame, boxes=[box])
    assert fields["energy_in_box"] == pytest.approx(1.0)
    heat[:, 112:] = 3.0
    fields = localization_metrics(heat, frame, boxes=[box])
    assert fields["energy_in_box"] == pytest.approx(0.25)
    assert fields["pointing_game"] == 1  # the first maximum: input column 112, original x 321.4, 1.4 px outside
    heat[:, :] = 0
    heat[100, 120] = 1  # original x = 120.5 / 0.35 = 344.3: 24 px from the box's edge at 320
    assert localization_metrics(heat, frame, boxes=[box])["pointing_game"] == 0
    heat[100, 120], heat[100, 115] = 0, 1  # original x = 330: 10 px outside, inside the tolerance
    assert localization_metrics(heat, frame, boxes=[box])["pointing_game"] == 1


def test_a_mask_counts_like_the_boxes_it_fills():
    rng = np.random.default_rng(1)
    heat = rng.random((7, 7))
    frame = InputFrame.whole(300, 180, (224, 224))
    boxes = [[20, 30, 150, 160]]
    mask = region_mask(180, 300, boxes=boxes).astype(np.uint8) * 255
    by_box, by_mask = localization_metrics(heat, frame, boxes=boxes), localization_metrics(heat, frame, mask=mask)
    assert by_box["energy_in_box"] == pytest.approx(by_mask["energy_in_box"])
    assert by_box["pointing_game"] == by_mask["pointing_game"]


def test_border_energy_counts_the_outer_tenth():
    frame = InputFrame.whole(500, 200, (224, 224))
    heat = np.ones((224, 224))
    # a uniform map: the frame's share is its area share, 1 - 0.8 × 0.8
    assert localization_metrics(heat, frame)["border_energy"] == pytest.approx(1 - 0.8 * 0.8, abs=1e-9)
    assert set(localization_metrics(heat, frame)) == {"border_energy"}
    assert "border_energy" not in localization_metrics(np.zeros((7, 7)), frame)  # no positive mass, no share


def test_localization_iou_takes_the_best_matching_box():
    frame = InputFrame.whole(100, 100, (224, 224))
    fields = localization_metrics(np.ones((7, 7)), frame, boxes=[[0, 0, 10, 10], [50, 50, 100, 100]],
                                  localized_box=[50, 50, 100, 90])
    assert fields["localization_iou"] == pytest.approx(0.8)
    assert fields["localization_correct"] == 1
    assert box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
