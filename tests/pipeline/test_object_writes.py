"""Writing content-addressed objects on S3: one request per object (a conditional PUT, no HEAD first),
and an existing object is kept (SeaweedFS honours If-None-Match)."""

from __future__ import annotations

from salient_maps.storage.objects import open_store
from salient_maps.storage.settings import Settings


def test_s3_put_if_absent_is_one_conditional_put_that_keeps_the_first_object(pipeline):
    store = open_store(f"s3://{pipeline.bucket}/p", Settings())
    sent: list[tuple[str, bytes | None]] = []

    def record(request, **_):
        sent.append((request.method, request.headers.get("If-None-Match")))  # header values are bytes here

    store.client.meta.events.register("before-send.s3", record)
    try:
        store.put_if_absent("maps/a.npy", lambda: b"first", "application/octet-stream")
        store.put_if_absent("maps/a.npy", lambda: b"second", "application/octet-stream")
    finally:
        store.client.meta.events.unregister("before-send.s3", record)
    assert sent == [("PUT", b"*"), ("PUT", b"*")]
    assert store.get("maps/a.npy") == b"first"  # the server refused the second write (412), quietly
