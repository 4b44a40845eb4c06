"""Schedules without servers (SQLite, submit replaced by a recorder): cron arithmetic against hand-worked times,
what a stored schedule keeps, the claim that stops two beats firing one run, missed runs, retries, overlap,
and the Celery beat scheduler ticking in-process. tests/pipeline/test_schedules.py runs the real thing."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select, update

from salient_maps.producer import schedules
from salient_maps.producer.schedules import (ScheduleError, add_schedule, check_cron, claim, due_schedules, fire_due,
                                get_schedule, next_run)
from salient_maps.storage.database import Job, Schedule, close_listing, connect, create_job
from salient_maps.storage.settings import Settings

UTC = timezone.utc


@pytest.mark.parametrize("cron, tz, after, expected", [
    ("0 2 * * *", "UTC", datetime(2026, 11, 28, 16, 0, tzinfo=UTC), datetime(2026, 11, 29, 2, 0, tzinfo=UTC)),
    # strictly after: a run at exactly 02:00 is followed by the next day's
    ("0 2 * * *", "UTC", datetime(2026, 11, 29, 2, 0, tzinfo=UTC), datetime(2026, 11, 30, 2, 0, tzinfo=UTC)),
    ("*/15 * * * *", "UTC", datetime(2026, 1, 1, 10, 7, 30, tzinfo=UTC), datetime(2026, 1, 1, 10, 15, tzinfo=UTC)),
    # 02:00 in Paris is 00:00 UTC in summer (UTC+2) and 01:00 UTC in winter (UTC+1)
    ("0 2 * * *", "Europe/Paris", datetime(2026, 7, 1, 12, 0, tzinfo=UTC), datetime(2026, 7, 2, 0, 0, tzinfo=UTC)),
    ("0 2 * * *", "Europe/Paris", datetime(2026, 1, 1, 12, 0, tzinfo=UTC), datetime(2026, 1, 2, 1, 0, tzinfo=UTC)),
    # Monday 09:00; 2026-11-28 is a Saturday
    ("0 9 * * 1", "UTC", datetime(2026, 11, 28, 0, 0, tzinfo=UTC), datetime(2026, 11, 30, 9, 0, tzinfo=UTC)),
    ("@hourly", "UTC", datetime(2026, 1, 1, 10, 59, 59, tzinfo=UTC), datetime(2026, 1, 1, 11, 0, tzinfo=UTC)),
])
def test_next_run_matches_hand_worked_times(cron, tz, after, expected):
    got = next_run(cron, tz, after)
    assert got == expected and got.tzinfo is not None and got.utcoffset() == timedelta(0)


@pytest.mark.parametrize("cron", ["0 2 * *", "0 2 * * * *", "61 2 * * *", "every day", "@sometimes", ""])
def test_not_a_five_field_cron_is_refused(cron):
    with pytest.raises(ScheduleError, match="not a cron expression"):
        check_cron(cron)


@pytest.fixture
def db(tmp_path):
    return connect(f"sqlite:///{tmp_path / 'salient.db'}")


@pytest.fixture
def submitted(monkeypatch, db):
    """Replaces submit: records each call and makes a finished, empty job for it."""
    calls = []
    lock = threading.Lock()

    def fake_submit(sources, spec, *, name=None, chunk=None, settings=None, **engine):
        job_id = create_job(db, {**spec, "sources": sources}, name=name)
        close_listing(db, job_id)  # no items: finished at once
        with lock:
            calls.append({"sources": sources, "spec": spec, "name": name, "chunk": chunk, "job_id": job_id,
                          "engine": engine.get("db")})
        return job_id

    monkeypatch.setattr(schedules, "submit", fake_submit)
    return calls


def _add(db, tmp_path, now, cron="0 2 * * *", **kwargs):
    (tmp_path / "images").mkdir(exist_ok=True)
    return add_schedule(db, cron, [str(tmp_path / "images")], {"model": "resnet18", "methods": "gradcam"},
                        now=now, **kwargs)


def test_a_schedule_keeps_absolute_sources_and_rebuildable_options(db, tmp_path, monkeypatch):
    (tmp_path / "images").mkdir()
    (tmp_path / "weights.pt").write_bytes(b"not really weights")
    monkeypatch.chdir(tmp_path)
    row = add_schedule(db, "0 2 * * *", ["images", "s3://bucket/photos"],
                       {"model": "resnet18", "weights": "weights.pt", "layer": None, "topk": 2},
                       name="nightly", now=datetime(2026, 11, 28, 16, tzinfo=UTC))
    assert row.sources == [str(tmp_path / "images"), "s3://bucket/photos"]
    assert row.options == {"model": "resnet18", "weights": str(tmp_path / "weights.pt"), "topk": 2}
    assert row.next_run_at.replace(tzinfo=UTC) == datetime(2026, 11, 29, 2, tzinfo=UTC)
    with pytest.raises(ScheduleError, match="exists already"):
        add_schedule(db, "@daily", ["images"], {}, name="nightly")
    with pytest.raises(ScheduleError, match="standard input"):
        add_schedule(db, "@daily", ["-"], {})
    with pytest.raises(ScheduleError, match="source not found"):
        add_schedule(db, "@daily", ["missing"], {})
    with pytest.raises(FileNotFoundError):
        add_schedule(db, "@daily", ["images"], {"weights": "missing.pt"})
    with pytest.raises(ScheduleError, match="time zone"):
        add_schedule(db, "@daily", ["images"], {}, tz="Nowhere/City")


def test_a_due_schedule_fires_once_then_waits_for_its_next_time(db, tmp_path, submitted):
    created = datetime(2026, 11, 28, 16, tzinfo=UTC)
    row = _add(db, tmp_path, created, name="nightly", chunk=7)
    assert fire_due(db, Settings(), now=created + timedelta(hours=9)) == []  # 01:00, not due
    at_two = datetime(2026, 11, 29, 2, 0, 5, tzinfo=UTC)
    [firing] = fire_due(db, Settings(), now=at_two)
    assert firing.job_id == submitted[0]["job_id"] and firing.error is None
    call = submitted[0]
    assert (call["sources"], call["name"], call["chunk"]) == ([str(tmp_path / "images")], "nightly", 7)
    assert call["engine"] is db  # the scheduler's own engine: no new pool per firing
    assert call["spec"]["model"] == "resnet18" and call["spec"]["methods"] == ["gradcam"]
    assert fire_due(db, Settings(), now=at_two + timedelta(minutes=1)) == []
    row = get_schedule(db, row.id)
    assert row.next_run_at.replace(tzinfo=UTC) == datetime(2026, 11, 30, 2, tzinfo=UTC)
    assert row.last_job_id == firing.job_id and row.last_run_at.replace(tzinfo=UTC) == at_two


def test_runs_missed_while_no_beat_was_up_fold_into_one(db, tmp_path, submitted):
    _add(db, tmp_path, datetime(2026, 11, 1, tzinfo=UTC))
    later = datetime(2026, 11, 28, 16, tzinfo=UTC)  # 27 nightly runs missed
    assert len(fire_due(db, Settings(), now=later)) == 1
    assert len(submitted) == 1
    [row] = due_schedules(db, datetime(2026, 11, 29, 2, tzinfo=UTC))
    assert row.next_run_at.replace(tzinfo=UTC) == datetime(2026, 11, 29, 2, tzinfo=UTC)


def test_two_claims_of_one_due_run_have_one_winner(db, tmp_path):
    """Both racers read the same due row, then update at once: the conditional UPDATE lets one through."""
    row = _add(db, tmp_path, datetime(2026, 11, 1, tzinfo=UTC))
    for round_ in range(10):
        now = row.next_run_at.replace(tzinfo=UTC) + timedelta(seconds=1)
        [seen_a] = due_schedules(db, now)
        [seen_b] = due_schedules(db, now)
        start = threading.Barrier(2)
        won = []

        def race(seen):
            start.wait()
            won.append(claim(db, seen, now))

        threads = [threading.Thread(target=race, args=(seen,)) for seen in (seen_a, seen_b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(w is None for w in won) == [False, True], round_
        row = get_schedule(db, row.id)


def test_concurrent_beats_fire_each_run_once(db, tmp_path, submitted):
    rows = [_add(db, tmp_path, datetime(2026, 11, 1, tzinfo=UTC), cron=cron) for cron in ("0 2 * * *", "@hourly")]
    now = datetime(2026, 11, 2, 3, 30, tzinfo=UTC)
    start = threading.Barrier(4)
    firings = []

    def beat():
        start.wait()
        firings.extend(fire_due(db, Settings(), now=now))

    threads = [threading.Thread(target=beat) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(f.schedule_id for f in firings) == sorted(r.id for r in rows)
    assert len(submitted) == 2


def test_a_failed_submit_is_retried_after_the_retry_delay(db, tmp_path, monkeypatch):
    row = _add(db, tmp_path, datetime(2026, 11, 28, 16, tzinfo=UTC))

    def broker_down(*args, **kwargs):
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr(schedules, "submit", broker_down)
    at_two = datetime(2026, 11, 29, 2, tzinfo=UTC)
    [firing] = fire_due(db, Settings(schedule_retry=600), now=at_two)
    assert firing.job_id is None and firing.error == "ConnectionError: broker unreachable"
    row = get_schedule(db, row.id)
    assert row.next_run_at.replace(tzinfo=UTC) == at_two + timedelta(minutes=10)
    assert row.last_error == firing.error
    # A retry never goes past the next regular run.
    [firing] = fire_due(db, Settings(schedule_retry=7 * 86400), now=at_two + timedelta(minutes=10))
    assert get_schedule(db, row.id).next_run_at.replace(tzinfo=UTC) == datetime(2026, 11, 30, 2, tzinfo=UTC)


def test_a_run_waits_while_the_previous_job_is_still_running(db, tmp_path, submitted):
    row = _add(db, tmp_path, datetime(2026, 11, 28, 16, tzinfo=UTC))
    [first] = fire_due(db, Settings(), now=datetime(2026, 11, 29, 2, tzinfo=UTC))
    with db.begin() as conn:  # as if its workers were still at it
        conn.execute(update(Job).where(Job.id == first.job_id).values(status="running", finished_at=None))
    [second] = fire_due(db, Settings(), now=datetime(2026, 11, 30, 2, tzinfo=UTC))
    assert second.job_id is None and first.job_id in second.error and len(submitted) == 1
    assert get_schedule(db, row.id).next_run_at.replace(tzinfo=UTC) == datetime(2026, 12, 1, 2, tzinfo=UTC)
    close_listing(db, first.job_id)  # not finished: 0 items, but status running -> finishes now
    with db.begin() as conn:
        conn.execute(update(Job).where(Job.id == first.job_id)
                     .values(finished_at=datetime(2026, 11, 30, 3, tzinfo=UTC), status="finished"))
    [third] = fire_due(db, Settings(), now=datetime(2026, 12, 1, 2, tzinfo=UTC))
    assert third.job_id is not None and len(submitted) == 2
    assert get_schedule(db, row.id).last_error is None


def test_celery_beat_ticks_in_process_and_fires_a_due_schedule(db, tmp_path, submitted):
    """The real celery.beat.Service loop with salient's scheduler: nothing is published to a broker."""
    from celery.beat import Service

    from salient_maps.producer.beat import InProcessScheduler, beat_app

    row = _add(db, tmp_path, datetime(2026, 11, 1, tzinfo=UTC))  # long overdue
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'salient.db'}", beat_interval=0.2,
                        broker_url="redis://127.0.0.1:1/0")  # nothing listens there: a publish would fail
    service = Service(beat_app(settings), scheduler_cls=InProcessScheduler, max_interval=0.2)
    thread = threading.Thread(target=service.start, daemon=True)
    thread.start()
    try:
        deadline = datetime.now(UTC) + timedelta(seconds=20)
        while not submitted and datetime.now(UTC) < deadline:
            threading.Event().wait(0.05)
    finally:
        service.stop(wait=True)
        thread.join(5)
    assert len(submitted) == 1
    with db.connect() as conn:
        assert conn.execute(select(Schedule.last_job_id).where(Schedule.id == row.id)).scalar() == \
            submitted[0]["job_id"]


def test_schedule_add_takes_every_job_option_of_submit():
    from salient_maps.producer.job_commands import submit
    from salient_maps.producer.schedule_commands import add

    submits = {p.name for p in submit.params} - {"sources", "wait"}
    assert submits - {p.name for p in add.params} == set()


def test_schedule_commands_add_list_and_remove(tmp_path, run_cli):
    import json

    (tmp_path / "images").mkdir()
    data = str(tmp_path / "data")
    out = run_cli(["schedule", "add", "--cron", "30 1 * * 1", "--timezone", "Europe/Paris", "--name", "weekly",
                   str(tmp_path / "images"), "--model", "resnet18", "--topk", "2", "--out", data]).output
    assert out.startswith("schedule 1 (weekly): '30 1 * * 1' Europe/Paris, next run ")
    [listed] = [json.loads(line) for line in run_cli(["schedule", "list", "--json", "--out", data]).output.splitlines()]
    assert (listed["name"], listed["options"]["topk"], listed["last_job"]) == ("weekly", 2, None)
    moment = datetime.fromisoformat(listed["next_run_at"])
    assert moment.utcoffset() == timedelta(0)
    in_paris = moment.astimezone(ZoneInfo("Europe/Paris"))
    assert (in_paris.weekday(), in_paris.hour, in_paris.minute) == (0, 1, 30)  # Monday 01:30 on Paris clocks
    assert "not a cron expression" in run_cli(["schedule", "add", "--cron", "daily", str(tmp_path / "images"),
                                               "--out", data], expect_exit=1).output
    assert run_cli(["schedule", "remove", "weekly", "--out", data]).output == "schedule weekly removed\n"
    assert "no schedule weekly" in run_cli(["schedule", "remove", "weekly", "--out", data], expect_exit=1).output
    assert run_cli(["schedule", "list", "--out", data]).output == ""
