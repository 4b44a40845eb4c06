"""The HTTP API: light (no torch), in step with `salient submit`, bearer tokens, body limits; then on the real
servers: a job submitted over HTTP to a real uvicorn, explained by a real worker, paged back; and
schemathesis requests generated from the API's own OpenAPI schema, none of which may get a 5xx."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import click
import cv2
import numpy as np
import pytest
from sqlalchemy import select

pytest.importorskip("fastapi", reason="the api extra is not installed")

from fastapi.testclient import TestClient  # noqa: E402

from salient_maps.storage.settings import Settings  # noqa: E402

SALIENT = str(Path(sys.executable).parent / "salient")
TOKEN = "s3cret-token-for-tests"


def _app(tmp_path, **settings):
    from salient_maps.producer.api import create_app

    return create_app(Settings(data_dir=tmp_path / "data", api_tokens=TOKEN, **settings))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_importing_and_building_the_api_imports_no_torch_and_no_workers(tmp_path):
    code = ("import sys; import salient_maps.producer.api, salient_maps.producer.api_command;"
            "from salient_maps.storage.settings import Settings;"
            f"salient_maps.producer.api.create_app(Settings(data_dir={str(tmp_path)!r}, api_tokens='t'));"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision') or m.startswith('salient_maps.workers'));"
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_post_jobs_takes_the_options_of_submit():
    """Same names, defaults, choices and bounds, as a client reads them in the OpenAPI schema."""
    from salient_maps.producer.api import JobRequest
    from salient_maps.producer.job_commands import submit

    submits = {p.name: p for p in submit.params if p.name not in ("sources", "wait", "data_dir")}
    schema = JobRequest.model_json_schema()["properties"]
    assert set(schema) - set(submits) == {"uris", "manifest"}
    assert set(submits) - set(schema) == set()

    def constraint(name: str, key: str):
        return next((branch[key] for branch in schema[name].get("anyOf", [schema[name]]) if key in branch), None)

    given = submit.make_context("submit", ["s3://bucket/images/"]).params  # what submit gets when not told
    for name, param in submits.items():
        assert JobRequest.model_fields[name].default == given[name], name
        if isinstance(param.type, click.Choice):
            assert set(constraint(name, "enum")) == set(param.type.choices), name
        if isinstance(param.type, (click.IntRange, click.FloatRange)):
            assert (constraint(name, "minimum"), constraint(name, "maximum")) == (param.type.min, param.type.max), name


def test_result_records_have_the_fields_of_salient_results():
    from salient_maps.producer.api import ResultRecord
    from salient_maps.storage.results import FIELDS

    assert tuple(ResultRecord.model_fields) == FIELDS


def test_the_api_refuses_to_start_without_tokens_except_on_loopback_when_asked(tmp_path, run_cli):
    from salient_maps.producer.api import create_app
    from salient_maps.producer.api_command import is_loopback

    with pytest.raises(ValueError, match="SALIENT_API_TOKENS"):
        create_app(Settings(data_dir=tmp_path))
    assert "no API tokens" in run_cli(["api"], expect_exit=1).output
    out = run_cli(["api", "--insecure-no-auth", "--host", "0.0.0.0"], expect_exit=1).output
    assert "only on a loopback host" in out
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "127.8.0.1", "0.0.0.0", "10.0.0.2",
                                     "example.com")] == [True, True, True, True, False, False, False]
    with TestClient(create_app(Settings(data_dir=tmp_path), insecure_no_auth=True)) as client:
        assert client.get(f"/jobs/{uuid.uuid4()}").status_code == 404  # no token asked for


def test_only_a_configured_bearer_token_gets_in(tmp_path):
    from salient_maps.producer.api import create_app

    app = create_app(Settings(data_dir=tmp_path, api_tokens=f"{TOKEN}, second-token"))
    path = f"/jobs/{uuid.uuid4()}"
    with TestClient(app) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {TOKEN[:-1]}"},
                        {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": TOKEN}):
            response = client.get(path, headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["WWW-Authenticate"] == "Bearer"
        for token in (TOKEN, "second-token"):
            assert client.get(path, headers={"Authorization": f"Bearer {token}"}).status_code == 404
            assert client.delete(path, headers={"Authorization": f"Bearer {token}"}).status_code == 404
        assert client.delete(path).status_code == 401
        assert client.get("/openapi.json").status_code == 200  # the schema is public


def test_a_body_over_the_limit_gets_413_without_being_read(tmp_path):
    import asyncio

    app = _app(tmp_path, api_max_body_bytes=2048)
    reads = []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"x" * 1024, "more_body": True}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/jobs", "raw_path": b"/jobs", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                         (b"authorization", f"Bearer {TOKEN}".encode()), (b"content-length", b"1000000000")],
             "client": ("127.0.0.1", 5000), "server": ("testserver", 80)}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert reads == []  # refused on the header alone

    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    with TestClient(app) as client:
        chunks = (b"{" + b" " * 1000 for _ in range(3))  # no Content-Length: counted as it streams
        assert client.post("/jobs", content=chunks, headers=auth).status_code == 413
        just_under = json.dumps({"uris": []}).encode().ljust(2048)
        assert client.post("/jobs", content=just_under, headers=auth).status_code == 422  # read, then judged


def test_post_jobs_takes_remote_uris_only_and_checks_before_submitting(tmp_path):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(_app(tmp_path)) as client:
        for body in ({"uris": ["/etc/passwd"]}, {"uris": ["file:///etc/hosts"]}, {"manifest": "/tmp/list.txt"},
                     {"uris": ["s3://bucket/a.png"], "weights": "/root/model.pt"}, {"uris": ["ftp://h/a.png"]},
                     {"uris": ["s3://b/a.png"], "labels": "labels.json"}, {}, {"uris": []},
                     {"uris": ["s3://b/a.png"], "methods": " , "}, {"uris": ["s3://b/a.png"], "methods": []},
                     {"manifest": "s3://b/list.parquet"}, {"uris": ["s3://b/a.png"], "name": "nul\x00"},
                     b'{"uris": ["s3://b/a.png"], "noise": 1e400}', {"uris": ["s3://b/a.png"], "unknown_option": 1}):
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            response = client.post("/jobs", content=raw, headers={**auth, "Content-Type": "application/json"})
            assert response.status_code == 422, (body, response.text)
            assert isinstance(response.json()["detail"], list)  # FastAPI's shape, as the schema declares


def test_an_unreachable_broker_is_a_503_and_the_job_is_cancelled(tmp_path):
    from salient_maps.producer.jobs import list_jobs
    from salient_maps.storage.database import connect

    app = _app(tmp_path, broker_url=f"redis://127.0.0.1:{_free_port()}/0")  # nothing listens there
    with TestClient(app) as client:
        response = client.post("/jobs", json={"uris": ["https://images.example.com/a.png"]},
                               headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 503 and "try again" in response.json()["detail"]
    assert "127.0.0.1" not in response.json()["detail"]  # server details stay in the server's log
    [job] = list_jobs(connect(Settings(data_dir=tmp_path / "data").resolved_database_url))
    assert job.status == "cancelled"


# --- on the real servers -------------------------------------------------------------------------------------


class Http:
    def __init__(self, base: str, token: str = TOKEN):
        self.base, self.token = base, token

    def __call__(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict, dict]:
        request = urllib.request.Request(self.base + path, method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {self.token}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read()), dict(response.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null"), dict(exc.headers)


@pytest.fixture
def api_server(pipeline, tmp_path):
    """`salient api` as its own process (uvicorn) on the test's servers."""
    port = _free_port()
    log = tmp_path / "api.log"
    process = subprocess.Popen([SALIENT, "api", "--port", str(port)], stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                               env={**os.environ, **pipeline.env, "SALIENT_API_TOKENS": TOKEN})
    http = Http(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(http.base + "/openapi.json", timeout=1).close()
            break
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    yield http
    process.terminate()
    process.wait(20)


def test_a_job_submitted_over_http_is_explained_and_paged_back(pipeline, api_server, smooth_rgb, encode_image):
    import redis

    from salient_maps.storage.messages import parse_chunk

    http, s3, bucket = api_server, pipeline.s3, pipeline.bucket
    for i in range(3):
        s3.put_object(Bucket=bucket, Key=f"inputs/img{i}.png", Body=encode_image(smooth_rgb(40, 56, seed=i), "PNG"))
    s3.put_object(Bucket=bucket, Key="inputs/broken.png", Body=b"not an image")
    spec = {"model": "resnet18", "methods": "gradcam", "topk": 1, "batch_size": 4}

    body = {"uris": [f"s3://{bucket}/inputs/"], "chunk": 3, "name": "api", **spec}
    status, job, headers = http("POST", "/jobs", body)
    assert status == 201, job
    assert headers["location"] == f"/jobs/{job['id']}"
    assert (job["name"], job["status"], job["total"]) == ("api", "running", 4)
    raw = redis.Redis.from_url(pipeline.env["SALIENT_BROKER_URL"]).lrange(pipeline.env["SALIENT_QUEUE"], 0, -1)
    chunks = [parse_chunk(json.loads(base64.b64decode(json.loads(m)["body"]))[1]) for m in raw]
    assert sorted(len(c.items) for c in chunks) == [1, 3] and {c.job_id for c in chunks} == {job["id"]}

    pipeline.start_worker("api")
    deadline = time.monotonic() + 120
    while job["status"] != "finished":
        assert time.monotonic() < deadline, pipeline.log_tail()
        time.sleep(0.3)
        status, job, _ = http("GET", f"/jobs/{job['id']}")
        assert status == 200
    assert (job["total"], job["done"], job["failed"], job["skipped"]) == (4, 3, 1, 0)

    records, cursor, pages = [], 0, 0
    while cursor is not None:
        status, page, _ = http("GET", f"/jobs/{job['id']}/results?limit=3&cursor={cursor}")
        assert status == 200
        records += page["records"]
        cursor, pages = page["next_cursor"], pages + 1
    assert pages == 2 and len(records) == 4  # one explanation per image (topk 1), one record for the broken one
    by_uri = {r["uri"].rsplit("/", 1)[1]: r for r in records}
    assert sorted(by_uri) == ["broken.png", "img0.png", "img1.png", "img2.png"]
    assert all(by_uri[f"img{i}.png"]["status"] == "done" and by_uri[f"img{i}.png"]["shard"] for i in range(3))
    assert all(by_uri[f"img{i}.png"]["method"] == "gradcam" for i in range(3))
    assert by_uri["broken.png"]["status"] == "failed" and by_uri["broken.png"]["shard"] is None

    # a map and an overlay, drawn on demand from the shard
    record = by_uri["img0.png"]
    query = urllib.parse.urlencode({"sha256": record["sha256"], "method": "gradcam", "class_id": record["class_id"]})

    def fetch(path: str, token: str = TOKEN) -> tuple[str, bytes]:
        request = urllib.request.Request(http.base + path, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.headers["Content-Type"], response.read()

    kind, png = fetch(f"/jobs/{job['id']}/overlay?{query}")
    drawn = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert kind == "image/png" and drawn.shape[:2] == (40, 56)  # on the thumbnail: the small image itself
    _, npy = fetch(f"/jobs/{job['id']}/map?{query}&size=layer")
    heat = np.load(io.BytesIO(npy), allow_pickle=False)
    assert heat.shape == (7, 7) and heat.dtype == np.float32 and 0 <= heat.min() and heat.max() <= 1
    with pytest.raises(urllib.error.HTTPError) as unlocalized:  # the job ran without --localize
        fetch(f"/jobs/{job['id']}/localization_mask?{query}")
    assert unlocalized.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as refused:
        fetch(f"/jobs/{job['id']}/overlay?{query}", token="wrong")
    assert refused.value.code == 401
    other = urllib.parse.urlencode({"sha256": "0" * 64, "method": "gradcam", "class_id": 1})
    with pytest.raises(urllib.error.HTTPError) as missing:
        fetch(f"/jobs/{job['id']}/overlay?{other}")
    assert missing.value.code == 404
    _, all_at_once, _ = http("GET", f"/jobs/{job['id']}/results?limit=1000")
    assert all_at_once["records"] == records and all_at_once["next_cursor"] is None

    status, errors, _ = http("GET", f"/jobs/{job['id']}/errors")
    assert status == 200 and errors["next_cursor"] is None
    [error] = errors["errors"]
    assert error["uri"] == f"s3://{bucket}/inputs/broken.png" and error["error"]

    # A manifest in the bucket; cancelled before any worker sees it.
    pipeline.stop_workers()
    listing = "".join(f"s3://{bucket}/inputs/img{i}.png\n" for i in range(3))
    s3.put_object(Bucket=bucket, Key="lists/three.txt", Body=listing.encode())
    status, second, _ = http("POST", "/jobs", {"manifest": f"s3://{bucket}/lists/three.txt", **spec})
    assert status == 201 and second["total"] == 3
    status, cancelled, _ = http("DELETE", f"/jobs/{second['id']}")
    assert status == 200 and (cancelled["status"], cancelled["skipped"]) == ("cancelled", 3)
    s3.put_object(Bucket=bucket, Key="lists/relative.txt", Body=b"img0.png\n")
    status, refused, _ = http("POST", "/jobs", {"manifest": f"s3://{bucket}/lists/relative.txt", **spec})
    assert status == 422 and refused["detail"] == [{"type": "value_error", "loc": ["body", "manifest"],
                                                    "msg": "entry 1 is not an absolute s3:// or http(s):// URI"}]
    status, missing, _ = http("POST", "/jobs", {"uris": [f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x/"]})
    assert status == 400, missing
    assert Http(http.base, token="wrong")("GET", f"/jobs/{job['id']}")[0] == 401


EXAMPLES = 20  # per operation and generation mode


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_request_from_the_schema_gets_a_server_error(pipeline, mode):
    """Requests generated from the API's own schema (valid ones, then invalid ones), a bounded number per
    operation, against the real servers: every answer documented, of the declared shape, never a 5xx.
    (Driven through hypothesis directly: schemathesis' pytest loader does not run under pytest 9.)"""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                                   status_code_conformance)

    from salient_maps.producer.api import create_app

    from salient_maps.producer.submit import submit
    from salient_maps.storage.database import Item, finish_item

    # A job to read back, so the GET routes answer 200 too: pending items and a failed one.
    job_id = submit([f"https://images.invalid/{i}.png" for i in range(5)], model="resnet18", chunk=2)
    db = pipeline.db()
    with db.begin() as conn:
        first = conn.execute(select(Item.id).where(Item.job_id == job_id).order_by(Item.id)).scalars().first()
        finish_item(conn, first, job_id, "failed", error="HTTP 404 Not Found")

    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(Settings(api_tokens=TOKEN)))
    operations = sorted((result.ok() for result in schema.get_all_operations()), key=lambda op: op.method == "delete")
    assert sorted(op.label for op in operations) == [
        "DELETE /jobs/{job_id}", "GET /jobs/{job_id}", "GET /jobs/{job_id}/errors",
        "GET /jobs/{job_id}/localization_mask", "GET /jobs/{job_id}/map", "GET /jobs/{job_id}/overlay",
        "GET /jobs/{job_id}/results", "POST /jobs"]
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    generation = schemathesis.GenerationMode(mode)
    for operation in operations:
        strategies = [operation.as_strategy(generation)]
        if "{job_id}" in operation.path:
            strategies.append(operation.as_strategy(generation, path_parameters={"job_id": job_id}))
        for strategy in strategies:
            @given(case=strategy)
            @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def call(case):
                case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=checks)

            call()
