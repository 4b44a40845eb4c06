"""Secrets stay out of what salient prints: passwords in URLs are masked wherever settings or errors show them.

The whole-pipeline check (real Redis with a password, PostgreSQL with a password, S3 keys, every output grepped)
is tests/pipeline/test_security.py; these are the quick, local halves of it."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from salient_maps.storage.settings import Settings, mask_url

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize("url, masked", [
    (f"redis://:{SECRET}@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    (f"rediss://default:{SECRET}@cache.example.com:6380/1", "rediss://default:***@cache.example.com:6380/1"),
    (f"postgresql+psycopg://salient:{SECRET}@db:5432/salient", "postgresql+psycopg://salient:***@db:5432/salient"),
    (f"postgresql://salient:{SECRET}:more@db/salient", "postgresql://salient:***@db/salient"),  # ':' inside
    (f"http://key:{SECRET}@s3.local:8333", "http://key:***@s3.local:8333"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),  # nothing to hide
    ("postgresql://salient@db/salient", "postgresql://salient@db/salient"),
    (None, None),
])
def test_mask_url(url, masked):
    assert mask_url(url) == masked


def test_settings_printed_in_any_way_hide_passwords_and_tokens(monkeypatch):
    monkeypatch.setenv("SALIENT_BROKER_URL", f"redis://:{SECRET}@redis:6379/0")
    monkeypatch.setenv("SALIENT_DATABASE_URL", f"postgresql+psycopg://salient:{SECRET}@db/salient")
    monkeypatch.setenv("SALIENT_S3_ENDPOINT_URL", f"http://key:{SECRET}@s3:8333")
    monkeypatch.setenv("SALIENT_API_TOKENS", f"{SECRET},other-{SECRET}")
    settings = Settings()
    assert settings.broker_url.endswith(f"{SECRET}@redis:6379/0")  # the value itself is intact
    for shown in (repr(settings), str(settings), f"{settings}", f"{settings!r}"):
        assert SECRET not in shown
        assert "redis://:***@redis:6379/0" in shown and "salient:***@db/salient" in shown


def test_a_database_that_refuses_the_connection_does_not_echo_the_password():
    engine = sa.create_engine(f"postgresql+psycopg://salient:{SECRET}@127.0.0.1:1/salient")
    assert SECRET not in repr(engine) and SECRET not in str(engine.url)
    with pytest.raises(sa.exc.OperationalError) as refused:
        engine.connect()
    assert SECRET not in str(refused.value) and SECRET not in repr(refused.value)


def test_an_unreachable_broker_is_named_masked(run_cli, tiny_images, tmp_path, monkeypatch):
    monkeypatch.setenv("SALIENT_BROKER_URL", f"redis://:{SECRET}@127.0.0.1:1/0")  # nothing listens on port 1
    result = run_cli(["submit", tiny_images(1), "--data", tmp_path / "data"], expect_exit=1)
    assert "cannot publish to the broker redis://:***@127.0.0.1:1/0" in result.output
    assert SECRET not in result.output


def test_reading_errors_never_carry_the_uri(tmp_path):
    """An item's reason is shown next to its URI by every results command, so it never repeats the URI (a
    presigned URL's signature, a user name): the reasons are fixed phrases plus numbers and addresses."""
    from salient_maps.storage.sources import SourceError, read_uri

    settings = Settings(file_roots=[tmp_path])
    for uri in (f"http://user:{SECRET}@example.com/a.png", f"http://169.254.169.254/?X-Amz-Signature={SECRET}",
                f"file://{tmp_path}/{SECRET}.png", f"file:///etc/{SECRET}.png", f"gopher://h/{SECRET}"):
        with pytest.raises(SourceError) as failed:
            read_uri(uri, 100, settings)
        assert SECRET not in str(failed.value), str(failed.value)
