"""One settings object: environment over an optional TOML file over defaults; secrets never printed."""

from __future__ import annotations

import pytest

from salient_maps.storage.settings import Settings, mask_url


def test_environment_overrides_the_config_file_which_overrides_defaults(tmp_path, monkeypatch):
    config = tmp_path / "salient.toml"
    config.write_text('chunk_size = 7\nqueue = "from-file"\nbroker_url = "redis://r:1/2"\n')
    monkeypatch.setenv("SALIENT_CONFIG_FILE", str(config))
    monkeypatch.setenv("SALIENT_QUEUE", "from-env")
    settings = Settings()
    assert (settings.chunk_size, settings.queue, settings.broker_url) == (7, "from-env", "redis://r:1/2")
    assert settings.visibility_timeout == 3600  # default
    monkeypatch.setenv("SALIENT_CONFIG_FILE", str(tmp_path / "missing.toml"))
    with pytest.raises(FileNotFoundError):
        Settings()


def test_passwords_in_urls_are_masked_when_printed(monkeypatch):
    monkeypatch.setenv("SALIENT_DATABASE_URL", "postgresql://salient:s3cret@db:5432/salient")
    monkeypatch.setenv("SALIENT_BROKER_URL", "redis://:hunter2@redis:6379/0")
    settings = Settings()
    assert "s3cret" not in repr(settings) and "hunter2" not in str(settings)
    assert "postgresql://salient:***@db:5432/salient" in repr(settings)
    assert settings.database_url.endswith("s3cret@db:5432/salient")  # the value itself is intact
    assert mask_url("redis://redis:6379/0") == "redis://redis:6379/0"


def test_a_restore_lock_left_by_a_dead_worker_expires_after_ten_sweeps(pipeline):
    """A worker killed while it sweeps for dead workers' messages leaves kombu's restore lock in Redis: the others
    sweep again once it expires, ten sweep intervals later, not after kombu's fixed five minutes."""
    from kombu.transport.redis import Mutex

    from salient_maps.producer.queue import celery_client

    for interval, expire in (("1", 10), ("30", 300)):
        app = celery_client(Settings(broker_url=pipeline.env["SALIENT_BROKER_URL"], unacked_restore_interval=interval))
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            client = channel.client
            with Mutex(client, channel.unacked_mutex_key, channel.unacked_mutex_expire):
                ttl = client.ttl(channel.unacked_mutex_key)  # what a sweeper dying here would leave
        assert expire - 1 <= ttl <= expire
