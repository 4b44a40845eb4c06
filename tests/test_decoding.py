"""Decoding for the model: a JPEG is decoded only as large as the model input and the host picture need
(libjpeg-turbo's DCT scaling by M/8), with its original size kept; the model input stays within a stated
tolerance of full-size decoding; the device path (nvJPEG on CUDA, run here on the CPU) keeps the same tolerance;
and a batch is read, checked against the database in one query, and decoded without what is explained already."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from sqlalchemy import event

from salient_maps.storage.sources import SourceError
from salient_maps.workers import process
from salient_maps.workers.images import (
    Resizing,
    decode_image,
    decode_jpegs_on_device,
    decode_scaled,
    device_decodable,
    jpeg_eighths,
    to_input,
)
from salient_maps.workers.process import stacked_inputs

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LIMIT = 40_000_000
# Model input of a photo, in 1/255 levels, against OpenCV full-size decoding + INTER_AREA (today's input).
# Measured on these photos: DCT scaling by 1/2, mean 0.7-1.2 and 99th percentile 5-11 (sharp edges differ
# most); the device path's antialiased bicubic, mean 0.5-0.8 and 99th percentile 2.5-6.
REDUCED_MEAN, REDUCED_P99 = 1.5, 16.0
DEVICE_MEAN, DEVICE_P99 = 1.0, 8.0


def photo_jpeg(name: str, width: int = 640, height: int = 480, quality: int = 90, **pillow) -> bytes:
    import skimage.data

    rgb = cv2.resize(getattr(skimage.data, name)(), (width, height), interpolation=cv2.INTER_AREA)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality, **pillow)
    return buf.getvalue()


def turned_jpeg(orientation: int) -> bytes:
    """A 640×480 photo with a red top-left corner as stored (every turn and mirror moves it elsewhere), tagged
    with an EXIF ``orientation``."""
    rgb = cv2.resize(np.asarray(Image.open(io.BytesIO(photo_jpeg("coffee")))), (640, 480))
    rgb[:60, :100] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def levels(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """|a - b| of two normalised inputs, back in 1/255 levels."""
    return ((a - b).abs() * torch.tensor(STD).view(3, 1, 1) * 255).numpy()


def full_input(data: bytes, size=224) -> torch.Tensor:
    """The host path's input from the full-size picture (``size``: an int, or a ``Resizing``)."""
    return to_input(decode_image(data, LIMIT), size, MEAN, STD)


@pytest.mark.parametrize("size, short, long, eighths", [
    ((640, 480), 224, 256, 4),      # 320×240 keeps 224 and the thumbnail
    ((640, 480), 256, 160, 5),      # 400×300 for a 256 px resize (resnet's centre crop)
    ((640, 480), 224, 1024, 8),     # overlays at 1024 px need the whole image
    ((640, 480), 224, None, 8),     # None: full size (localisation boxes)
    ((640, 480), 112, 0, 2),        # 160×120
    ((4000, 3000), 224, 256, 1),    # 500×375
    ((3000, 4000), 224, 256, 1),    # portrait: the sides, not width and height, decide
    ((1800, 225), 224, 0, 8),       # the short side would fall under the input
    ((449, 449), 224, 0, 4),        # libjpeg rounds up: 225 >= 224
])
def test_scale_keeps_the_input_and_the_picture(size, short, long, eighths):
    assert jpeg_eighths(*size, short, long) == eighths


def test_jpeg_is_decoded_scaled_with_its_size_kept():
    data = photo_jpeg("astronaut")
    decoded = decode_scaled(data, LIMIT, 224, 256)
    assert decoded.rgb.shape == (240, 320, 3) and (decoded.width, decoded.height) == (640, 480)
    # by 1/2, the same pixels as OpenCV's own libjpeg gives
    np.testing.assert_array_equal(decoded.rgb, cv2.cvtColor(
        cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_2), cv2.COLOR_BGR2RGB))
    decoded = decode_scaled(data, LIMIT, 256, 160)
    assert decoded.rgb.shape == (300, 400, 3) and (decoded.width, decoded.height) == (640, 480)
    shrunk = cv2.resize(decode_image(data, LIMIT), (400, 300), interpolation=cv2.INTER_AREA)
    assert np.abs(decoded.rgb.astype(float) - shrunk).mean() < 3  # by 5/8, the same picture


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_turns_as_pillow_does(orientation):
    data = turned_jpeg(orientation)
    with Image.open(io.BytesIO(data)) as im:
        expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB")).astype(int)
    full = decode_scaled(data, LIMIT)
    assert full.rgb.shape == expected.shape and (full.height, full.width) == expected.shape[:2]
    assert np.abs(full.rgb - expected).max() <= 2  # two libjpeg builds, one picture
    scaled = decode_scaled(data, LIMIT, 256, 160)  # by 5/8 (where OpenCV could only decode whole)
    assert (scaled.width, scaled.height) == (full.width, full.height)
    assert scaled.rgb.shape[:2] == (-(-expected.shape[0] * 5 // 8), -(-expected.shape[1] * 5 // 8))
    smaller = cv2.resize(expected.astype(np.uint8), scaled.rgb.shape[1::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(scaled.rgb.astype(float) - smaller).mean() < 3  # a wrong turn differs by tens of levels


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
@pytest.mark.parametrize("resizing, side, shape", [
    (224, 224, (240, 320)),                                         # whole image, by 1/2
    (Resizing(224, "center", 256, "bilinear"), 256, (300, 400)),    # torchvision's resize + crop, by 5/8
])
def test_scaled_decoding_stays_within_tolerance_of_full_decoding(name, resizing, side, shape):
    data = photo_jpeg(name)
    decoded = decode_scaled(data, LIMIT, side, 160)
    assert decoded.rgb.shape[:2] == shape
    diff = levels(to_input(decoded.rgb, resizing, MEAN, STD, (640, 480)), full_input(data, resizing))
    assert diff.mean() <= REDUCED_MEAN and np.percentile(diff, 99) <= REDUCED_P99
    assert diff.mean() > 0  # it did decode scaled: the test can tell the two apart


def test_exif_turn_applies_to_the_reduced_picture_and_the_size():
    data = turned_jpeg(6)  # displayed turned 90° clockwise: the red corner shows top-right
    decoded = decode_scaled(data, LIMIT, 224, 256)
    assert decoded.rgb.shape == (320, 240, 3) and (decoded.width, decoded.height) == (480, 640)
    top_right = decoded.rgb[:10, -10:].reshape(-1, 3).mean(0)
    assert top_right[0] > 200 and top_right[1] < 60
    assert device_decodable(data, LIMIT) is None  # nvJPEG would not turn it: the host decodes it


def test_other_formats_are_decoded_whole_and_exactly(smooth_rgb, encode_image):
    rgb = smooth_rgb(480, 640)
    decoded = decode_scaled(encode_image(rgb, "PNG"), LIMIT, 224, 256)
    np.testing.assert_array_equal(decoded.rgb, rgb)
    assert (decoded.width, decoded.height) == (640, 480)


def test_bad_jpegs_still_fail_with_their_reason_when_reduced():
    data = photo_jpeg("chelsea")
    with pytest.raises(SourceError, match="truncated JPEG"):
        decode_scaled(data[: len(data) * 2 // 3], LIMIT, 224, 256)
    with pytest.raises(SourceError, match="over the limit"):
        decode_scaled(data, 640 * 480 - 1, 224, 256)
    with pytest.raises(SourceError, match="truncated JPEG"):
        device_decodable(data[: len(data) * 2 // 3], LIMIT)


def test_what_the_device_may_decode(smooth_rgb, encode_image):
    assert device_decodable(photo_jpeg("coffee"), LIMIT) == (640, 480)
    assert device_decodable(encode_image(smooth_rgb(30, 40), "PNG"), LIMIT) is None
    cmyk = io.BytesIO()
    Image.fromarray(smooth_rgb(30, 40)).convert("CMYK").save(cmyk, "JPEG")
    assert device_decodable(cmyk.getvalue(), LIMIT) is None
    with pytest.raises(SourceError, match="over the limit"):
        device_decodable(photo_jpeg("coffee"), 1000)


def test_device_path_stays_within_tolerance_of_the_host_path():
    """The nvJPEG path's code, run with libjpeg on the CPU: same pixels, resized by torch on the device."""
    names = ["astronaut", "chelsea", "coffee"]
    jpegs = [photo_jpeg(name) for name in names] + [photo_jpeg("coffee", 160, 120)]  # the last one is upsampled
    out = decode_jpegs_on_device(jpegs, torch.device("cpu"), 224, MEAN, STD, picture_side=256)
    for data, (x, picture) in zip(jpegs, out):
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32
        diff = levels(x, full_input(data))
        assert diff.mean() <= DEVICE_MEAN and np.percentile(diff, 99) <= DEVICE_P99
        full = decode_image(data, LIMIT)
        if max(full.shape) > 256:  # the picture fits the long side, its colours those of the image
            assert picture.shape == (192, 256, 3) and picture.dtype == np.uint8
            reference = cv2.resize(full, (256, 192), interpolation=cv2.INTER_AREA)
            assert np.abs(picture.astype(float) - reference).mean() < 2
        else:
            np.testing.assert_array_equal(picture, full)


def test_device_batch_with_a_bad_jpeg_raises_for_the_host_to_sort_out():
    good = photo_jpeg("coffee")
    bad = good[:600] + b"\x00" * 400 + good[1000:]  # complete markers, corrupt entropy data
    try:
        decode_jpegs_on_device([good, bad], torch.device("cpu"), 224, MEAN, STD, None)
    except RuntimeError:
        pass  # the CPU decoder refused it, as nvJPEG does
    else:
        pytest.skip("libjpeg decoded the damaged data without complaint")


# --- a batch: one query, nothing decoded twice ---------------------------------------------------------------


@pytest.fixture
def processor(tmp_path):
    from salient_maps.storage.database import connect
    from salient_maps.storage.job_options import job_spec
    from salient_maps.storage.objects import open_store
    from salient_maps.storage.settings import Settings
    from salient_maps.workers.explainers import load_setup

    settings = Settings().with_data_dir(tmp_path / "data")
    db = connect(settings.resolved_database_url)
    spec = job_spec(model="resnet18", methods="gradcam", topk=1, batch_size=8)
    return load_setup(spec, settings, "cpu").processor(settings, db, open_store(settings.resolved_object_store_url))


def test_a_batch_asks_the_database_once_and_decodes_only_what_is_new(processor, tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from salient_maps.storage.database import add_items, close_listing, create_job
    from salient_maps.workers.process import PendingItem, pending_items

    folder = tmp_path / "images"
    folder.mkdir()
    names = ["astronaut", "chelsea", "coffee", "astronaut"]  # the last is a copy of the first
    uris = []
    for i, name in enumerate(names):
        (folder / f"{i}.jpg").write_bytes(photo_jpeg(name))
        uris.append((folder / f"{i}.jpg").as_uri())
    (folder / "bad.jpg").write_bytes(b"not an image at all")
    uris.append((folder / "bad.jpg").as_uri())
    job_id = create_job(processor.db, {})
    add_items(processor.db, job_id, uris)
    close_listing(processor.db, job_id)
    items = list(pending_items(processor.db, job_id))
    with ThreadPoolExecutor(2) as pool:
        first = processor.prepare_batch(items, pool)
    processor.process_batch(first)  # explained: a second reading finds them in the database

    statements: list[str] = []
    event.listen(processor.db, "before_cursor_execute", lambda *a: statements.append(a[2]))
    decoded: list[bytes] = []
    real = process.decode_scaled
    monkeypatch.setattr(process, "decode_scaled", lambda data, *a: decoded.append(data) or real(data, *a))
    (folder / "new.jpg").write_bytes(photo_jpeg("coffee", 600, 450))
    again = items + [PendingItem(99, job_id, (folder / "new.jpg").as_uri())]
    with ThreadPoolExecutor(2) as pool:
        second = processor.prepare_batch(again, pool)

    assert len(statements) == 1 and statements[0].lstrip().upper().startswith("SELECT")
    assert [p.explained for p in second] == [True, True, True, True, False, False]
    assert sorted(decoded) == sorted([b"not an image at all", (folder / "new.jpg").read_bytes()])
    assert second[-1].x is not None and (second[-1].width, second[-1].height) == (600, 450)
    assert "not an image" in second[4].error
    assert all(p.data is None for p in second)  # no file bytes outlive the batch's decoding
    assert (first[0].width, first[0].height) == (640, 480) and first[0].x.shape == (3, 224, 224)


def test_the_device_path_sorts_a_batch_image_by_image(processor, smooth_rgb, encode_image):
    """``decode_on_device`` run with libjpeg on the CPU: plain JPEGs decoded there even beside one that makes
    the batched call fail; the others left for the host, a cut file failed with its reason."""
    from salient_maps.workers.process import PendingItem, Prepared

    good = photo_jpeg("coffee")
    damaged = good[:600] + b"\xff\xd9" + good[600:]  # an end marker inside the data: libjpeg stops there
    files = {"a.jpg": good, "b.jpg": photo_jpeg("chelsea"), "c.png": encode_image(smooth_rgb(60, 80), "PNG"),
             "cut.jpg": good[: len(good) // 2], "damaged.jpg": damaged}
    batch = {name: Prepared(PendingItem(i, "job", name), data=data) for i, (name, data) in enumerate(files.items())}
    calls: list[int] = []
    real = process.decode_jpegs_on_device

    def counted(jpegs, *a):
        calls.append(len(jpegs))
        if any(data == damaged for data in jpegs):
            raise RuntimeError("nvjpeg: damaged data")  # as nvJPEG fails a whole batch for one bad image
        return real(jpegs, *a)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(process, "decode_jpegs_on_device", counted)
        left = processor.decode_on_device(list(batch.values()))
    assert calls == [3, 1, 1, 1]  # the batch, then one at a time
    assert [p.item.uri for p in left] == ["c.png", "damaged.jpg"]
    for name in ("a.jpg", "b.jpg"):
        assert batch[name].x.shape == (3, 224, 224) and batch[name].data is None
        assert (batch[name].width, batch[name].height) == (640, 480) and batch[name].rgb.shape[1] <= 1024
        # resnet18 follows its weights' transform: resize 256, centre crop 224, bilinear
        assert levels(batch[name].x, full_input(files[name], processor.explainer.model.resizing)).mean() <= DEVICE_MEAN
    assert "truncated JPEG" in batch["cut.jpg"].error


def test_inputs_decoded_on_the_host_stay_there_for_the_engine_to_copy():
    from salient_maps.workers.process import PendingItem, Prepared

    batch = [Prepared(PendingItem(i, "job", "x"), x=torch.rand(3, 8, 8)) for i in range(3)]
    x = stacked_inputs(batch, torch.device("cpu"))
    assert x.device.type == "cpu" and torch.equal(x[2], batch[2].x)


# --- on a CUDA device (skipped without one) --------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_nvjpeg_stays_within_tolerance_of_the_host_path():
    jpegs = [photo_jpeg(name) for name in ("astronaut", "chelsea", "coffee")]
    on_gpu = decode_jpegs_on_device(jpegs, torch.device("cuda"), 224, MEAN, STD, picture_side=256)
    on_cpu = decode_jpegs_on_device(jpegs, torch.device("cpu"), 224, MEAN, STD, picture_side=256)
    for data, (x, picture), (x_cpu, picture_cpu) in zip(jpegs, on_gpu, on_cpu):
        assert x.device.type == "cuda" and isinstance(picture, np.ndarray) and picture.shape == picture_cpu.shape
        diff = levels(x.cpu(), full_input(data))
        assert diff.mean() <= DEVICE_MEAN and np.percentile(diff, 99) <= DEVICE_P99
        assert levels(x.cpu(), x_cpu).mean() <= 0.5  # nvJPEG's IDCT against libjpeg's
        assert np.abs(picture.astype(float) - picture_cpu).mean() <= 1.0


@needs_cuda
def test_a_cuda_batch_decodes_its_jpegs_on_the_device_and_the_rest_on_the_host(tmp_path, smooth_rgb, encode_image):
    from concurrent.futures import ThreadPoolExecutor

    from salient_maps.storage.database import connect
    from salient_maps.storage.job_options import job_spec
    from salient_maps.storage.objects import open_store
    from salient_maps.storage.settings import Settings
    from salient_maps.workers.explainers import load_setup
    from salient_maps.workers.process import PendingItem

    settings = Settings().with_data_dir(tmp_path / "data")
    db = connect(settings.resolved_database_url)
    spec = job_spec(model="resnet18", methods="gradcam", topk=1, batch_size=8)
    store = open_store(settings.resolved_object_store_url)
    processor = load_setup(spec, settings, "cuda").processor(settings, db, store)
    good = photo_jpeg("coffee")
    files = {"a.jpg": good, "b.jpg": photo_jpeg("chelsea"), "c.png": encode_image(smooth_rgb(60, 80), "PNG"),
             "cut.jpg": good[: len(good) // 2], "damaged.jpg": good[:600] + b"\x00" * 400 + good[1000:]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    items = [PendingItem(i, "job", (tmp_path / name).as_uri()) for i, name in enumerate(files)]
    with ThreadPoolExecutor(2) as pool:
        batch = dict(zip(files, processor.prepare_batch(items, pool)))
    assert batch["a.jpg"].x.device.type == batch["b.jpg"].x.device.type == "cuda"  # decoded there
    assert batch["c.png"].x.device.type == "cpu" and batch["c.png"].error is None
    assert "truncated JPEG" in batch["cut.jpg"].error
    damaged = batch["damaged.jpg"]  # nvJPEG refused the batch or decoded it: either way it ends once
    assert damaged.error is not None or damaged.x is not None
    for name in ("a.jpg", "b.jpg"):
        diff = levels(batch[name].x.cpu(), full_input(files[name]))
        assert diff.mean() <= DEVICE_MEAN and (batch[name].width, batch[name].height) == (640, 480)
    x = stacked_inputs([batch["a.jpg"], batch["c.png"]], torch.device("cuda"))  # mixed: the batch goes to the device
    assert x.device.type == "cuda" and torch.equal(x[1].cpu(), batch["c.png"].x)
