"""Ground truth from a manifest through `salient run`: items keep it, bad ground truth fails its item once with the
reason, the label is explained and judged (``label``, ``correct``), and every explanation carries its localisation
metrics, checked against an independent supersampled computation on the stored map."""

from __future__ import annotations

import json
import re

import cv2
import numpy as np
from sqlalchemy import select

from salient_maps.storage.database import Item, Job, add_items, connect, create_job, record_items
from salient_maps.storage.maps import MapReader
from salient_maps.storage.objects import open_store
from salient_maps.storage.sources import Entry

WIDTH, HEIGHT, INPUT = 60, 40, 32  # a non-square image squeezed into a square input


def test_entries_with_a_problem_fail_once_at_listing(tmp_path):
    db = connect(f"sqlite:///{tmp_path / 'db.sqlite'}")
    job = create_job(db, {})
    entries = [Entry("file:///a.png", {"label": 3}), Entry("file:///b.png", None, "bad ground truth: boxes"),
               Entry("file:///b.png", None, "bad ground truth: boxes"), "file:///c.png"]
    new = [row for page in record_items(db, job, entries) for row in page]
    assert [uri for _, uri in new] == ["file:///a.png", "file:///c.png"]  # only pending items go to the queue
    assert add_items(db, job, entries) == 0  # all known: nothing counted twice
    with db.connect() as conn:
        assert conn.execute(select(Job.total, Job.failed)).one() == (3, 1)
        items = {row.uri: row for row in conn.execute(select(Item.uri, Item.status, Item.error, Item.truth))}
    assert items["file:///b.png"].status == "failed" and items["file:///b.png"].error == "bad ground truth: boxes"
    assert items["file:///a.png"].truth == {"label": 3} and items["file:///a.png"].status == "pending"
    with db.connect() as conn:  # no ground truth is SQL NULL, not the JSON value null
        assert conn.execute(select(Item.uri).where(Item.truth.is_(None))).scalars().all() == ["file:///b.png", "file:///c.png"]


def _scene(tmp_path):
    folder = tmp_path / "scene"
    folder.mkdir()
    for i in range(5):
        img = np.full((HEIGHT, WIDTH, 3), 30, np.uint8)
        cv2.rectangle(img, (10 + 3 * i, 5), (29 + 3 * i, 24), (200, 100, 50), -1)
        cv2.imwrite(str(folder / f"img{i}.png"), img)
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[10:30, 20:40] = 255
    cv2.imwrite(str(folder / "mask.png"), mask)
    cv2.imwrite(str(folder / "small.png"), np.zeros((10, 10), np.uint8))
    (folder / "labels.json").write_text(json.dumps(["a", "b", "c", "d"]))
    lines = [{"uri": "img0.png", "label": 1, "boxes": [[10, 5, 30, 25], [50, 30, 58, 38]]},
             {"uri": "img1.png", "label": "C", "mask": "mask.png"},
             {"uri": "img2.png", "label": "nope"},
             {"uri": "img3.png", "label": -1},
             {"uri": "img4.png", "label": 0, "mask": "small.png"}]
    (folder / "truth.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder, mask != 0


def _supersampled_share(heat: np.ndarray, region: np.ndarray, n: int = 16) -> float:
    """Independent of workers/localization_metrics.py: each map cell's footprint sampled at n×n points, each
    point mapped back to its original pixel."""
    h, w = heat.shape
    offsets = (np.arange(n) + 0.5) / n
    xs = ((np.arange(w)[:, None] + offsets).ravel() * WIDTH / w).astype(int)
    ys = ((np.arange(h)[:, None] + offsets).ravel() * HEIGHT / h).astype(int)
    coverage = region[np.ix_(ys, xs)].reshape(h, n, w, n).mean(axis=(1, 3))
    positive = np.clip(heat.astype(np.float64), 0, None)
    return float((positive * coverage).sum() / positive.sum())


def test_run_with_a_manifest_judges_labels_and_measures_the_maps(tmp_path, run_cli):
    folder, mask = _scene(tmp_path)
    out = tmp_path / "out"
    result = run_cli(["run", folder / "truth.jsonl", "--model", "tests/model_factories.py:small_cnn", "--labels",
                      folder / "labels.json", "--input-size", INPUT, "--methods", "gradcam", "--topk", "2",
                      "--with-label", "--out", out, "--device", "cpu"])
    assert "done 2, failed 3" in result.output
    records = [json.loads(line) for line in run_cli(["results", "--out", out]).output.splitlines()]
    failed = {r["uri"].rsplit("/", 1)[1]: r["error"] for r in records if r["status"] == "failed"}
    assert set(failed) == {"img2.png", "img3.png", "img4.png"}
    assert "unknown class name 'nope'" in failed["img2.png"]
    assert "label must be a class id" in failed["img3.png"]
    assert "10×10" in failed["img4.png"] and "60×40" in failed["img4.png"]

    done = [r for r in records if r["status"] == "done"]
    by_image = {}
    for r in done:
        by_image.setdefault(r["uri"].rsplit("/", 1)[1], []).append(r)
    assert by_image["img0.png"][0]["label"] == 1 and by_image["img1.png"][0]["label"] == 2  # "C" is class 2
    reader = MapReader(open_store(f"file://{out / 'objects'}"))
    for name, rows in by_image.items():
        label = rows[0]["label"]
        assert label in {r["class_id"] for r in rows}  # the label is explained beside the top-2
        top1 = next(r["class_id"] for r in rows if r["rank"] == 1)
        assert all(r["correct"] == (top1 == label) for r in rows)
        if name == "img0.png":
            region = np.zeros((HEIGHT, WIDTH), bool)
            region[5:25, 10:30] = region[30:38, 50:58] = True
        else:
            region = mask
        border = np.ones((HEIGHT, WIDTH), bool)
        border[4:HEIGHT - 4, 6:WIDTH - 6] = False
        for r in rows:
            heat = reader.map(r)
            assert heat.shape == (INPUT, INPUT)
            if not heat.any():  # a random network's map may be all zero: no mass to share
                assert r["energy_in_box"] is None and r["border_energy"] is None
                continue
            assert abs(r["energy_in_box"] - _supersampled_share(heat, region)) < 0.02
            assert abs(r["border_energy"] - _supersampled_share(heat, border)) < 0.02
            assert r["pointing_game"] in (0, 1) and r["localization_iou"] is None
            assert r["boxes"] == (json.loads((folder / "truth.jsonl").read_text().splitlines()[0])["boxes"]
                                  if name == "img0.png" else None)


def test_explaining_only_the_label_fails_an_image_without_one(tmp_path, run_cli):
    folder, _ = _scene(tmp_path)
    (folder / "some.jsonl").write_text(json.dumps({"uri": "img0.png", "label": "d"}) + "\n" +
                                       json.dumps({"uri": "img1.png"}) + "\n")
    out = tmp_path / "out"
    run_cli(["run", folder / "some.jsonl", "--model", "tests/model_factories.py:small_cnn", "--labels",
             folder / "labels.json", "--input-size", INPUT, "--methods", "gradcam", "--classes", "label",
             "--out", out, "--device", "cpu"])
    records = [json.loads(line) for line in run_cli(["results", "--out", out]).output.splitlines()]
    done = [r for r in records if r["status"] == "done"]
    assert [r["class_id"] for r in done] == [3] and done[0]["label"] == 3
    assert done[0]["energy_in_box"] is None and done[0]["pointing_game"] is None  # no boxes, no mask
    (failed,) = [r for r in records if r["status"] == "failed"]
    assert failed["uri"].endswith("img1.png") and "no ground-truth label" in failed["error"]


def test_audit_summarises_the_records(tmp_path, run_cli):
    """Accuracy, per-class means and the ranking of `salient audit` against the same numbers from `salient results`."""
    folder, _ = _scene(tmp_path)
    out = tmp_path / "out"
    run_cli(["run", folder / "truth.jsonl", "--model", "tests/model_factories.py:small_cnn", "--labels",
             folder / "labels.json", "--input-size", INPUT, "--methods", "gradcam,saliency", "--topk", "2",
             "--with-label", "--out", out, "--device", "cpu"])
    records = [json.loads(line) for line in run_cli(["results", "--out", out]).output.splitlines()]
    done = [r for r in records if r["status"] == "done"]
    verdicts = {r["uri"]: r["correct"] for r in done}
    text = run_cli(["audit", "--out", out]).output
    assert f"accuracy {sum(verdicts.values()) / len(verdicts):.3f} ({sum(verdicts.values())}/{len(verdicts)}" in text
    for method, class_id in {(r["method"], r["class_id"]) for r in done}:
        rows = [r for r in done if (r["method"], r["class_id"]) == (method, class_id)]
        values = [r["energy_in_box"] for r in rows if r["energy_in_box"] is not None]
        mean = f"{sum(values) / len(values):.3f}" if values else "-"
        line = next(li for li in text.splitlines() if li.startswith(f"{method}\t{class_id}\t"))
        assert line.split("\t")[3] == str(len(rows)) and line.split("\t")[5] == mean
    ranked = [json.loads(line) for line in run_cli(["audit", "--out", out, "--format", "jsonl"]).output.splitlines()]
    expected = sorted(((r["energy_in_box"], r["uri"], r["method"]) for r in done
                       if r["correct"] and r["class_id"] == r["label"] and r["energy_in_box"] is not None))
    assert [(r["energy_in_box"], r["uri"], r["method"]) for r in ranked] == expected


def test_audit_without_boxes_ranks_by_border_energy(tmp_path, run_cli):
    folder, _ = _scene(tmp_path)
    out = tmp_path / "out"
    run_cli(["run", folder, "--model", "tests/model_factories.py:small_cnn", "--labels", folder / "labels.json",
             "--input-size", INPUT, "--methods", "saliency", "--topk", "1", "--out", out, "--device", "cpu"])
    ranked = [json.loads(line) for line in run_cli(["audit", "--out", out, "--format", "jsonl"]).output.splitlines()]
    assert len(ranked) == 7 and all("border_energy" in r for r in ranked)  # 5 images and 2 masks, no labels
    values = [r["border_energy"] for r in ranked]
    assert values == sorted(values, reverse=True)
    assert "no labels" in run_cli(["audit", "--out", out]).output


def test_the_report_has_an_audit_page(tmp_path, run_cli):
    folder, _ = _scene(tmp_path)
    out, report = tmp_path / "out", tmp_path / "report"
    run_cli(["run", folder / "truth.jsonl", "--model", "tests/model_factories.py:small_cnn", "--labels",
             folder / "labels.json", "--input-size", INPUT, "--methods", "gradcam", "--classes", "label",
             "--out", out, "--device", "cpu"])
    run_cli(["report", "--data", out, "--out", report])
    assert 'href="audit.html"' in (report / "index.html").read_text()
    page = (report / "audit.html").read_text()
    ranked = [json.loads(line) for line in run_cli(["audit", "--out", out, "--format", "jsonl"]).output.splitlines()]
    assert "accuracy" in page and page.count("<figure>") == len(ranked)
    for n, record in enumerate(ranked, 1):
        assert f"{n}. {record['uri'].rsplit('/', 1)[1]}" in page


def _box_region(boxes) -> np.ndarray:
    region = np.zeros((HEIGHT, WIDTH), bool)
    for x0, y0, x1, y1 in boxes:
        region[y0:y1, x0:x1] = True
    return region


def test_a_rerun_with_other_boxes_is_measured_against_its_own(tmp_path, run_cli):
    """Explanation rows are shared by jobs with the same settings; the metrics that depend on the boxes are each job's
    own: a rerun with moved boxes (its images skipped, the model not run) reports energy_in_box and pointing_game
    against its boxes, checked on the stored map against the supersampled share, and the first job keeps its own."""
    from salient_maps.storage.audits import audit_job, suspects
    from salient_maps.storage.database import ItemMetrics

    folder, _ = _scene(tmp_path)
    (folder / "copy0.png").write_bytes((folder / "img0.png").read_bytes())  # the same picture under another URI
    first = {"img0.png": [[10, 5, 30, 25]], "copy0.png": [[0, 0, 60, 20]], "img1.png": [[20, 10, 40, 30]],
             "img2.png": None}
    second = {"img0.png": [[35, 15, 60, 40]], "copy0.png": [[0, 20, 60, 40]], "img1.png": [[20, 10, 40, 30]],
              "img2.png": [[0, 0, 30, 40]]}

    def run(boxes: dict, name: str) -> str:
        lines = [{"uri": uri, "label": 1, **({"boxes": b} if b else {})} for uri, b in boxes.items()]
        (folder / name).write_text("".join(json.dumps(line) + "\n" for line in lines))
        output = run_cli(["run", folder / name, "--model", "tests/model_factories.py:small_cnn", "--labels",
                          folder / "labels.json", "--input-size", INPUT, "--methods", "gradcam", "--topk", "2",
                          "--with-label", "--out", out, "--device", "cpu"]).output
        return re.search(r"job (\S+): done", output).group(1)

    out = tmp_path / "out"
    job_a, job_b = run(first, "first.jsonl"), run(second, "second.jsonl")
    with connect(f"sqlite:///{out / 'salient.db'}").connect() as conn:
        statuses = dict(conn.execute(select(Item.uri, Item.status).where(Item.job_id == job_b)).all())
        own_rows = conn.execute(select(Item.uri).join(ItemMetrics, ItemMetrics.item_id == Item.id)).scalars().all()
    assert set(statuses.values()) == {"skipped"}  # the rerun explained nothing again
    # measured again only where the boxes moved: the copy in the first run, img0, copy0 and img2 in the second
    assert {u.rsplit("/", 1)[1] for u in own_rows} == {"copy0.png", "img0.png", "img2.png"}

    reader = MapReader(open_store(f"file://{out / 'objects'}"))
    checked = 0
    for job, boxes in ((job_a, first), (job_b, second)):
        records = [json.loads(line) for line in run_cli(["results", "--job", job, "--out", out]).output.splitlines()]
        assert {r["uri"].rsplit("/", 1)[1] for r in records} == set(boxes)
        for r in records:
            b = boxes[r["uri"].rsplit("/", 1)[1]]
            heat = reader.map(r)
            if b is None or not heat.any():
                assert r["energy_in_box"] is None and r["pointing_game"] is None
                continue
            assert abs(r["energy_in_box"] - _supersampled_share(heat, _box_region(b))) < 0.02
            assert r["pointing_game"] in (0, 1) and r["correct"] is not None and r["label"] == 1
            checked += 1
        # the audit ranks by the same, its own, numbers, and counts the skipped images as labelled
        with connect(f"sqlite:///{out / 'salient.db'}").connect() as conn:
            summary = audit_job(conn, job)
            ranked = list(suspects(conn, job, summary.ranked_by))
        assert summary.labelled == 4 and summary.ranked_by == "energy_in_box"
        expected = sorted((r["energy_in_box"], r["uri"]) for r in records
                          if r["correct"] and r["class_id"] == 1 and r["energy_in_box"] is not None)
        assert [(s["energy_in_box"], s["uri"]) for s in ranked] == expected
    assert checked >= 8
