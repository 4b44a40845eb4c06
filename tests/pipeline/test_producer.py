"""The producer side: sources and manifests as streams, the light install (no torch), and the message
contract as it lands in Redis. (`submit` and `run` declare their options once, in storage/job_options.py.)"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from salient_maps.storage.messages import MESSAGE_SCHEMA, TASK_NAME, MessageError, parse_chunk
from salient_maps.storage.sources import SourceError, iter_uris


def test_manifests_and_stdin_list_uris_in_order(tmp_path):
    (tmp_path / "list.txt").write_text("# a comment\nimgs/a.png\n\n  s3://bucket/b.jpg  \nhttps://h/c.png\n")
    (tmp_path / "with_header.csv").write_text("label,uri\ncat,imgs/d.png\ndog,file:///abs/e.png\n")
    (tmp_path / "no_header.csv").write_text("imgs/f.png,1\nimgs/g.png,2\n")
    (tmp_path / "records.jsonl").write_text('{"uri": "s3://bucket/h.png", "x": 1}\n"imgs/i.png"\n{"path": "j.png"}\n')
    base = tmp_path.as_uri()
    uris = list(iter_uris([str(tmp_path / n) for n in ("list.txt", "with_header.csv", "no_header.csv", "records.jsonl")]
                          + ["-"], stdin=io.StringIO("s3://bucket/k.png\nrelative.png\n")))
    assert uris == [
        f"{base}/imgs/a.png", "s3://bucket/b.jpg", "https://h/c.png",
        f"{base}/imgs/d.png", "file:///abs/e.png",
        f"{base}/imgs/f.png", f"{base}/imgs/g.png",
        "s3://bucket/h.png", f"{base}/imgs/i.png", f"{base}/j.png",
        "s3://bucket/k.png", (Path.cwd() / "relative.png").as_uri(),
    ]
    (tmp_path / "bad.jsonl").write_text('{"name": "no uri"}\n')
    with pytest.raises(SourceError, match="no uri/url/path/file"):
        list(iter_uris([str(tmp_path / "bad.jsonl")]))


def test_a_manifest_of_a_million_uris_streams(tmp_path):
    manifest = tmp_path / "big.txt"
    with open(manifest, "w") as f:
        f.writelines(f"s3://b/{i}.png\n" for i in range(200_000))
    stream = iter_uris([str(manifest)])
    assert next(stream) == "s3://b/0.png"  # the first URI comes before the file is read through
    assert sum(1 for _ in stream) == 199_999


def test_the_producer_imports_no_torch_and_no_workers():
    code = ("import sys, salient_maps.producer.submit, salient_maps.producer.cli, salient_maps.producer.jobs, salient_maps.producer.job_commands;"
            "from salient_maps.producer.cli import main; main.get_command(None, 'submit');"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision') or m.startswith('salient_maps.workers'));"
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_spec_validation():
    good = {"version": 1, "job_id": "j", "items": [{"id": 1, "uri": "s3://b/a.png"}],
            "spec": {"model": "resnet18", "methods": ["gradcam"], "targets": {"classes": [281, "tabby"]}}}
    chunk = parse_chunk(good)
    assert chunk.items == [(1, "s3://b/a.png")] and chunk.spec["batch_size"] == 16
    for broken in ({**good, "version": 2}, {**good, "items": []}, {**good, "items": [{"id": "1", "uri": "x"}]},
                   {**good, "spec": {**good["spec"], "targets": {"topk": 0}}},
                   {**good, "spec": {**good["spec"], "methods": []}}):
        with pytest.raises(MessageError):
            parse_chunk(broken)


def test_submit_records_items_and_publishes_json_chunks_by_task_name(pipeline, tiny_images):
    """The raw Redis list holds Celery protocol-2 JSON messages another language could write."""
    import redis

    from salient_maps.producer import submit
    from salient_maps.producer.jobs import get_job
    from salient_maps.storage.database import Item

    folder = tiny_images(5)
    job_id = submit([folder, folder / "img001.jpg", folder], chunk=2, model="resnet18", methods="gradcam",
                    classes="281,tabby", name="contract")
    job = get_job(pipeline.db(), job_id)
    assert (job.name, job.status, job.total) == ("contract", "running", 5)  # duplicates: one item each
    raw = redis.Redis.from_url(pipeline.env["SALIENT_BROKER_URL"]).lrange(pipeline.env["SALIENT_QUEUE"], 0, -1)
    messages = [json.loads(m) for m in reversed(raw)]  # LPUSH: the oldest is last
    assert len(messages) == 3  # chunks of 2, 2, 1
    from sqlalchemy import select

    with pipeline.db().connect() as conn:
        items = conn.execute(select(Item.id, Item.uri).where(Item.job_id == job_id).order_by(Item.id)).all()
    seen = []
    for message in messages:
        assert message["headers"]["task"] == TASK_NAME
        assert message["content-type"] == "application/json"
        args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        assert args == []
        chunk = parse_chunk(kwargs)
        assert chunk.job_id == job_id and chunk.spec["targets"] == {"classes": [281, "tabby"]}
        assert set(kwargs) == set(MESSAGE_SCHEMA["required"])
        seen.extend(chunk.items)
    assert seen == [tuple(row) for row in items]


def test_status_jobs_cancel_and_results_commands(pipeline, tiny_images):
    from sqlalchemy import select

    from salient_maps.producer.cli import main
    from salient_maps.producer.jobs import get_job
    from salient_maps.storage.database import Job

    runner = CliRunner()
    out = runner.invoke(main, ["submit", str(tiny_images(3)), "--model", "resnet18", "--methods", "gradcam",
                               "--classes", "281,tabby", "--localize", "--colormap", "viridis", "--name", "to-cancel"])
    assert out.exit_code == 0, out.output
    job_id = out.output.strip()
    with pipeline.db().connect() as conn:
        spec = conn.execute(select(Job.settings).where(Job.id == job_id)).scalar()
    assert spec["targets"] == {"classes": [281, "tabby"]}
    assert spec["options"] == {"localize": True, "colormap": "viridis"}
    assert get_job(pipeline.db(), job_id).total == 3
    out = runner.invoke(main, ["status", job_id, "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["status"] == "running" and json.loads(out.output)["total"] == 3
    out = runner.invoke(main, ["jobs"])
    assert job_id in out.output and "to-cancel" in out.output
    out = runner.invoke(main, ["cancel", job_id])
    assert out.exit_code == 0 and "3 images skipped" in out.output
    out = runner.invoke(main, ["status"])
    assert "cancelled" in out.output and "skipped 3" in out.output
    out = runner.invoke(main, ["results", "--job", job_id])
    assert out.exit_code == 0, out.output
    records = [json.loads(line) for line in out.output.splitlines()]
    assert [(r["status"], r["error"]) for r in records] == [("skipped", "job cancelled")] * 3
    assert runner.invoke(main, ["cancel", "nope"]).exit_code != 0
    out = runner.invoke(main, ["db", "upgrade"])
    assert out.exit_code == 0 and "revision" in out.output
