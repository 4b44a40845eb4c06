"""Ground truth in manifests: labels, boxes and masks per image, bad ones the entry's problem, not the listing's."""

import json

from salient_maps.storage.sources import iter_entries, iter_uris


def test_jsonl_lines_carry_label_boxes_and_a_mask_relative_to_the_manifest(tmp_path):
    manifest = tmp_path / "truth.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in [
        {"uri": "a.png", "label": 3, "boxes": [[1, 2, 30, 40], [50, 0, 60.5, 10]], "mask": "masks/a.png"},
        {"path": "b.png", "label": "tabby cat"},
        "c.png",
    ]) + "\n")
    a, b, c = iter_entries([str(manifest)])
    assert a.uri == (tmp_path / "a.png").as_uri() and a.problem is None
    assert a.truth == {"label": 3, "boxes": [[1, 2, 30, 40], [50, 0, 60.5, 10]],
                       "mask": (tmp_path / "masks" / "a.png").as_uri()}
    assert b.truth == {"label": "tabby cat"}
    assert c.truth is None and c.problem is None
    assert list(iter_uris([str(manifest)])) == [a.uri, b.uri, c.uri]


def test_csv_columns_carry_the_same_with_boxes_as_json(tmp_path):
    manifest = tmp_path / "truth.csv"
    manifest.write_text('uri,label,boxes,mask\na.png,7,"[[0, 0, 4, 4]]",\nb.png,,,m.png\n')
    a, b = iter_entries([str(manifest)])
    assert a.truth == {"label": 7, "boxes": [[0, 0, 4, 4]]}
    assert b.truth == {"mask": (tmp_path / "m.png").as_uri()}


def test_bad_ground_truth_is_the_entry_problem_and_the_listing_goes_on(tmp_path):
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in [
        {"uri": "empty.png", "boxes": [[5, 5, 1, 1]]},
        {"uri": "short.png", "boxes": [[1, 2, 3]]},
        {"uri": "negative.png", "label": -1},
        {"uri": "bool.png", "label": True},
        {"uri": "good.png", "label": 0},
    ]) + "\n")
    entries = list(iter_entries([str(manifest)]))
    assert [e.problem is None for e in entries] == [False, False, False, False, True]
    assert "x1 > x0" in entries[0].problem and "[x0, y0, x1, y1]" in entries[1].problem
    assert all(e.truth is None for e in entries[:4]) and entries[4].truth == {"label": 0}
    csv_manifest = tmp_path / "bad.csv"
    csv_manifest.write_text('uri,boxes\na.png,"[[0, 0, 4"\n')
    (entry,) = iter_entries([str(csv_manifest)])
    assert entry.problem.startswith("bad ground truth: boxes must be JSON")
