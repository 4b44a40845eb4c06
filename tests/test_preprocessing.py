"""Preprocessing from the models' own metadata (no download), its overrides on the command line and in
messages, and its place in the results' identity."""

from __future__ import annotations

import io
import json
import sqlite3

import cv2
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image as PILImage
from torchvision.transforms import v2

from salient_maps.storage.database import connect
from salient_maps.storage.job_options import job_spec
from salient_maps.storage.messages import MessageError, chunk_message, parse_chunk
from salient_maps.storage.objects import open_store
from salient_maps.storage.settings import Settings
from salient_maps.workers.explainers import SpecError, load_setup
from salient_maps.workers.images import Resizing, decode_jpegs_on_device, to_input
from salient_maps.workers.models import IMAGENET_MEAN, load_model


def test_metadata_gives_size_and_normalisation_without_download():
    with torch.device("meta"):
        tiny = load_model("timm:vit_tiny_patch16_224")
        resnet = load_model("resnet50")
        vit = load_model("vit_b_16", input_size=64)
    assert (tiny.input_size, tiny.mean, tiny.std) == (224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert tiny.declared_transform["interpolation"] == "bicubic" and tiny.declared_transform["crop_pct"] == 0.9
    assert resnet.mean == IMAGENET_MEAN and resnet.declared_transform["resize_size"] == 232  # IMAGENET1K_V2
    assert vit.input_size == 64 and vit.module.image_size == 64  # built for the size asked: a 4×4 grid
    assert vit.default_layer == "encoder.layers.encoder_layer_11.ln_1"
    record = tiny.preprocessing()
    assert record["input_size"] == 224 and record["mean"] == [0.5, 0.5, 0.5] and record["declared"]


def processor_digest(tmp_path, **options) -> tuple[str, object]:
    message = json.loads(json.dumps(chunk_message("job", [(1, "file:///x.png")], job_spec(
        model="resnet18", methods="gradcam", topk=1, **options))))
    settings = Settings().with_data_dir(tmp_path / "worker")
    setup = load_setup(parse_chunk(message).spec, settings, "cpu")
    processor = setup.processor(settings, connect(settings.resolved_database_url),
                                open_store(settings.resolved_object_store_url))
    return processor.digest, setup.explainer.model


def test_overrides_travel_in_the_message_and_change_the_identity(tmp_path):
    plain, _ = processor_digest(tmp_path, input_size=32)
    again, _ = processor_digest(tmp_path, input_size=32)
    other_mean, model = processor_digest(tmp_path, input_size=32, mean="0.5,0.5,0.5", std=[0.25, 0.25, 0.25])
    bigger, _ = processor_digest(tmp_path, input_size=48)
    assert model.mean == (0.5, 0.5, 0.5) and model.std == (0.25, 0.25, 0.25) and model.input_size == 32
    assert plain == again and len({plain, other_mean, bigger}) == 3


@pytest.mark.parametrize("preprocessing", [{"size": 3}, {"input_size": 8}, {"mean": [0.5, 0.5]}, {"std": "0.5"},
                                           {"input_size": True}])
def test_bad_preprocessing_in_a_message_is_refused(preprocessing):
    spec = {"model": "resnet18", "methods": ["gradcam"], "targets": {"topk": 1}, "preprocessing": preprocessing}
    with pytest.raises(MessageError, match="preprocessing"):
        parse_chunk(chunk_message("job", [(1, "file:///x.png")], spec))


def test_a_vit_that_cannot_take_the_size_fails_before_any_image(tmp_path):
    settings = Settings().with_data_dir(tmp_path / "worker")
    with pytest.raises(SpecError, match="cannot build vit_b_16 for a 50 px input: .*divisible by patch size"):
        load_setup(job_spec(model="vit_b_16", methods="gradcam", input_size=50), settings, "cpu")
    with pytest.raises(SpecError, match="timm has no model 'vit_tiny_patch16'; did you mean: vit_tiny_patch16_"):
        load_setup(job_spec(model="timm:vit_tiny_patch16", methods="gradcam"), settings, "cpu")


# --- the declared resize and crop, applied ---------------------------------------------------------------------

def test_metadata_gives_the_crop_and_filter_and_a_model_without_any_keeps_the_whole_image():
    with torch.device("meta"):
        resnet, swin, tiny = load_model("resnet18"), load_model("swin_t"), load_model("timm:vit_tiny_patch16_224")
        small = load_model("resnet18", input_size=96)
    lite = load_model("efficientnet_lite0")  # its bundled weights: not on the meta device
    assert resnet.resizing == Resizing(224, "center", 256, "bilinear")  # ResNet18_Weights: resize 256, crop 224
    assert swin.resizing == Resizing(224, "center", 232, "bicubic")
    assert tiny.resizing == Resizing(224, "center", 248, "bicubic")  # crop_pct 0.9: floor(224 / 0.9)
    assert small.resizing == Resizing(96, "center", 109, "bilinear")  # the crop's share kept: floor(96 * 256 / 224)
    assert lite.resizing == Resizing(224) and lite.preprocessing_identity() is None  # no metadata: whole, area
    assert resnet.preprocessing()["crop"] == "center" and resnet.preprocessing()["resize"] == 256


def test_crop_resize_and_filter_overrides_travel_in_the_message_and_change_the_identity(tmp_path):
    declared, model = processor_digest(tmp_path)
    whole, whole_model = processor_digest(tmp_path, crop="whole", interpolation="area")
    bicubic, bicubic_model = processor_digest(tmp_path, interpolation="bicubic")
    wider, wider_model = processor_digest(tmp_path, resize=288)
    assert model.resizing == Resizing(224, "center", 256, "bilinear")
    assert whole_model.resizing == Resizing(224) and bicubic_model.resizing.interpolation == "bicubic"
    assert wider_model.resizing == Resizing(224, "center", 288, "bilinear")
    assert len({declared, whole, bicubic, wider}) == 4
    settings = Settings().with_data_dir(tmp_path / "worker")
    with pytest.raises(SpecError, match="resize 200 is smaller than the 224 px crop"):
        load_setup(job_spec(model="resnet18", methods="gradcam", resize=200), settings, "cpu")
    with pytest.raises(SpecError, match="a resize side goes with a center or squash crop"):
        load_setup(job_spec(model="resnet18", methods="gradcam", crop="whole", resize=256), settings, "cpu")


@pytest.mark.parametrize("preprocessing", [{"crop": "border"}, {"resize": 8}, {"interpolation": "lanczos"}])
def test_a_bad_crop_in_a_message_is_refused(preprocessing):
    spec = {"model": "resnet18", "methods": ["gradcam"], "targets": {"topk": 1}, "preprocessing": preprocessing}
    with pytest.raises(MessageError, match="preprocessing"):
        parse_chunk(chunk_message("job", [(1, "file:///x.png")], spec))


def photo() -> np.ndarray:
    return np.ascontiguousarray(skimage.data.coffee()[:, 40:])  # 400×560: landscape, and not 4:3


def reference(rgb: np.ndarray, r: Resizing) -> np.ndarray:
    """torchvision.transforms.v2 Resize + CenterCrop on the uint8 tensor: what the model's eval transform gives."""
    size = r.resize if r.crop == "center" else (r.resize, r.resize)
    tensor = torch.from_numpy(rgb).permute(2, 0, 1)
    resized = v2.Resize(size, interpolation=v2.InterpolationMode(r.interpolation), antialias=True)(tensor)
    return v2.CenterCrop(r.size)(resized).permute(1, 2, 0).float().numpy()


def pixels(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).numpy() * 255  # mean 0, std 1: back to 0-255


CROPS = [Resizing(224, "center", 256, "bilinear"), Resizing(224, "center", 232, "bicubic"),
         Resizing(224, "squash", 248, "bicubic"), Resizing(96, "center", 96, "bilinear")]


@pytest.mark.parametrize("resizing", CROPS, ids=lambda r: f"{r.crop}-{r.resize}-{r.interpolation}")
@pytest.mark.parametrize("portrait", [False, True], ids=["landscape", "portrait"])
def test_the_host_crop_is_torchvisions_resize_and_center_crop(resizing, portrait):
    """Both sides make 8-bit pixels with the same antialiased filter (PIL's, which torchvision's uint8 kernel
    reproduces): they may differ by one level where the two round a sum differently, and rarely do."""
    rgb = photo().transpose(1, 0, 2).copy() if portrait else photo()
    diff = np.abs(pixels(to_input(rgb, resizing, (0, 0, 0), (1, 1, 1))) - reference(rgb, resizing))
    assert diff.max() <= 1 + 1e-3 and diff.mean() < 0.05


@pytest.mark.parametrize("resizing", CROPS[:3], ids=lambda r: f"{r.crop}-{r.resize}-{r.interpolation}")
def test_the_device_crop_is_torchvisions_resize_and_center_crop(resizing):
    """The nvJPEG path's code with libjpeg on the CPU, against torchvision on the same decoded pixels: both filter
    rows, round to 8 bits, then columns; torchvision's uint8 kernel sums with fixed-point weights, so a pixel may
    round the other way (one level), rarely."""
    from torchvision.io import decode_jpeg

    buf = io.BytesIO()
    PILImage.fromarray(photo()).save(buf, "JPEG", quality=90)
    (x, picture), = decode_jpegs_on_device([buf.getvalue()], torch.device("cpu"), resizing, (0, 0, 0), (1, 1, 1),
                                           None)
    decoded = decode_jpeg(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(picture, decoded)
    diff = np.abs(pixels(x) - reference(decoded, resizing))
    assert diff.max() <= 1 + 1e-3 and diff.mean() < 0.05


@pytest.mark.parametrize("resizing", [Resizing(64), *CROPS], ids=lambda r: f"{r.crop}-{r.resize}-{r.interpolation}")
def test_the_frame_is_where_the_crop_took_the_pixels_from(resizing):
    """A picture whose red channel is x and green channel y (in 1/2 px steps, both < 256): each input pixel
    shows the original coordinates of its centre, which must be the centre of its cell in ``frame``. Within
    0.1 original px: the filters' taps end at whole pixels, so a cell's weighted mean can sit ~0.08 px off its
    centre; a crop one resized pixel off would be 1.1-2.3 px off."""
    height, width = 300, 500
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([(xs + 0.5) / 2, (ys + 0.5) / 2, np.zeros_like(xs)], axis=2)  # float pixels: no rounding
    x = pixels(to_input(rgb, resizing, (0, 0, 0), (1, 1, 1)))
    xe, ye = resizing.frame(width, height).cell_edges((resizing.size, resizing.size))
    inner = slice(4, -4)  # the filters see past the image's edge only in the outer pixels (whole image)
    np.testing.assert_allclose(x[inner, inner, 0] * 2, np.broadcast_to(((xe[:-1] + xe[1:]) / 2)[inner],
                                                                       (resizing.size - 8,) * 2), atol=0.1)
    np.testing.assert_allclose(x[inner, inner, 1] * 2, np.broadcast_to(((ye[:-1] + ye[1:]) / 2)[inner, None],
                                                                       (resizing.size - 8,) * 2), atol=0.1)
    x0, y0, x1, y1 = resizing.box(width, height)  # and the box readers place maps with is the frame's
    assert (x0 * width, x1 * width, y0 * height, y1 * height) == pytest.approx((xe[0], xe[-1], ye[0], ye[-1]))


def test_a_reduced_jpeg_is_cut_at_the_same_place_of_the_image():
    """A JPEG decoded at 1/2 (libjpeg's DCT scaling) gives the crop of the full image, not of another one."""
    r = Resizing(96, "center", 110, "bilinear")
    rgb = photo()
    half = cv2.resize(rgb, (rgb.shape[1] // 2, rgb.shape[0] // 2), interpolation=cv2.INTER_AREA)
    full = pixels(to_input(rgb, r, (0, 0, 0), (1, 1, 1)))
    reduced = pixels(to_input(half, r, (0, 0, 0), (1, 1, 1), original=(rgb.shape[1], rgb.shape[0])))
    assert np.abs(full - reduced).mean() < 3  # the same scene, filtered twice; a shifted crop differs by ~15


# --- recorded per result, and maps placed on the crop ----------------------------------------------------------

def expected_box(width: int, height: int, resize: int = 256, size: int = 224) -> list[float]:
    """torchvision's Resize(resize) + CenterCrop(size) of a landscape image, by hand: the box in fractions."""
    long = int(resize * width / height)
    left, top = int(round((long - size) / 2)), int(round((resize - size) / 2))
    return [left / long, top / resize, (left + size) / long, (top + size) / resize]


def test_run_records_layout_and_preprocessing_and_draws_the_map_on_the_crop(run_cli, smooth_rgb, encode_image,
                                                                           tmp_path):
    from salient_maps.storage.maps import MapReader
    from salient_maps.storage.overlays import OverlayStyle
    from salient_maps.storage.results import iter_results

    (tmp_path / "images").mkdir()
    rgb = smooth_rgb(200, 320, seed=5)
    (tmp_path / "images" / "wide.png").write_bytes(encode_image(rgb, "PNG"))
    out = tmp_path / "data"
    run_cli(["run", tmp_path / "images", "--model", "resnet18", "--topk", "1", "--methods", "gradcam", "--out", out])
    db = sqlite3.connect(out / "salient.db")
    layout, preprocessing = (json.loads(v) for v in db.execute("SELECT layout, preprocessing FROM result_settings")
                             .fetchone())
    assert layout == {"kind": "nchw"}
    assert {k: preprocessing[k] for k in ("input_size", "crop", "resize", "interpolation")} == \
        {"input_size": 224, "crop": "center", "resize": 256, "interpolation": "bilinear"}
    settings = Settings().with_data_dir(out)
    [record] = list(iter_results(settings, None))
    assert record["layout"] == layout and record["preprocessing"] == preprocessing
    assert record["input_box"] == pytest.approx(expected_box(320, 200))
    drawn = cv2.cvtColor(cv2.imdecode(np.frombuffer(MapReader.for_settings(settings).overlay_png(
        record, OverlayStyle(alpha=0.5), rgb), np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    x0, _, x1, _ = (round(v * s) for v, s in zip(record["input_box"], (320, 200, 320, 200)))
    np.testing.assert_array_equal(drawn[:, :x0], rgb[:, :x0])  # the margins the model never saw: blank
    np.testing.assert_array_equal(drawn[:, x1:], rgb[:, x1:])
    assert np.abs(drawn[:, x0:x1].astype(int) - rgb[:, x0:x1]).mean() > 10  # the map, on the crop
    as_text = {**record, "input_box": json.dumps(record["input_box"])}  # a row of open_results' Arrow table
    assert MapReader.for_settings(settings).overlay_png(as_text, OverlayStyle(alpha=0.5), rgb) == \
        MapReader.for_settings(settings).overlay_png(record, OverlayStyle(alpha=0.5), rgb)
    shown = run_cli(["show", "wide.png", "--data", out]).output
    assert "over the model's crop" in shown


def test_the_queue_path_records_them_too(tmp_path, smooth_rgb, encode_image):
    from salient_maps.storage.database import add_items, close_listing, create_job
    from salient_maps.storage.results import iter_results
    from salient_maps.storage.sources import iter_uris
    from salient_maps.workers.process import pending_items, record_digest

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "tall.png").write_bytes(encode_image(smooth_rgb(160, 96, seed=6), "PNG"))
    message = json.loads(json.dumps(chunk_message("job", [(1, "file:///x.png")], job_spec(
        model="timm:vit_tiny_patch16_224", methods="gradcam", topk=1, input_size=96, interpolation="bilinear"))))
    settings = Settings().with_data_dir(tmp_path / "worker")
    db = connect(settings.resolved_database_url)
    job_id = create_job(db, {})
    add_items(db, job_id, iter_uris([str(tmp_path / "images")], settings))
    close_listing(db, job_id)
    processor = load_setup(parse_chunk(message).spec, settings, "cpu").processor(
        settings, db, open_store(settings.resolved_object_store_url))
    record_digest(db, job_id, processor.digest)
    processor.run(pending_items(db, job_id))
    [record] = list(iter_results(settings, job_id))
    assert record["status"] == "done" and record["layout"] == {"kind": "tokens", "prefix_tokens": 1}
    assert {k: record["preprocessing"][k] for k in ("input_size", "crop", "resize", "interpolation")} == \
        {"input_size": 96, "crop": "center", "resize": 106, "interpolation": "bilinear"}  # floor(96 / 0.9)
    top = int(round((int(106 * 160 / 96) - 96) / 2))  # portrait: the crop cuts the top and bottom
    assert record["input_box"] == pytest.approx([5 / 106, top / 176, 101 / 106, (top + 96) / 176])


def test_the_api_takes_the_crop_as_salient_submit_does():
    from pydantic import ValidationError

    from salient_maps.producer.api import JobRequest

    request = JobRequest(uris=["s3://bucket/a.png"], crop="squash", resize=288, interpolation="bicubic")
    spec = job_spec(**request.model_dump(exclude={"uris", "manifest", "name", "chunk"}))
    assert spec["preprocessing"] == {"crop": "squash", "resize": 288, "interpolation": "bicubic"}
    parse_chunk(chunk_message("job", [(1, "s3://bucket/a.png")], spec))  # a valid message
    for bad in ({"crop": "border"}, {"interpolation": "lanczos"}, {"resize": 4}):
        with pytest.raises(ValidationError):
            JobRequest(uris=["s3://bucket/a.png"], **bad)
