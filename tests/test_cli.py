"""``salient run`` end to end on a folder of good and bad images, its records, objects and an idempotent rerun,
and a demo-like run of the bundled trained model whose Grad-CAM must land on the cat's face."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import struct
import zlib
from pathlib import Path
from urllib.parse import unquote_to_bytes, urlparse

import cv2
import numpy as np
import pytest
from safetensors import safe_open
from sqlalchemy import func, select

from salient_maps.storage.database import Explanation, Image, Item, Shard, connect
from salient_maps.storage.maps import MapReader
from salient_maps.storage.objects import LocalObjectStore
from salient_maps.storage.results import FIELDS
from salient_maps.storage.settings import Settings
from salient_maps.workers import process

REQUIRED_FIELDS = ("job_id", "uri", "sha256", "model", "method", "method_params", "layer", "class_id", "class_name",
                   "score", "rank", "shard", "slot", "status", "error", "seconds")
SUMMARY = re.compile(r"job (?P<job>[0-9a-f-]{36}): done (?P<done>\d+), failed (?P<failed>\d+), "
                     r"skipped (?P<skipped>\d+) in ")
BYTE_LIMIT = 200_000
TOPK = 3
METHODS = ("gradcam", "saliency")

# file name -> the words its failure reason must contain
BAD = {
    "empty.jpg": "empty file",
    "notes.jpg": "not an image",
    "cut.jpg": "truncated JPEG",
    "cut.png": "truncated PNG",
    "cut.webp": "truncated WebP",
    "bomb.png": "100000x100000 = 10000000000 pixels, over the limit",
    "heavy.png": f"over the limit of {BYTE_LIMIT}",
    "dangling.jpg": "broken symlink",
    "pipe.jpg": "not a regular file",
}


def png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def build_folder(folder: Path, smooth_rgb, encode_image) -> dict[str, tuple[int, int]]:
    """Adds the odd and the bad files to a folder of 10 good images; returns every good file's (h, w)."""
    good = {p.name: cv2.imread(str(p)).shape[:2] for p in folder.iterdir()}
    picture = smooth_rgb(40, 30, seed=99)
    (folder / "png-named.jpg").write_bytes(encode_image(picture, "PNG"))
    (folder / "jpeg-named.png").write_bytes(encode_image(picture, "JPEG", quality=90))
    (folder / "spaced ünïcode.png").write_bytes(encode_image(smooth_rgb(20, 50, seed=98), "PNG"))
    shutil.copy(folder / "img000.png", folder / "duplicate.png")  # same bytes: explained once
    (folder / "looks-like.jpg").mkdir()  # a folder named like an image is walked into, never read
    (folder / "looks-like.jpg" / "inside.png").write_bytes(encode_image(smooth_rgb(24, 24, seed=97), "PNG"))
    good.update({"png-named.jpg": (40, 30), "jpeg-named.png": (40, 30), "spaced ünïcode.png": (20, 50),
                 "duplicate.png": good["img000.png"], "inside.png": (24, 24)})

    jpeg, png = encode_image(smooth_rgb(60, 80, seed=5), "JPEG"), encode_image(smooth_rgb(60, 80, seed=6), "PNG")
    webp = encode_image(smooth_rgb(60, 80, seed=7), "WEBP")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("shopping list\n" * 10)
    (folder / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "cut.png").write_bytes(png[:-20])
    (folder / "cut.webp").write_bytes(webp[: len(webp) - 10])
    (folder / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    (folder / "heavy.png").write_bytes(png + os.urandom(BYTE_LIMIT))  # valid, but over the byte limit
    (folder / "dangling.jpg").symlink_to(folder / "gone.jpg")
    os.mkfifo(folder / "pipe.jpg")
    return good


def path_of(uri: str) -> Path:
    return Path(os.fsdecode(unquote_to_bytes(urlparse(uri).path)))


def object_listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def counts(db_url: str) -> tuple[int, int]:
    db = connect(db_url)
    with db.connect() as conn:
        return (conn.execute(select(func.count()).select_from(Explanation)).scalar(),
                conn.execute(select(func.count()).select_from(Image)).scalar())


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_images, run_cli, smooth_rgb, encode_image):
    folder = tiny_images(10)
    good = build_folder(folder, smooth_rgb, encode_image)
    out = tmp_path_factory.mktemp("run") / "data"
    args = ["run", folder, "--model", "resnet18", "--batch-size", "4", "--topk", TOPK,
            "--methods", ",".join(METHODS), "--device", "cpu", "--out", out]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SALIENT_MAX_IMAGE_BYTES", str(BYTE_LIMIT))
        first = run_cli(args)
        listing, db_counts = object_listing(out / "objects"), counts(f"sqlite:///{out / 'salient.db'}")
        decoded: list[str] = []  # sha256 of what the rerun decodes
        real_decode = process.decode_scaled
        patch.setattr(process, "decode_scaled",
                      lambda data, *a: decoded.append(hashlib.sha256(data).hexdigest()) or real_decode(data, *a))
        second = run_cli(args)
    return {"good": good, "out": out, "first": first.output, "second": second.output,
            "listing": listing, "counts": db_counts, "decoded_on_rerun": decoded}


def summary(output: str) -> dict[str, str]:
    found = SUMMARY.search(output)
    assert found, output
    return found.groupdict()


def test_summary_counts_every_image(run):
    first = summary(run["first"])
    explained = int(first["done"]) + int(first["skipped"])  # the duplicate is skipped unless in the same batch
    assert (explained, int(first["failed"])) == (len(run["good"]), len(BAD))
    assert int(first["done"]) >= len(run["good"]) - 1


def test_every_item_is_done_or_failed_with_its_reason(run):
    db = connect(f"sqlite:///{run['out'] / 'salient.db'}")
    job = summary(run["first"])["job"]
    with db.connect() as conn:
        items = conn.execute(select(Item.uri, Item.status, Item.error, Item.sha256).where(Item.job_id == job)).all()
    names = {path_of(uri).name: (status, error, sha) for uri, status, error, sha in items}
    assert set(names) == set(run["good"]) | set(BAD)
    for name, words in BAD.items():
        status, error, _ = names[name]
        assert status == "failed" and words in error, (name, error)
    for name in run["good"]:
        status, error, sha = names[name]
        assert status in ("done", "skipped") and error is None and len(sha) == 64, name
    assert names["duplicate.png"][2] == names["img000.png"][2]


def records(run_cli, out: Path, fmt: str, job: str | None = None) -> list[dict]:
    text = run_cli(["results", "--out", out, "--format", fmt, *(["--job", job] if job else [])]).output
    if fmt == "jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return list(csv.DictReader(io.StringIO(text)))


def test_results_have_all_fields_and_objects(run, run_cli):
    out = run["out"]
    rows = records(run_cli, out, "jsonl")
    table = records(run_cli, out, "csv")
    assert len(rows) == len(table)
    assert list(table[0]) == list(FIELDS) and set(REQUIRED_FIELDS) <= set(rows[0])
    job = summary(run["second"])["job"]  # the latest job: the rerun, whose images were all explained before
    assert {r["job_id"] for r in rows} == {job}
    done = [r for r in rows if r["status"] == "done"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(done) == len(run["good"]) * TOPK * len(METHODS) and len(failed) == len(BAD)
    assert all(r["error"] and r["shard"] is None for r in failed)

    reader = MapReader(LocalObjectStore(out / "objects"))
    for r in done:
        assert r["model"].startswith("resnet18-") and r["layer"] == "layer4"
        assert r["method"] in METHODS  # the plain name; its options in method_params
        assert isinstance(r["method_params"], dict)
        assert 1 <= r["rank"] <= TOPK and 0 < r["score"] <= 1 and r["seconds"] > 0
        assert r["error"] is None and r["class_name"]
        path = path_of(r["uri"])
        assert hashlib.sha256(path.read_bytes()).hexdigest() == r["sha256"]
        heat = reader.map(r)
        assert heat.dtype == np.float32 and heat.shape == (224, 224)
        assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1
        picture = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        overlay = cv2.imdecode(np.frombuffer(reader.overlay_png(r, picture=picture), np.uint8), cv2.IMREAD_COLOR)
        assert overlay.shape[:2] == run["good"][path.name], path.name  # drawn on demand on the original picture
    for image in {r["sha256"] for r in done}:
        scores = [(r["rank"], r["score"]) for r in done if r["sha256"] == image and r["method"] == "gradcam"]
        assert [s for _, s in sorted(scores)] == sorted((s for _, s in scores), reverse=True)


def test_the_first_run_and_the_rerun_report_the_same_explanations(run, run_cli):
    def explained(job: str) -> set[tuple]:
        return {(r["uri"], r["method"], r["class_id"], r["shard"], r["slot"])
                for r in records(run_cli, run["out"], "jsonl", job) if r["status"] == "done"}

    first, second = explained(summary(run["first"])["job"]), explained(summary(run["second"])["job"])
    assert first == second and len(first) == len(run["good"]) * TOPK * len(METHODS)


def test_one_shard_per_batch_keeps_layer_maps_and_the_raw_gradient_only(run):
    """gradcam at the layer's 7×7 in float32, saliency's raw gradient in float16 (its renderings and map are
    derived on read), a thumbnail per image; no other object."""
    objects = run["out"] / "objects"
    assert {p.parts[0] for p in (q.relative_to(objects) for q in objects.rglob("*") if q.is_file())} == {"shards"}
    db = connect(f"sqlite:///{run['out'] / 'salient.db'}")
    with db.connect() as conn:
        keys = conn.execute(select(Shard.key)).scalars().all()
    assert len(keys) == len(list(objects.rglob("*.safetensors")))
    for key in keys:
        with safe_open(str(objects / key), "np") as f:  # the reference reader: no salient needed
            names = set(f.keys())
            thumbnails = {n for n in names if n.startswith("thumbnail.")}
            assert names - thumbnails == {"gradcam.layer", "saliency.gradient"}
            n = len(thumbnails)
            assert f.get_tensor("gradcam.layer").dtype == np.float32
            assert f.get_tensor("gradcam.layer").shape == (n * TOPK, 7, 7)
            assert f.get_tensor("saliency.gradient").dtype == np.float16
            assert f.get_tensor("saliency.gradient").shape == (n * TOPK, 3, 224, 224)


def test_rerun_adds_nothing(run):
    db = connect(f"sqlite:///{run['out'] / 'salient.db'}")
    with db.connect() as conn:
        explained = set(conn.execute(select(Item.sha256).where(Item.status == "done")).scalars())
    assert explained and not explained & set(run["decoded_on_rerun"])  # read and hashed, never decoded again
    second = summary(run["second"])
    assert (int(second["done"]), int(second["failed"]), int(second["skipped"])) == (0, len(BAD), len(run["good"]))
    assert counts(f"sqlite:///{run['out'] / 'salient.db'}") == run["counts"]
    assert object_listing(run["out"] / "objects") == run["listing"]  # nothing new, nothing rewritten


def test_bundled_model_looks_at_the_cats_face(tmp_path, run_cli):
    """chelsea (451×300): Grad-CAM for class 285 peaks inside a box around the face (eyes, cheeks, nose),
    and the box holds far more of the map than the rest of the picture."""
    import skimage.data

    folder = tmp_path / "cat"
    folder.mkdir()
    cv2.imwrite(str(folder / "chelsea.png"), cv2.cvtColor(skimage.data.chelsea(), cv2.COLOR_RGB2BGR))
    out = tmp_path / "data"
    run_cli(["run", folder, "--classes", "285", "--methods", "gradcam", "--device", "cpu", "--out", out])
    [row] = records(run_cli, out, "jsonl")
    assert (row["class_id"], row["rank"]) == (285, 1) and row["score"] > 0.7
    heat = cv2.resize(MapReader(LocalObjectStore(out / "objects")).map(row), (451, 300))
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    box = (slice(30, 250), slice(60, 330))  # y, x: from above the eyes to below the nose, ear to ear
    assert 30 <= y < 250 and 60 <= x < 330, (x, y)
    inside = np.zeros(heat.shape, bool)
    inside[box] = True
    assert heat[inside].mean() > 2.5 * heat[~inside].mean()  # measured 0.70 vs 0.20


def test_maps_writes_each_map_as_the_reader_returns_it_and_show_draws_one_overlay(run, run_cli, tmp_path):
    out = run["out"]
    rows = [r for r in records(run_cli, out, "jsonl") if r["status"] == "done" and r["method"]]
    reader = MapReader.for_settings(Settings().with_data_dir(out))
    written = run_cli(["maps", "--out", tmp_path / "maps", "--data", out]).output
    files = sorted((tmp_path / "maps").rglob("*.npy"))
    assert f"{len(files)} maps" in written and len(files) == len(rows)
    for row in rows:
        stem = f"{path_of(row['uri']).stem}-{row['sha256'][:8]}"
        saved = np.load(tmp_path / "maps" / stem / row["method"] / f"{row['class_id']}.npy")
        np.testing.assert_array_equal(saved, reader.map(row))
    gradcam = next(r for r in rows if r["method"] == "gradcam" and r["rank"] == 1)
    name = path_of(gradcam["uri"]).name
    printed = run_cli(["show", name, "--method", "gradcam", "--data", out]).output
    assert "map 7×7 as computed" in printed
    png = tmp_path / "one.png"
    run_cli(["show", name, "--method", "gradcam", "--out", png, "--data", out])
    overlay = cv2.imread(str(png))
    original = cv2.imread(str(path_of(gradcam["uri"])))
    assert overlay.shape == original.shape and not np.array_equal(overlay, original)
    missing = run_cli(["show", "nothing.png", "--data", out], expect_exit=1).output
    assert "no record of 'nothing.png'" in missing
