"""`salient report` on PostgreSQL (temporary tables, JSON paths, server-side cursors, rounding through numeric):
the same synthetic job written to PostgreSQL and to SQLite gives the same gallery files and summaries."""

from __future__ import annotations

import json

import pytest

from salient_maps.storage.database import connect
from salient_maps.storage.report import build_report
from salient_maps.storage.report.summary import summarize
from salient_maps.storage.results import find_job
from salient_maps.storage.settings import Settings
from synthetic_results import make_job


def test_the_report_on_postgres_equals_the_report_on_sqlite(pipeline, tmp_path):
    shape = dict(topk=2, classes=12, labels=True, localization=True, seed=3)
    reports, summaries = {}, {}
    for kind in ("sqlite", "postgres"):
        data = tmp_path / kind
        data.mkdir()
        url = pipeline.database_url if kind == "postgres" else None
        job = make_job(data, 700, database_url=url, **shape)
        settings = Settings(database_url=url, object_store_url=(data / "objects").as_uri()).with_data_dir(data)
        reports[kind] = build_report(settings, job.job_id, data / "report", pictured=50)
        db = connect(settings.resolved_database_url)
        with db.connect() as conn:
            summaries[kind] = summarize(conn, find_job(conn, job.job_id))
        db.dispose()
    files = {kind: {p.name: p.read_text() for p in (r.path.parent / "data").iterdir()} for kind, r in reports.items()}
    assert len(files["sqlite"]) > 10 and set(files["postgres"]) == set(files["sqlite"])
    for name, text in files["sqlite"].items():
        lite, pg = (json.loads(files[k][name].split(",", 1)[1].rsplit(");", 1)[0]) for k in ("sqlite", "postgres"))
        for card in (*lite.get("cards", []), *pg.get("cards", [])):  # pictures are named by sha256, made per job
            card["p"] = card["p"] is not None
        assert pg == lite, name
    pictures = {kind: len(list((r.path.parent / "pictures").iterdir())) for kind, r in reports.items()}
    assert pictures["postgres"] == pictures["sqlite"] > 0
    lite, pg = summaries["sqlite"], summaries["postgres"]
    assert (pg.statuses, pg.methods, pg.explanations, pg.labelled, pg.histograms, pg.failures) == \
        (lite.statuses, lite.methods, lite.explanations, lite.labelled, lite.histograms, lite.failures)
    for method in lite.methods:
        for name, (mean, n) in lite.means[method].items():
            assert pg.means[method][name] == (pytest.approx(mean, abs=1e-9) if n else None, n)
        for curve, series in lite.curves.items():
            assert pg.curves[curve][method] == pytest.approx(series[method], abs=1e-9)
    assert [(c, n) for c, n, _ in pg.predicted] == [(c, n) for c, n, _ in lite.predicted]
