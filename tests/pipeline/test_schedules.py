"""Schedules on the real servers: incremental runs explained by a real worker (PostgreSQL, Redis, S3 store),
the claim raced on PostgreSQL, and two `salient beat` processes that must fire each run once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from salient_maps.storage.database import Explanation, Item, Job, Schedule, utcnow

SALIENT = str(Path(sys.executable).parent / "salient")


def _open_folder(pipeline, monkeypatch, folder: Path) -> None:
    """Let this process, and the workers and beats started after, read the images under ``folder``."""
    pipeline.env["SALIENT_FILE_ROOTS"] = str(folder)
    monkeypatch.setenv("SALIENT_FILE_ROOTS", str(folder))


def _wait(pipeline, job_id: str):
    from salient_maps.producer.jobs import wait_for_job

    try:
        return wait_for_job(pipeline.db(), job_id, show_progress=False, timeout=120)
    except TimeoutError:
        pytest.fail(pipeline.log_tail())


def test_scheduled_runs_explain_only_new_or_changed_images(pipeline, tiny_images, run_cli, smooth_rgb, encode_image,
                                                            monkeypatch):
    from salient_maps.producer.schedules import fire_due, get_schedule, list_schedules

    folder = tiny_images(3)
    _open_folder(pipeline, monkeypatch, folder)
    run_cli(["schedule", "add", "--cron", "0 2 * * *", "--name", "nightly", str(folder),
             "--model", "resnet18", "--methods", "gradcam", "--topk", "1", "--batch-size", "4"])
    [row] = list_schedules(pipeline.db())
    db, settings = pipeline.db(), pipeline.settings
    pipeline.start_worker("scheduled")

    def fire():
        due = get_schedule(db, row.id).next_run_at
        [firing] = fire_due(db, settings, now=due + timedelta(seconds=1))
        assert firing.error is None, firing.error
        return _wait(pipeline, firing.job_id)

    first = fire()
    assert (first.name, first.status, first.total, first.done, first.skipped, first.failed) == \
        ("nightly", "finished", 3, 3, 0, 0)
    second = fire()  # nothing changed
    assert (second.total, second.done, second.skipped) == (3, 0, 3)

    # One image's bytes change, one image is new, one is touched (new mtime, same bytes).
    (folder / "img001.jpg").write_bytes(encode_image(smooth_rgb(48, 64, seed=101), "JPEG", quality=95))
    (folder / "img003.png").write_bytes(encode_image(smooth_rgb(48, 64, seed=103), "PNG"))
    os.utime(folder / "img000.png", (time.time() + 60, time.time() + 60))
    third = fire()
    assert (third.total, third.done, third.skipped, third.failed) == (4, 2, 2, 0)
    with db.connect() as conn:
        statuses = dict(conn.execute(select(Item.uri, Item.status).where(Item.job_id == third.id)).all())
        explained = conn.execute(select(func.count()).select_from(Explanation)).scalar()
    assert {uri.rsplit("/", 1)[1]: s for uri, s in statuses.items()} == {
        "img000.png": "skipped", "img001.jpg": "done", "img002.webp": "skipped", "img003.png": "done"}
    assert explained == 5  # 3 + the changed + the new one: nothing explained twice

    # The skipped images report the earlier, identical results: every image of the run has its record.
    records = run_cli(["results", "--job", third.id]).output.splitlines()
    assert len(records) == 4 and all('"status": "done"' in r and '"shard": null' not in r for r in records)
    listed = run_cli(["schedule", "list"]).output
    assert f"last job {third.id}: finished, done 2, failed 0, skipped 2 of 4" in listed


def test_claims_raced_on_postgresql_have_one_winner(pipeline, tmp_path):
    from salient_maps.producer.schedules import add_schedule, claim, due_schedules, get_schedule

    db = pipeline.db()
    (tmp_path / "images").mkdir()
    row = add_schedule(db, "@hourly", [str(tmp_path / "images")], {}, now=utcnow() - timedelta(days=1))
    for round_ in range(10):
        now = row.next_run_at + timedelta(seconds=1)
        seen = [due_schedules(db, now)[0] for _ in range(4)]  # four beats read the same due row
        start = threading.Barrier(len(seen))
        won = []

        def race(mine):
            start.wait()
            won.append(claim(db, mine, now))

        threads = [threading.Thread(target=race, args=(mine,)) for mine in seen]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(w is not None for w in won) == 1, round_
        row = get_schedule(db, row.id)


def test_two_beat_processes_fire_each_due_run_once(pipeline, tiny_images, tmp_path, monkeypatch):
    import redis

    from salient_maps.producer.schedules import add_schedule

    db = pipeline.db()
    folder = tiny_images(2)
    _open_folder(pipeline, monkeypatch, folder)
    ids = [add_schedule(db, "@daily", [str(folder)], {"model": "resnet18"}, name=f"s{i}").id for i in range(4)]
    logs = [tmp_path / f"beat{i}.log" for i in range(2)]
    beats = [subprocess.Popen([SALIENT, "beat", "--interval", "0.2"], env={**os.environ, **pipeline.env},
                              stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
             for log in logs]
    try:
        deadline = time.monotonic() + 30
        while not all(b"beat: Starting" in log.read_bytes() for log in logs):
            assert time.monotonic() < deadline and all(b.poll() is None for b in beats), \
                "\n".join(log.read_text() for log in logs)
            time.sleep(0.1)
        with db.begin() as conn:  # all four due now, while both beats tick
            conn.execute(update(Schedule).where(Schedule.id.in_(ids)).values(next_run_at=utcnow()))
        deadline = time.monotonic() + 30
        while True:
            with db.connect() as conn:
                fired = conn.execute(select(func.count()).select_from(Schedule)
                                     .where(Schedule.last_job_id.is_not(None))).scalar()
            if fired == len(ids):
                break
            assert time.monotonic() < deadline, "\n".join(log.read_text() for log in logs)
            time.sleep(0.1)
        time.sleep(1.0)  # several more ticks of both beats
    finally:
        for beat in beats:
            beat.send_signal(signal.SIGTERM)
        codes = [beat.wait(20) for beat in beats]
    with db.connect() as conn:
        names = conn.execute(select(Job.name, func.count()).group_by(Job.name)).all()
    assert sorted(names) == [(f"s{i}", 1) for i in range(4)]
    queued = redis.Redis.from_url(pipeline.env["SALIENT_BROKER_URL"]).llen(pipeline.env["SALIENT_QUEUE"])
    assert queued == 4  # one chunk of two images per job
    assert codes == [0, 0]
    fired_by = [log.read_text().count(": job ") for log in logs]
    assert sum(fired_by) == 4
