"""--localize: a map seeds GrabCut; the box and mask land in the explanation's record."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from sqlalchemy import select

from salient_maps.storage.database import Explanation, Job, connect
from salient_maps.storage.maps import MapReader
from salient_maps.storage.results import iter_results
from salient_maps.storage.settings import Settings
from salient_maps.workers.localization import WORK_SIDE, localize

SQUARE = (260, 150, 420, 290)  # x0, y0, x1, y1 in a 480×640 image (larger than GrabCut's working size)


def textured_scene(seed: int = 0) -> np.ndarray:
    """Dark blurred noise with a bright, noisy square at ``SQUARE``."""
    rng = np.random.default_rng(seed)
    rgb = cv2.GaussianBlur(rng.integers(0, 120, size=(480, 640, 3)).astype(np.uint8), (5, 5), 1.5)
    x0, y0, x1, y1 = SQUARE
    rgb[y0:y1, x0:x1] = np.clip(rng.normal(215, 15, size=(y1 - y0, x1 - x0, 3)), 0, 255).astype(np.uint8)
    return rgb


def peaked_map(size: int = 224, spread: float = 30, seed: int = 0) -> np.ndarray:
    """A map of the whole (resized) image: a Gaussian bump on the square's centre plus noise."""
    rng = np.random.default_rng(seed)
    x0, y0, x1, y1 = SQUARE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = (x0 + x1) / 2 / 640 * size, (y0 + y1) / 2 / 480 * size
    bump = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * spread ** 2))
    return (bump + rng.uniform(0, 0.2, (size, size))).astype(np.float32)


def iou(a, b) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("spread", [20, 30, 45])
def test_box_from_a_peaked_map_finds_the_square_in_original_pixels(spread):
    rgb = textured_scene()
    assert max(rgb.shape[:2]) > WORK_SIDE
    found = localize(rgb, peaked_map(spread=spread))
    assert found is not None
    assert iou(found.bbox, SQUARE) > 0.7, found.bbox
    assert found.mask.shape == rgb.shape[:2] and found.mask.dtype == bool
    x0, y0, x1, y1 = SQUARE
    inside = found.mask[y0:y1, x0:x1].mean()
    outside = (found.mask.sum() - found.mask[y0:y1, x0:x1].sum()) / (found.mask.size - (x1 - x0) * (y1 - y0))
    assert inside > 0.7 and outside < 0.05


def test_same_input_same_box_and_a_flat_map_gives_none():
    rgb, heat = textured_scene(1), peaked_map(seed=1)
    first, second = localize(rgb, heat), localize(rgb, heat)
    assert first.bbox == second.bbox and np.array_equal(first.mask, second.mask)
    assert localize(rgb, np.zeros((224, 224), np.float32)) is None


def test_run_with_localize_stores_box_and_mask_and_is_its_own_result(tmp_path, run_cli):
    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "scene.png"), cv2.cvtColor(textured_scene(), cv2.COLOR_RGB2BGR))
    out = tmp_path / "out"
    common = [folder, "--model", "resnet18", "--methods", "saliency", "--topk", "1", "--out", out, "--device", "cpu"]
    run_cli(["run", *common])
    result = run_cli(["run", *common, "--localize"])
    assert "done 1" in result.output  # not skipped as already explained: localisation is part of the identity
    db = connect(f"sqlite:///{out / 'salient.db'}")
    with db.connect() as conn:
        extras = [row[0] for row in conn.execute(select(Explanation.extra))]
    extras = [e if isinstance(e, dict) else json.loads(e) if e else {} for e in extras]
    located = [e["localization"] for e in extras if "localization" in e]
    assert len(extras) == 2 and len(located) == 1 and set(located[0]) == {"bbox"}
    x0, y0, x1, y1 = located[0]["bbox"]
    assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480
    # the mask lies in the batch's shard: the store holds the two runs' shards and nothing else
    objects = sorted(p.relative_to(out / "objects").parts[0] for p in (out / "objects").rglob("*") if p.is_file())
    assert objects == ["shards", "shards"]
    settings = Settings().with_data_dir(out)
    [record] = iter_results(settings, None)
    assert record["localization_box"] == located[0]["bbox"]
    assert record["localization_mask"] == f"saliency.localization_mask.{record['slot']}"
    png = MapReader.for_settings(settings).localization_mask_png(record)
    mask = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (480, 640) and set(np.unique(mask)) == {0, 255}
    # the box is the bounding box of the mask's largest blob (one step of GrabCut's working scale: 640/256)
    count, _, stats, _ = cv2.connectedComponentsWithStats((mask == 255).astype(np.uint8), connectivity=8)
    x, y, w, h = stats[1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])), :4]
    assert np.abs(np.array([x, y, x + w, y + h]) - located[0]["bbox"]).max() <= 3, (x, y, w, h)
    # safetensors reads it without salient
    from safetensors.numpy import load
    tensors = load((out / "objects" / record["shard"]).read_bytes())
    assert tensors[record["localization_mask"]].tobytes() == png
    # and the HTTP API serves it
    from fastapi.testclient import TestClient

    from salient_maps.producer.api import create_app
    client = TestClient(create_app(settings, insecure_no_auth=True))
    answer = client.get(f"/jobs/{record['job_id']}/localization_mask",
                        params={"sha256": record["sha256"], "method": "saliency", "class_id": record["class_id"]})
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png" and answer.content == png
    exported = tmp_path / "maps"
    run_cli(["maps", "--data", out, "--out", exported])
    [written] = exported.rglob("*.localization_mask.png")
    assert written.read_bytes() == png
    [first] = iter_results(settings, run_id_of_first(out))
    assert first["localization_mask"] is None and first["localization_box"] is None
    with pytest.raises(LookupError, match="no localisation mask"):
        MapReader.for_settings(settings).localization_mask_png(first)


def run_id_of_first(out) -> str:
    db = connect(f"sqlite:///{out / 'salient.db'}")
    with db.connect() as conn:
        return conn.execute(select(Job.id).order_by(Job.created_at)).scalars().first()
