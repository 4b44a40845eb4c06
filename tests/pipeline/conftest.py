"""Real servers for the pipeline tests: Redis, PostgreSQL 15 and SeaweedFS (S3), started once per
session on loopback (tests/servers/launch.py); each test gets its own database, bucket and queue.
Tests that need them are skipped when the binaries are missing (run tests/servers/install.sh)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "servers"))
import launch  # noqa: E402

SALIENT = str(Path(sys.executable).parent / "salient")


@dataclass
class Servers:
    redis: launch.Server
    postgres: launch.Server
    s3: launch.Server


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory):
    absent = launch.missing()
    if absent:
        pytest.skip(f"servers not installed ({', '.join(absent)}): run tests/servers/install.sh")
    folder = tmp_path_factory.mktemp("servers")
    started: list[launch.Server] = []
    try:
        started.append(launch.start_redis(folder / "redis"))
        started.append(launch.start_postgres(folder / "postgres"))
        started.append(launch.start_seaweedfs(folder / "s3"))
        yield Servers(*started)
    finally:
        for server in reversed(started):
            server.stop()


@dataclass
class Pipeline:
    """One test's slice of the servers, and the SALIENT_* environment that points at it."""

    env: dict[str, str]
    bucket: str
    prefix: str
    database_url: str
    s3: object  # boto3 client with the test credentials
    workers: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def settings(self):
        from salient_maps.storage.settings import Settings

        return Settings()

    def db(self):
        from salient_maps.storage.database import connect

        return connect(self.database_url)

    def bucket_keys(self) -> list[str]:
        keys = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            keys.extend(obj["Key"] for obj in page.get("Contents", ()))
        return keys

    def start_worker(self, name: str, *args: str, wait: bool = True, program: tuple[str, ...] = (SALIENT,)
                     ) -> subprocess.Popen:
        """``program``: what runs ``worker ARGS`` (the poison tests start one with faults injected)."""
        log = Path(self.env["SALIENT_DATA_DIR"]).parent / f"worker-{name}-{len(self.logs)}.log"
        process = subprocess.Popen(
            [*program, "worker", "--device", "cpu", "--torch-threads", "1", "--hostname", f"{name}@test", *args],
            env={**os.environ, **self.env}, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        self.workers.append(process)
        self.logs.append(log)
        if wait:
            deadline = time.monotonic() + 60
            while b" ready." not in log.read_bytes():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker {name} did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.1)
        return process

    def stop_workers(self) -> None:
        for process in self.workers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # warm shutdown
        for process in self.workers:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def log_tail(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-2500:]}" for log in self.logs if log.exists())


@pytest.fixture
def pipeline(servers: Servers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh PostgreSQL database, S3 bucket and queue; SALIENT_* set in this process too."""
    import sqlalchemy as sa

    tag = uuid.uuid4().hex[:10]
    engine = sa.create_engine(f"{servers.postgres.url}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE t_{tag}"))
    engine.dispose()
    bucket = f"salient-{tag}"
    s3 = launch.s3_client(servers.s3.url)
    s3.create_bucket(Bucket=bucket)
    env = {
        "SALIENT_BROKER_URL": servers.redis.url,
        "SALIENT_QUEUE": f"salient-{tag}",
        "SALIENT_DATABASE_URL": f"{servers.postgres.url}/t_{tag}",
        "SALIENT_OBJECT_STORE_URL": f"s3://{bucket}/results",
        "SALIENT_S3_ENDPOINT_URL": servers.s3.url,
        "SALIENT_DATA_DIR": str(tmp_path / "data"),
        # Short enough that a killed worker's messages come back within the test.
        "SALIENT_VISIBILITY_TIMEOUT": "10",
        "SALIENT_UNACKED_RESTORE_INTERVAL": "1",
        "AWS_ACCESS_KEY_ID": launch.S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": launch.S3_SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    pipe = Pipeline(env=env, bucket=bucket, prefix="results/", database_url=env["SALIENT_DATABASE_URL"], s3=s3)
    yield pipe
    pipe.stop_workers()
