"""A schedule with --compare-previous: each finished run is compared with the previous finished one and drift shows
in `schedule list`. The runs are real in-process explanations (submit replaced by `salient run` of the schedule's
spec, so no servers); between runs the model's weights stay, then change."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import torch
from model_factories import small_cnn  # tests/ is on sys.path (rootdir conftest)

from salient_maps.producer import schedules
from salient_maps.producer.drift import verdict
from salient_maps.producer.schedules import fire_due, get_schedule, list_schedules
from salient_maps.storage.database import connect
from salient_maps.storage.settings import Settings

FACTORY = "tests/model_factories.py:small_cnn"


def _save_weights(path, seed: int) -> None:
    torch.manual_seed(seed)
    torch.save(small_cnn().state_dict(), path)


def test_a_changed_model_is_flagged_and_an_unchanged_one_is_not(tmp_path, monkeypatch, run_cli, tiny_images):
    images = tiny_images(6, size=(32, 40))
    weights, data = tmp_path / "weights.pt", tmp_path / "data"
    _save_weights(weights, seed=1)
    run_cli(["schedule", "add", "--cron", "0 2 * * *", "--name", "nightly", images, "--model", FACTORY,
             "--weights", weights, "--methods", "gradcam", "--topk", "2", "--input-size", "32",
             "--compare-previous", "--data", data])

    def run_in_process(sources, spec, *, name=None, chunk=None, settings=None, db=None):
        out = run_cli(["run", *sources, "--model", spec["model"], "--weights", spec["weights"], "--methods",
                       "gradcam", "--topk", "2", "--input-size", "32", "--out", data, "--device", "cpu"]).output
        return re.search(r"job (\S+):", out).group(1)

    monkeypatch.setattr(schedules, "submit", run_in_process)
    settings = Settings().with_data_dir(data)
    db = connect(settings.resolved_database_url)
    [row] = list_schedules(db)

    def fire() -> str:
        due = get_schedule(db, row.id).next_run_at
        [firing] = fire_due(db, settings, now=due + timedelta(seconds=1))
        assert firing.error is None, firing.error
        return firing.job_id

    def listed() -> tuple[str, dict]:
        text = run_cli(["schedule", "list", "--data", data]).output
        [record] = [json.loads(line) for line in run_cli(["schedule", "list", "--json", "--data", data]).output
                    .splitlines()]
        return text, record

    first = fire()
    assert "no comparison yet" in listed()[0]
    second = fire()  # same weights: every image skipped, its earlier maps reused
    text, record = listed()
    assert record["baseline_job_id"] == first and record["drift"] is None  # judged at the next tick
    _save_weights(weights, seed=2)  # tonight's model
    third = fire()  # this tick judged the second run first
    text, record = listed()
    same = record["drift"]
    assert (same["job_a"], same["job_b"], same["images"], same["pairs"]) == (first, second, 6, 12)
    assert same["mean_spearman"] == 1.0 and same["predictions_changed"] == 0 and not same["flagged"]
    assert f"no drift job {first} → {second}" in text and "DRIFT" not in text

    fire_due(db, settings, now=get_schedule(db, row.id).next_run_at - timedelta(hours=1))  # a tick, nothing due
    text, record = listed()
    changed = record["drift"]
    assert (changed["job_a"], changed["job_b"], changed["images"], record["baseline_job_id"]) == \
        (second, third, 6, third)
    assert changed["flagged"] and changed["mean_spearman"] < 0.8, changed
    assert f"DRIFT job {second} → {third}: mean spearman" in text
    assert record["drift_thresholds"] == {"min_spearman": 0.8, "max_changed": 0.05}


def test_the_verdict_names_each_threshold_crossed():
    limits = {"min_spearman": 0.8, "max_changed": 0.05}
    summary = {"job_a": "a", "job_b": "b", "images": 40, "pairs": 40, "predictions_changed": 2,
               "mean_spearman": 0.95, "mean_top10_iou": 0.9}
    assert verdict(summary, limits)["flagged"] is False  # 2/40 = 5 %: not more than the share allowed
    assert verdict({**summary, "predictions_changed": 3}, limits)["reasons"] == \
        ["3 of 40 predictions changed (7.5% > 5.0%)"]
    assert verdict({**summary, "mean_spearman": 0.5}, limits)["reasons"] == ["mean spearman 0.500 < 0.8"]
    nothing_common = verdict({**summary, "images": 0, "pairs": 0, "predictions_changed": 0, "mean_spearman": None},
                             limits)
    assert nothing_common["flagged"] is False and nothing_common["changed_share"] is None


def test_a_schedule_without_the_option_is_never_compared(tmp_path):
    from sqlalchemy import text, update

    from salient_maps.producer.drift import check_drift
    from salient_maps.producer.schedules import add_schedule
    from salient_maps.storage.database import Schedule, close_listing, create_job

    db = connect(f"sqlite:///{tmp_path / 'salient.db'}")
    (tmp_path / "images").mkdir()
    row = add_schedule(db, "0 2 * * *", [str(tmp_path / "images")], {"model": "resnet18", "methods": "gradcam"})
    for _ in range(2):  # two finished runs
        job_id = create_job(db, {})
        close_listing(db, job_id)
        with db.begin() as conn:
            conn.execute(update(Schedule).where(Schedule.id == row.id).values(last_job_id=job_id))
        assert check_drift(db, Settings().with_data_dir(tmp_path)) == []
    with db.connect() as conn:  # SQL NULL, not a JSON null that `IS NOT NULL` would match
        assert conn.execute(text("SELECT drift_thresholds IS NULL, baseline_job_id FROM schedules")).one() == (1, None)
