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


@pytest.mark.parametrize("crop", ["whole", "center"])
def test_overlays_store_writes_one_tar_per_batch_with_what_salient_show_draws(tiny_images, run_cli, tmp_path,
                                                                             monkeypatch, crop):
    import io
    import tarfile

    from salient_maps.storage.maps import image_folder, picture_of
    from salient_maps.storage.overlay_archives import archive_key

    monkeypatch.setenv("SALIENT_OVERLAY_MAX_SIDE", "256")  # the 300×400 pictures are drawn at 192×256
    images = tiny_images(3, size=(300, 400))  # PNG, JPEG, WebP
    out, plain = tmp_path / "stored", tmp_path / "plain"
    common = [images, "--model", "resnet18", "--methods", "gradcam,saliency", "--topk", "2", "--batch-size", "2",
              "--colormap", "viridis", "--crop", crop]
    run_cli(["run", *common, "--out", plain])
    assert {p.relative_to(plain / "objects").parts[0] for p in (plain / "objects").rglob("*") if p.is_file()} == \
        {"shards"}  # by default no overlay files
    run_cli(["run", *common, "--overlays", "store", "--out", out])
    settings = Settings().with_data_dir(out)
    records = list(iter_results(settings, None))
    assert len(records) == 3 * 2 * 2
    assert all((r["input_box"] == [0, 0, 1, 1]) == (crop == "whole") for r in records)  # a crop leaves a margin
    shards = {r["shard"] for r in records}
    stored = {p.relative_to(out / "objects").as_posix() for p in (out / "objects" / "overlays").rglob("*.tar")}
    assert len(shards) == 2 and stored == {archive_key(s) for s in shards}  # one archive per batch
    members = {}
    for key in stored:
        with tarfile.open(out / "objects" / key) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    assert set(members) == {f"{image_folder(r['uri'], r['sha256'])}/{r['method']}/{r['class_id']}.png"
                            for r in records}
    reader = MapReader.for_settings(settings)
    style = OverlayStyle(colormap="viridis")
    for r in records:
        png = members[f"{image_folder(r['uri'], r['sha256'])}/{r['method']}/{r['class_id']}.png"]
        assert decode(png).shape == (192, 256, 3)
        assert png == reader.overlay_png(r, style, picture_of(r, settings, 256, local_files=True)), r["uri"]
    r = records[-1]
    shown = tmp_path / "shown.png"
    run_cli(["show", r["sha256"], "--method", r["method"], "--class", str(r["class_id"]), "--out", shown,
             "--data", out])
    assert shown.read_bytes() == members[f"{image_folder(r['uri'], r['sha256'])}/{r['method']}/{r['class_id']}.png"]
    with tarfile.open(fileobj=io.BytesIO((out / "objects" / archive_key(r["shard"])).read_bytes())) as tar:
        assert all(m.isfile() and m.mtime == 0 for m in tar.getmembers())  # same batch, same bytes


def test_overlays_store_is_a_spec_option_the_workers_check():
    from salient_maps.storage.job_options import job_spec
    from salient_maps.workers.explainers import SpecError, load_setup

    spec = job_spec(model="resnet18", methods="gradcam", overlays="store")
    assert spec["options"] == {"overlays": "store"}
    assert load_setup(spec, Settings(), "cpu").store_overlays
    assert not load_setup(job_spec(model="resnet18", methods="gradcam"), Settings(), "cpu").store_overlays
    with pytest.raises(SpecError, match="overlays must be one of none, store"):
        load_setup(job_spec(model="resnet18", methods="gradcam", overlays="files"), Settings(), "cpu")
