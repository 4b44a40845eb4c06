"""`salient export`: every format, the predictions/errors split, and memory that does not grow with rows."""

from __future__ import annotations

import csv
import io
import json
import tracemalloc

import pyarrow.parquet as pq
import pytest

from salient_maps.storage.results import ERROR_FIELDS, FIELDS, export_results
from salient_maps.storage.settings import Settings
from synthetic_results import EVIL_CLASS, make_job


@pytest.fixture(scope="module")
def small_job(tmp_path_factory):
    data = tmp_path_factory.mktemp("export")
    return data, make_job(data, 20, objects=False)  # 18 done × 2 methods × 3 classes, 2 failed


def test_folder_gets_predictions_and_errors_files(small_job, run_cli, tmp_path):
    data, job = small_job
    for fmt in ("jsonl", "csv", "parquet"):
        out = tmp_path / fmt
        run_cli(["export", job.job_id, "--data", data, "--format", fmt, "--out", f"{out}/"])
        predictions, errors = out / f"predictions_00001.{fmt}", out / f"errors_00001.{fmt}"
        if fmt == "jsonl":
            rows = [json.loads(line) for line in predictions.read_text().splitlines()]
            failures = [json.loads(line) for line in errors.read_text().splitlines()]
        elif fmt == "csv":
            rows = list(csv.DictReader(predictions.open()))
            failures = list(csv.DictReader(errors.open()))
        else:
            rows, failures = pq.read_table(predictions).to_pylist(), pq.read_table(errors).to_pylist()
        assert len(rows) == job.explanations and len(failures) == job.failed
        assert list(rows[0]) == list(FIELDS) and list(failures[0]) == list(ERROR_FIELDS)
        assert all(f["status"] == "failed" and "corrupt" in f["error"] for f in failures)
        assert any(r["class_name"] == EVIL_CLASS for r in rows)  # stored as given, not escaped
        assert {r["method"] for r in rows} == {"gradcam", "saliency"}
        assert all(0 <= float(r["deletion_auc"]) <= 1 for r in rows)


def test_one_file_or_stdout_holds_every_record(small_job, run_cli, tmp_path):
    data, job = small_job
    result = run_cli(["export", job.job_id, "--data", data, "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == job.explanations + job.failed
    run_cli(["export", "--data", data, "--format", "parquet", "--out", tmp_path / "all.parquet"])  # latest job
    table = pq.read_table(tmp_path / "all.parquet")
    assert table.num_rows == job.explanations + job.failed
    assert str(table.schema.field("score").type) == "double" and str(table.schema.field("increase").type) == "bool"
    result = run_cli(["export", "--data", data, "--format", "parquet"], expect_exit=1)
    assert "parquet needs --out" in result.output


@pytest.fixture(scope="module")
def jobs_of_two_sizes(tmp_path_factory):
    """2,000 and 20,000 records (250 and 2,500 images × 2 methods × 4 classes)."""
    made = {}
    for images in (250, 2500):
        data = tmp_path_factory.mktemp(f"rows{images}")
        made[images] = data, make_job(data, images, failed_every=0, topk=4, objects=False)
    return made


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_memory_does_not_grow_with_rows(jobs_of_two_sizes, tmp_path, fmt):
    """Peak Python memory while exporting 20,000 records stays near that of 2,000: rows are streamed
    (Parquet buffers one row group, 1,000 rows here)."""
    peaks = {}
    for images, (data, job) in jobs_of_two_sizes.items():
        tracemalloc.start()
        counts = export_results(Settings().with_data_dir(data), job.job_id, fmt, tmp_path / f"{images}.{fmt}",
                                row_group=1000)
        peaks[job.explanations] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert counts["predictions"] == job.explanations
    assert set(peaks) == {2000, 20000}
    assert peaks[20000] < 1.5 * peaks[2000], peaks
