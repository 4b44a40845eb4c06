"""Every kind of image file decodes to RGB uint8 H×W×3, or fails with a reason a person can act on."""

from __future__ import annotations

import io
import os
import struct
import threading
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from salient_maps.storage.sources import SourceError, iter_uris, read_uri
from salient_maps.workers import images
from salient_maps.workers.images import decode_image, stack_inputs, to_input

LIMIT = 40_000_000


def decode(data: bytes, max_pixels: int = LIMIT) -> np.ndarray:
    rgb = decode_image(data, max_pixels)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    return rgb


def pil_rgb(data: bytes) -> np.ndarray:
    """Pillow's own first-frame RGB conversion, as the independent reference."""
    with Image.open(io.BytesIO(data)) as im:
        im.seek(0)
        return np.asarray(im.convert("RGB"))


def save_all(frames: list[np.ndarray], fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    first, *rest = [Image.fromarray(f) for f in frames]
    if fmt == "GIF":
        first, rest = first.quantize(32), [r.quantize(32) for r in rest]
    first.save(buf, fmt, save_all=True, append_images=rest, **options)
    return buf.getvalue()


@pytest.fixture
def pillow_only(monkeypatch):
    """Force the Pillow fallback, as if OpenCV had refused the file."""
    monkeypatch.setattr(images.cv2, "imdecode", lambda *_a, **_k: None)


# --- files that decode -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["png", "bmp", "tiff", "webp-lossless", "ppm"])
def test_lossless_formats_give_the_exact_pixels(kind, smooth_rgb, encode_image):
    rgb = smooth_rgb(30, 40)
    fmt, options = {"png": ("PNG", {}), "bmp": ("BMP", {}), "tiff": ("TIFF", {}), "ppm": ("PPM", {}),
                    "webp-lossless": ("WEBP", {"lossless": True})}[kind]
    np.testing.assert_array_equal(decode(encode_image(rgb, fmt, **options)), rgb)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_lossy_formats_stay_close_to_the_original(fmt, smooth_rgb, encode_image):
    rgb = smooth_rgb(64, 80)
    out = decode(encode_image(rgb, fmt, quality=95))
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb).mean() < 4  # channel order swapped would be ~60


def test_grayscale_becomes_three_equal_channels(smooth_rgb, encode_image):
    grey = smooth_rgb(30, 40)[..., 1]
    out = decode(encode_image(grey, "PNG"))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_one_bit_and_grey_alpha_pngs(smooth_rgb, encode_image):
    grey = smooth_rgb(30, 40)[..., 0]
    bits = encode_image(grey > 127, "PNG")
    np.testing.assert_array_equal(decode(bits)[..., 0], np.where(grey > 127, 255, 0))
    la = io.BytesIO()
    Image.fromarray(grey).convert("LA").save(la, "PNG")
    np.testing.assert_array_equal(decode(la.getvalue())[..., 2], grey)


def test_rgba_drops_alpha_and_keeps_colours(smooth_rgb, encode_image):
    rgb = smooth_rgb(30, 40)
    alpha = np.zeros((30, 40), np.uint8)  # fully transparent: colours must still come through, not black
    np.testing.assert_array_equal(decode(encode_image(np.dstack([rgb, alpha]), "PNG")), rgb)


@pytest.mark.parametrize("transparency", [None, 0])
def test_palette_png_matches_its_palette_colours(transparency, smooth_rgb):
    buf = io.BytesIO()
    options = {} if transparency is None else {"transparency": transparency}
    Image.fromarray(smooth_rgb(30, 40)).quantize(16).save(buf, "PNG", **options)
    np.testing.assert_array_equal(decode(buf.getvalue()), pil_rgb(buf.getvalue()))


def sixteen_bit_pattern() -> np.ndarray:
    """Values where scaling (v/257), clipping (min(v, 255)) and keeping the low byte (v & 255) all differ."""
    values = np.array([0, 255, 256, 0x1234, 0x80FF, 0xABCD, 0xFF00, 65535], np.uint16)
    return np.tile(values, (4, 1))


def assert_scaled_16_to_8(out: np.ndarray, source: np.ndarray) -> None:
    expected = source.astype(np.float64) / 257
    for c in range(3):
        assert np.abs(out[..., c] - expected).max() <= 1.0, (out[0, :, c], expected[0])
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_grey_is_scaled_not_clipped(fmt, encode_image):
    grey = sixteen_bit_pattern()
    assert_scaled_16_to_8(decode(encode_image(grey, fmt)), grey)


@pytest.mark.parametrize("ext", [".png", ".tiff"])
def test_sixteen_bit_colour_is_scaled(ext):
    grey = sixteen_bit_pattern()
    ok, data = cv2.imencode(ext, np.dstack([grey, grey, grey]))
    assert ok
    assert_scaled_16_to_8(decode(data.tobytes()), grey)


def test_sixteen_bit_is_scaled_in_the_pillow_fallback_too(pillow_only, encode_image):
    grey = sixteen_bit_pattern()
    assert_scaled_16_to_8(decode(encode_image(grey, "PNG")), grey)


def test_cmyk_jpeg_converts_like_pillow(smooth_rgb):
    buf = io.BytesIO()
    Image.fromarray(smooth_rgb(40, 48)).convert("CMYK").save(buf, "JPEG", quality=95)
    out = decode(buf.getvalue())
    assert np.abs(out.astype(int) - pil_rgb(buf.getvalue())).max() <= 2


@pytest.mark.parametrize("fmt", ["TIFF", "GIF"])
def test_multi_frame_files_give_the_first_frame(fmt, smooth_rgb):
    first, second = smooth_rgb(30, 40, seed=1), smooth_rgb(30, 40, seed=2)
    data = save_all([first, second], fmt)
    with Image.open(io.BytesIO(data)) as im:
        assert im.n_frames == 2
    out = decode(data)
    np.testing.assert_array_equal(out, pil_rgb(data))  # Pillow's frame 0
    if fmt == "TIFF":
        np.testing.assert_array_equal(out, first)


def exif_rotated_jpeg(orientation: int) -> tuple[bytes, np.ndarray]:
    """A 20×40 (h×w) stored JPEG with a red 8×8 block in its stored top-left corner."""
    stored = np.full((20, 40, 3), 128, np.uint8)
    stored[:8, :8] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue(), stored


def red_corner(rgb: np.ndarray) -> str:
    h, w = rgb.shape[:2]
    corners = {"top-left": rgb[:4, :4], "top-right": rgb[:4, w - 4:],
               "bottom-left": rgb[h - 4:, :4], "bottom-right": rgb[h - 4:, w - 4:]}
    red = [name for name, patch in corners.items() if patch[..., 0].mean() > 200 and patch[..., 1].mean() < 60]
    assert len(red) == 1, red
    return red[0]


@pytest.mark.parametrize("orientation, shape, corner", [
    (1, (20, 40), "top-left"),
    (3, (20, 40), "bottom-right"),   # rotated 180°
    (6, (40, 20), "top-right"),      # displayed turned 90° clockwise
    (8, (40, 20), "bottom-left"),    # displayed turned 90° counter-clockwise
])
@pytest.mark.parametrize("path", ["opencv", "pillow"])
def test_exif_orientation_is_applied(orientation, shape, corner, path, monkeypatch):
    if path == "pillow":
        monkeypatch.setattr(images.cv2, "imdecode", lambda *_a, **_k: None)
    data, _ = exif_rotated_jpeg(orientation)
    out = decode(data)
    assert out.shape[:2] == shape
    assert red_corner(out) == corner
    with Image.open(io.BytesIO(data)) as im:  # independent reference
        reference = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert np.abs(out.astype(int) - reference).mean() < 3


@pytest.mark.parametrize("shape", [(1, 1), (1, 5000), (5000, 1)])
def test_degenerate_sizes_decode_and_become_model_input(shape, encode_image):
    rgb = np.full((*shape, 3), (10, 200, 30), np.uint8)
    out = decode(encode_image(rgb, "PNG"))
    np.testing.assert_array_equal(out, rgb)
    x = to_input(out, 64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert x.shape == (3, 64, 64) and x.dtype.is_floating_point
    np.testing.assert_allclose(x[:, 10, 10].numpy(), (np.array([10, 200, 30]) / 255 - 0.5) / 0.25, atol=1e-5)


def test_to_input_normalises_the_whole_image_without_cropping():
    rgb = np.zeros((50, 100, 3), np.uint8)
    rgb[:, 95:] = 255  # a white strip at the far right must survive (a centre crop would cut it)
    x = to_input(rgb, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert x.shape == (3, 32, 32)
    assert x[:, :, -1].min() > 0.9 and x[:, :, 0].max() == 0


def test_inputs_are_channels_last_and_stack_into_a_channels_last_batch():
    rgb = np.random.default_rng(4).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    xs = [to_input(np.roll(rgb, k, axis=1), 24, mean, std) for k in range(3)]
    scaled = cv2.resize(rgb, (24, 24), interpolation=cv2.INTER_AREA).astype(np.float32)
    expected = (scaled / 255 - np.array(mean, np.float32)) / np.array(std, np.float32)  # per channel, H×W×3
    np.testing.assert_allclose(xs[0].permute(1, 2, 0).numpy(), expected, rtol=0, atol=1e-5)
    batch = stack_inputs(xs)
    assert xs[0].shape == (3, 24, 24) and batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack([x.contiguous() for x in xs]))
    plain = stack_inputs([x.contiguous() for x in xs])  # inputs of another layout stack as they are
    assert plain.is_contiguous() and torch.equal(plain, batch)


# --- files that must fail, with a reason ------------------------------------------------------------------------


@pytest.mark.parametrize("data, reason", [
    (b"hello, I am a text file\n" * 20, "not an image"),
    (b"\x00" * 1000, "not an image"),
    (b"\x89PNX\r\n\x1a\n" + b"\x00" * 200, "not an image"),
])
def test_non_images_fail_with_a_reason(data, reason):
    with pytest.raises(SourceError, match=reason):
        decode_image(data, LIMIT)


def test_corrupt_headers_fail_with_a_reason(smooth_rgb, encode_image):
    png = bytearray(encode_image(smooth_rgb(30, 40), "PNG"))
    png[16:24] = b"\xff" * 8  # IHDR width/height garbage (and now a wrong CRC)
    jpeg = bytearray(encode_image(smooth_rgb(30, 40), "JPEG"))
    jpeg[2:40] = b"\x00" * 38  # the markers after SOI are gone
    for data in (bytes(png), bytes(jpeg)):
        with pytest.raises(SourceError, match="not an image|could not decode"):
            decode_image(data, LIMIT)


@pytest.mark.parametrize("fmt, options", [
    ("JPEG", {"quality": 90}), ("JPEG", {"quality": 90, "progressive": True}), ("PNG", {}),
    ("WEBP", {"quality": 80}), ("WEBP", {"lossless": True}), ("TIFF", {}), ("TIFF", {"compression": "tiff_deflate"}),
    ("BMP", {}), ("GIF", {}),
])
def test_truncated_files_fail_at_every_cut(fmt, options, smooth_rgb, encode_image):
    # 120×160 PNG is several IDAT chunks: cuts land inside and between them. Every reason says "truncated"
    # (JPEG, PNG and WebP by their end markers; the rest as "corrupt or truncated").
    data = encode_image(smooth_rgb(120, 160), fmt, **options)
    whole = decode(data)
    last = len(data) - 1
    if fmt == "GIF":  # without its last block terminator and trailer bytes a GIF still holds every pixel
        for missing in (1, 2):
            np.testing.assert_array_equal(decode(data[:-missing]), whole)
        last -= 2
    cuts = sorted({*np.linspace(1, last, 60).astype(int).tolist(), last, last - 1, 8, 30})
    for cut in cuts:
        with pytest.raises(SourceError, match="truncated"):
            decode_image(data[:cut], LIMIT)


def test_truncated_jpeg_is_refused_even_in_the_pillow_fallback(pillow_only, smooth_rgb, encode_image):
    data = encode_image(smooth_rgb(60, 80), "JPEG")
    with pytest.raises(SourceError, match="truncated JPEG"):
        decode_image(data[: len(data) * 2 // 3], LIMIT)


def test_truncated_jpeg_with_a_complete_thumbnail_inside_is_refused(smooth_rgb, encode_image):
    """An EXIF thumbnail is a whole JPEG (with its own end marker) inside the header: the file's last end marker
    must come after its last start-of-scan, not merely exist."""
    thumbnail = encode_image(smooth_rgb(16, 16, seed=1), "JPEG")
    app1 = b"Exif\x00\x00" + thumbnail
    main = encode_image(smooth_rgb(120, 160), "JPEG")
    data = main[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + main[2:]
    assert decode(data).shape == (120, 160, 3)
    with pytest.raises(SourceError, match="truncated JPEG"):
        decode_image(data[: len(data) - len(main) // 2], LIMIT)


def test_bytes_after_the_end_marker_are_fine(smooth_rgb, encode_image):
    """Cameras pad JPEGs with zeros or append data after the end-of-image marker; the picture is whole."""
    rgb = smooth_rgb(30, 40)
    jpeg = encode_image(rgb, "JPEG", quality=95)
    png = encode_image(rgb, "PNG")
    np.testing.assert_array_equal(decode(jpeg + b"\x00" * 10_000), decode(jpeg))
    np.testing.assert_array_equal(decode(png + b"trailing junk"), rgb)


def png_claiming(width: int, height: int) -> bytes:
    """A structurally valid PNG whose IHDR claims width×height RGB pixels (IDAT holds almost nothing)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


def test_pixel_bomb_is_refused_from_the_header_without_decoding(monkeypatch):
    data = png_claiming(100_000, 100_000)
    with Image.open(io.BytesIO(data)) as im:  # the hand-built header is well-formed
        assert im.size == (100_000, 100_000)

    decoded = []

    def must_not_decode(*_args, **_kwargs):
        decoded.append(True)  # also when the raise below is caught on the way
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(images.cv2, "imdecode", must_not_decode)
    monkeypatch.setattr(Image.Image, "load", must_not_decode)
    monkeypatch.setattr(Image.Image, "convert", must_not_decode)
    tracemalloc.start()
    try:
        with pytest.raises(SourceError, match=r"100000x100000 = 10000000000 pixels, over the limit"):
            decode_image(data, LIMIT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # well under one row of the claimed image (300 kB) times a few
    assert not decoded


def test_pixel_limit_is_inclusive_and_exact(smooth_rgb, encode_image):
    data = encode_image(smooth_rgb(10, 20), "PNG")
    decode(data, max_pixels=200)
    with pytest.raises(SourceError, match="20x10 = 200 pixels, over the limit of 199"):
        decode_image(data, 199)


# --- files on disk ------------------------------------------------------------------------------------------------


def uri_of(path: Path) -> str:
    [uri] = list(iter_uris([str(path)]))
    return uri


def read_and_decode(path: Path, max_bytes: int = 1 << 26) -> np.ndarray:
    return decode(read_uri(uri_of(path), max_bytes))


def test_content_decides_the_format_not_the_name(tmp_path, smooth_rgb, encode_image):
    rgb = smooth_rgb(30, 40)
    (tmp_path / "really-a-png.jpg").write_bytes(encode_image(rgb, "PNG"))
    (tmp_path / "really-a-jpeg.png").write_bytes(encode_image(rgb, "JPEG", quality=95))
    np.testing.assert_array_equal(read_and_decode(tmp_path / "really-a-png.jpg"), rgb)
    assert np.abs(read_and_decode(tmp_path / "really-a-jpeg.png").astype(int) - rgb).mean() < 4


@pytest.mark.parametrize("name", ["with space.png", "ünïcödé 图片.png", "odd #1 %20 ?.png", "-leading-dash.png"])
def test_unusual_names_round_trip_through_uris(name, tmp_path, smooth_rgb, encode_image):
    rgb = smooth_rgb(10, 12)
    (tmp_path / name).write_bytes(encode_image(rgb, "PNG"))
    [uri] = list(iter_uris([str(tmp_path)]))
    assert uri.startswith("file://") and " " not in uri
    np.testing.assert_array_equal(decode(read_uri(uri, 1 << 20)), rgb)


def test_non_utf8_file_name_is_readable(tmp_path, smooth_rgb, encode_image):
    # Linux names are bytes; a Latin-1 name (as old cameras and zip files make) is not valid UTF-8.
    raw = os.fsencode(tmp_path) + b"/caf\xe9.png"
    with open(raw, "wb") as f:
        f.write(encode_image(smooth_rgb(10, 12), "PNG"))
    [uri] = list(iter_uris([str(tmp_path)]))
    assert decode(read_uri(uri, 1 << 20)).shape == (10, 12, 3)


def test_empty_file_fails(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(SourceError, match="empty file"):
        read_uri(uri_of(tmp_path / "empty.jpg"), 1 << 20)


def test_file_over_the_byte_limit_fails_before_reading(tmp_path):
    (tmp_path / "big.png").write_bytes(b"\x00" * 5000)
    with pytest.raises(SourceError, match="5000 bytes, over the limit of 4999"):
        read_uri(uri_of(tmp_path / "big.png"), 4999)
    assert read_uri(uri_of(tmp_path / "big.png"), 5000) == b"\x00" * 5000


def test_directory_named_like_an_image(tmp_path, smooth_rgb, encode_image):
    folder = tmp_path / "x.jpg"
    folder.mkdir()
    (folder / "inside.png").write_bytes(encode_image(smooth_rgb(10, 12), "PNG"))
    # a walk lists what is inside, never the folder itself
    assert [Path(u).name for u in iter_uris([str(tmp_path)])] == ["inside.png"]
    with pytest.raises(SourceError, match="is a directory"):
        read_uri(folder.as_uri(), 1 << 20)


def test_broken_symlink_and_symlink_loop_fail_per_item(tmp_path):
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "missing.jpg")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    uris = dict(zip(["broken.jpg", "loop.png"], iter_uris([str(tmp_path)])))
    assert set(uris) == {"broken.jpg", "loop.png"}
    with pytest.raises(SourceError, match="broken symlink"):
        read_uri(uris["broken.jpg"], 1 << 20)
    with pytest.raises(SourceError, match="cannot read file: Too many levels of symbolic links"):
        read_uri(uris["loop.png"], 1 << 20)


def test_fifo_named_like_an_image_does_not_block(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    outcome: list[BaseException | bytes] = []

    def read() -> None:
        try:
            outcome.append(read_uri(fifo.as_uri(), 1 << 20))
        except BaseException as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=2)
    if reader.is_alive():  # blocked waiting for a writer: release it so the test run can end
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=2)
        pytest.fail("read_uri blocked on a FIFO")
    assert isinstance(outcome[0], SourceError) and "not a regular file" in str(outcome[0])


def test_missing_source_and_unknown_scheme_are_reported(tmp_path):
    with pytest.raises(SourceError, match="source not found"):
        list(iter_uris([str(tmp_path / "nope")]))
    with pytest.raises(SourceError, match="unsupported URI scheme 'ftp'"):
        read_uri("ftp://host/x.jpg", 1 << 20)


def test_folder_walk_is_sorted_recursive_and_filters_suffixes(tmp_path):
    for rel in ["b/2.PNG", "b/1.jpeg", "a.gif", "notes.txt", "c.webp", "b/sub/0.tif"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    names = [u.removeprefix(tmp_path.as_uri() + "/") for u in iter_uris([str(tmp_path)])]
    assert names == ["a.gif", "c.webp", "b/1.jpeg", "b/2.PNG", "b/sub/0.tif"]
