"""ItemProcessor: one picture under two URIs in one batch is explained once, and both items end done."""

from __future__ import annotations

from sqlalchemy import func, select

from salient_maps.storage.database import Explanation, Item, Job, add_items, close_listing, connect, create_job
from salient_maps.storage.job_options import job_spec
from salient_maps.storage.objects import open_store
from salient_maps.storage.settings import Settings
from salient_maps.storage.sources import iter_uris
from salient_maps.workers.explainers import load_setup
from salient_maps.workers.process import pending_items


def job_of(folder, tmp_path, store, **spec):
    """A listed job of ``folder``'s images and the processor that explains them with resnet18 Grad-CAM
    (``store``: None for the data folder's own)."""
    settings = Settings().with_data_dir(tmp_path / "data")
    db = connect(settings.resolved_database_url)
    job_id = create_job(db, {})
    add_items(db, job_id, iter_uris([str(folder)], settings))
    close_listing(db, job_id)
    store = store or open_store(settings.resolved_object_store_url)
    processor = load_setup(job_spec(model="resnet18", methods="gradcam", **spec), settings, "cpu").processor(
        settings, db, store)
    return db, job_id, processor


def test_two_copies_of_one_image_in_a_batch_are_explained_once(tmp_path, smooth_rgb, encode_image):
    folder = tmp_path / "images"
    folder.mkdir()
    picture = encode_image(smooth_rgb(40, 48, seed=3), "PNG")
    (folder / "a.png").write_bytes(picture)
    (folder / "copy of a.png").write_bytes(picture)
    (folder / "b.png").write_bytes(encode_image(smooth_rgb(40, 48, seed=4), "PNG"))
    db, job_id, processor = job_of(folder, tmp_path, None, topk=2, batch_size=8)
    explained: list[int] = []
    explain = processor.explainer.explain
    processor.explainer.explain = lambda x: explained.append(len(x)) or explain(x)
    statuses: list[str] = []
    processor.run(pending_items(db, job_id), on_item=statuses.append)

    assert explained == [2] and statuses == ["done"] * 3
    with db.connect() as conn:
        job = conn.execute(select(Job.status, Job.total, Job.done, Job.failed, Job.skipped)).one()
        items = conn.execute(select(Item.status, Item.sha256)).all()
        rows = conn.execute(select(Explanation.sha256, func.count()).group_by(Explanation.sha256)).all()
    assert tuple(job) == ("finished", 3, 3, 0, 0)  # each item counted done once
    assert len({sha for _, sha in items}) == 2 and all(status == "done" for status, _ in items)
    assert sorted(count for _, count in rows) == [2, 2]  # two pictures × top-2, once each


class BrokenStore:
    """An object store whose every write fails (a full disk, revoked credentials)."""

    url = "broken://"

    def put_if_absent(self, key, render, content_type):
        raise OSError("No space left on device")


def test_storing_runs_beside_the_model_and_its_failure_fails_the_items_with_the_reason(tmp_path, smooth_rgb,
                                                                                       encode_image):
    """Batch N is stored on the writer's thread while batch N+1 is explained; when the shard cannot be
    written, its items end failed (once) with the reason and the run goes on to the next batch."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.png").write_bytes(encode_image(smooth_rgb(40, 48, seed=i), "PNG"))
    db, job_id, processor = job_of(folder, tmp_path, BrokenStore(), topk=1, batch_size=2)
    statuses: list[str] = []
    processor.run(pending_items(db, job_id), on_item=statuses.append)

    assert statuses == ["failed"] * 5
    with db.connect() as conn:
        job = conn.execute(select(Job.status, Job.done, Job.failed)).one()
        errors = conn.execute(select(Item.error)).scalars().all()
        rows = conn.execute(select(func.count()).select_from(Explanation)).scalar()
    assert tuple(job) == ("finished", 0, 5) and rows == 0  # no row names a shard that is not there
    assert errors == ["storing results failed: OSError: No space left on device"] * 5
    assert processor.cpu_seconds.seconds["encode"] > 0  # the stages the benchmarks read
