"""Overlay rendering options: polarity, clip percentiles, overlay types, colour maps, and their place in
the stored result."""

from __future__ import annotations

import json
import sqlite3

import cv2
import numpy as np
import pytest

from salient_maps.storage.maps import MapReader
from salient_maps.storage.overlays import OverlayStyle, attribution_to_unit, colormap_names, overlay_png
from salient_maps.storage.results import iter_results
from salient_maps.storage.settings import Settings


def decode(png: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def test_polarity_picks_a_sign_and_both_centres_zero():
    values = np.array([[-2.0, -1.0, 0.0, 1.0, 2.0]], np.float32)
    no_clip = dict(clip_lower=0.0, clip_upper=100.0)
    np.testing.assert_allclose(attribution_to_unit(values, OverlayStyle(polarity="positive", **no_clip)),
                               [[0, 0, 0, 0.5, 1]])
    np.testing.assert_allclose(attribution_to_unit(values, OverlayStyle(polarity="negative", **no_clip)),
                               [[1, 0.5, 0, 0, 0]])
    np.testing.assert_allclose(attribution_to_unit(values, OverlayStyle(polarity="both", **no_clip)),
                               [[0, 0.25, 0.5, 0.75, 1]])


def test_signed_colour_channels_are_summed():
    values = np.stack([np.full((2, 2), 1.0), np.full((2, 2), -3.0), np.full((2, 2), 1.0)])
    values[:, 0, 0] = 0  # one pixel with no attribution
    unit = attribution_to_unit(values, OverlayStyle(polarity="negative", clip_upper=100))
    np.testing.assert_allclose(unit, [[0, 1], [1, 1]])


def test_clip_percentiles_saturate_the_top_and_zero_the_bottom():
    values = np.arange(101, dtype=np.float32).reshape(1, 101)  # percentile p is the value p
    unit = attribution_to_unit(values, OverlayStyle(clip_lower=20, clip_upper=80))
    assert unit[0, :21].max() == 0
    assert unit[0, 80:].min() == 1
    assert unit[0, 50] == pytest.approx(0.5)


def test_overlay_types():
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    heat = np.zeros((8, 8), np.float32)
    heat[:, 4:] = 1.0
    full = dict(clip_upper=100)
    masked = decode(overlay_png(rgb, heat, OverlayStyle(overlay="mask-black", **full)))
    assert masked[:, :4].max() == 0 and (masked[:, 4:] == rgb[:, 4:]).all()
    alone = decode(overlay_png(rgb, heat, OverlayStyle(overlay="none", colormap="viridis", **full)))
    viridis = cv2.cvtColor(cv2.applyColorMap(np.array([[0, 255]], np.uint8), cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)
    assert (alone[0, 0] == viridis[0, 0]).all() and (alone[0, 7] == viridis[0, 1]).all()
    untouched = decode(overlay_png(rgb, heat, OverlayStyle(alpha=0.0, **full)))
    assert (untouched == rgb).all()
    grey = decode(overlay_png(rgb, heat, OverlayStyle(alpha=0.0, overlay="grayscale", **full)))
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert abs(int(grey[0, 0, 0]) - round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)) <= 1


def test_style_is_validated_and_keyed():
    assert {"jet", "viridis", "turbo", "inferno"} <= set(colormap_names())
    with pytest.raises(ValueError, match="unknown colormap"):
        OverlayStyle(colormap="rainbowish")
    with pytest.raises(ValueError, match="clip"):
        OverlayStyle(clip_lower=50, clip_upper=10)
    assert OverlayStyle().key == OverlayStyle().key
    assert OverlayStyle(alpha=0.5).key != OverlayStyle().key


def test_styles_are_stored_with_the_result_and_never_collide(tiny_images, run_cli, tmp_path):
    images = tiny_images(1)
    out = tmp_path / "data"
    common = ["run", images, "--model", "resnet18", "--topk", "1", "--methods", "saliency", "--out", out]
    run_cli(common)
    run_cli(common + ["--polarity", "negative", "--colormap", "turbo", "--overlay", "grayscale", "--alpha", "0.7"])
    db = sqlite3.connect(out / "salient.db")
    styles = [json.loads(row[0]) for row in db.execute("SELECT overlay FROM result_settings ORDER BY id")]
    assert styles == [OverlayStyle().params(), OverlayStyle(polarity="negative", colormap="turbo", overlay="grayscale",
                                                            alpha=0.7).params()]
    settings = Settings().with_data_dir(out)
    jobs = [row[0] for row in db.execute("SELECT id FROM jobs ORDER BY created_at")]
    [a], [b] = (list(iter_results(settings, job)) for job in jobs)
    reader = MapReader.for_settings(settings)
    np.testing.assert_array_equal(reader.map(a), reader.map(b))  # the same map
    drawn = [decode(reader.overlay_png(r, OverlayStyle(**style))) for r, style in zip((a, b), styles)]
    assert drawn[0].shape == drawn[1].shape and not np.array_equal(*drawn)  # drawn on demand, each in its style
