"""The Alembic migrations build exactly the models' schema, and an older database is migrated on connect."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from salient_maps.storage.database import SCHEMA_REVISION, Base, Item, Job, connect, create_job, schema_revision
from salient_maps.storage.migrations import alembic_config, head_revision, upgrade


def test_schema_revision_is_the_newest_migration():
    assert SCHEMA_REVISION == head_revision()


def test_migrations_build_the_models_schema(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'migrated.db'}")
    with engine.begin() as conn:
        upgrade(conn)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        assert schema_revision(conn) == SCHEMA_REVISION


def test_a_new_database_is_built_and_stamped_without_migrating(tmp_path):
    engine = connect(f"sqlite:///{tmp_path / 'new.db'}")
    with engine.connect() as conn:
        assert schema_revision(conn) == SCHEMA_REVISION
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_a_database_from_before_migrations_is_migrated_and_keeps_its_rows(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = sa.create_engine(url)
    with old.begin() as conn:  # the first schema, made by create_all: no alembic_version table
        command.upgrade(alembic_config(conn), "0001")
        conn.execute(sa.text("DROP TABLE alembic_version"))
        conn.execute(sa.text("INSERT INTO jobs (id, status, settings, total, done, failed, skipped, created_at) "
                             "VALUES ('j1', 'running', '{}', 1, 0, 0, 0, '2026-01-01')"))
        conn.execute(sa.text("INSERT INTO items (job_id, uri, status, updated_at) "
                             "VALUES ('j1', 'file:///a.png', 'pending', '2026-01-01')"))
    engine = connect(url)
    with engine.connect() as conn:
        assert schema_revision(conn) == SCHEMA_REVISION
        assert conn.execute(sa.select(Item.uri, Item.deliveries)).all() == [("file:///a.png", 0)]
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    create_job(engine, {})  # and it is usable
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(Job)).scalar() == 2


def test_results_of_the_layout_before_shards_are_kept_and_say_so(tmp_path):
    import pytest

    from salient_maps.storage.results import iter_results
    from salient_maps.storage.settings import Settings

    url = f"sqlite:///{tmp_path / 'salient.db'}"
    old = sa.create_engine(url)
    with old.begin() as conn:
        command.upgrade(alembic_config(conn), "0004")
        conn.execute(sa.text("INSERT INTO jobs (id, status, settings, settings_digest, total, done, failed, skipped, "
                             "created_at) VALUES ('j1', 'finished', '{}', 'd1', 1, 1, 0, 0, '2026-01-01')"))
        conn.execute(sa.text("INSERT INTO items (job_id, uri, sha256, status, updated_at, deliveries) "
                             "VALUES ('j1', 'file:///a.png', 'aa', 'done', '2026-01-01', 1)"))
        conn.execute(sa.text("INSERT INTO images (sha256, width, height, created_at) "
                             "VALUES ('aa', 4, 3, '2026-01-01')"))
        conn.execute(sa.text(
            "INSERT INTO explanations (sha256, settings_digest, model, method, layer, class_id, class_name, score, "
            "rank, map_key, overlay_key, extra, seconds, created_at) VALUES ('aa', 'd1', 'm', 'gradcam', 'layer4', "
            "1, 'one', 0.9, 1, 'maps/a.npy', 'overlays/a.png', '{}', 0.1, '2026-01-01')"))
    connect(url).dispose()  # migrates to the newest revision
    with sa.create_engine(url).connect() as conn:
        assert conn.execute(sa.text("SELECT map_key FROM explanations_0004")).scalars().all() == ["maps/a.npy"]
        assert conn.execute(sa.text("SELECT count(*) FROM explanations")).scalar() == 0
    with pytest.raises(LookupError, match="before result shards .* 1 results are kept in the table explanations_0004"):
        list(iter_results(Settings(data_dir=tmp_path), "j1"))


def test_settings_records_gain_layout_and_preprocessing_empty_for_old_ones(tmp_path):
    from salient_maps.storage.database import ResultSettings

    url = f"sqlite:///{tmp_path / 'salient.db'}"
    with sa.create_engine(url).begin() as conn:
        command.upgrade(alembic_config(conn), "0006")
        conn.execute(sa.text("INSERT INTO result_settings (digest, model, layer, methods, overlay, class_names, "
                             "created_at) VALUES ('d1', 'm', 'layer4', '{}', '{}', '[]', '2026-01-01')"))
    engine = connect(url)  # migrates to the newest revision
    with engine.begin() as conn:
        assert conn.execute(sa.select(ResultSettings.digest, ResultSettings.layout,
                                      ResultSettings.preprocessing)).all() == [("d1", None, None)]
        conn.execute(sa.insert(ResultSettings).values(
            digest="d2", model="m", layer="blocks.11.norm1", methods={}, overlay={}, class_names=[],
            layout={"kind": "tokens", "prefix_tokens": 1}, preprocessing={"input_size": 224, "crop": 224}))
        assert conn.execute(sa.select(ResultSettings.layout).where(ResultSettings.digest == "d2")).scalar_one() \
            == {"kind": "tokens", "prefix_tokens": 1}
    with engine.begin() as conn:  # and back: 0006 has neither column
        command.downgrade(alembic_config(conn), "0006")
        assert "layout" not in {c["name"] for c in sa.inspect(conn).get_columns("result_settings")}


def test_explanations_are_indexed_by_shard_and_back(tmp_path):
    engine = connect(f"sqlite:///{tmp_path / 'salient.db'}")  # built at the newest revision
    with engine.begin() as conn:
        assert "ix_explanations_shard_id" in {i["name"] for i in sa.inspect(conn).get_indexes("explanations")}
        command.downgrade(alembic_config(conn), "0008")
        assert "ix_explanations_shard_id" not in {i["name"] for i in sa.inspect(conn).get_indexes("explanations")}
        command.upgrade(alembic_config(conn), "0009")
        assert "ix_explanations_shard_id" in {i["name"] for i in sa.inspect(conn).get_indexes("explanations")}


def test_drift_and_own_truth_columns_come_and_go(tmp_path):
    """0008: schedules' drift columns, truth digests (null on older rows) and item_metrics; and back to 0007."""
    url = f"sqlite:///{tmp_path / 'salient.db'}"
    with sa.create_engine(url).begin() as conn:
        command.upgrade(alembic_config(conn), "0007")
        conn.execute(sa.text("INSERT INTO jobs (id, status, settings, total, done, failed, skipped, created_at) "
                             "VALUES ('j1', 'running', '{}', 1, 0, 0, 0, '2026-01-01')"))
        conn.execute(sa.text("INSERT INTO items (job_id, uri, status, updated_at, deliveries, truth) VALUES "
                             "('j1', 'file:///a.png', 'pending', '2026-01-01', 0, '{\"boxes\": [[0, 0, 2, 2]]}')"))
    engine = connect(url)
    with engine.begin() as conn:
        assert conn.execute(sa.select(Item.uri, Item.truth_digest)).all() == [("file:///a.png", None)]
        tables = sa.inspect(conn)
        assert {"drift_thresholds", "baseline_job_id", "drift"} <= {c["name"] for c in tables.get_columns("schedules")}
        assert "truth_digest" in {c["name"] for c in tables.get_columns("explanations")}
        assert tables.has_table("item_metrics")
        command.downgrade(alembic_config(conn), "0007")
        tables = sa.inspect(conn)
        assert not tables.has_table("item_metrics")
        assert "truth_digest" not in {c["name"] for c in tables.get_columns("items")}
        assert "drift" not in {c["name"] for c in tables.get_columns("schedules")}
        assert conn.execute(sa.text("SELECT uri FROM items")).scalars().all() == ["file:///a.png"]
