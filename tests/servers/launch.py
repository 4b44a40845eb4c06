"""Start real Redis, PostgreSQL and SeaweedFS (S3) servers on loopback, on free ports, in a folder.

Used by the pipeline tests' session fixtures and by bench/pipeline.py. Each ``start_*`` returns a
running server with ``stop()`` and ``start()`` (again, on the same port and data folder: the fault
tests restart servers); ``missing()`` says which binaries are not installed (run tests/servers/install.sh).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

S3_ACCESS_KEY = "salient-test"
S3_SECRET_KEY = "salient-test-secret-key"
_PG_BINARIES = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in [Path(sys.executable).parent, *_PG_BINARIES]:  # the venv (weed), Debian's postgres bin
        if (folder / name).is_file():
            return str(folder / name)
    return None


def missing() -> list[str]:
    return [name for name in ("redis-server", "initdb", "pg_ctl", "weed") if _which(name) is None]


def _wait(ready: Callable[[], bool], what: str, process: subprocess.Popen | None, log: Path | None,
          timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{tail}")
        try:
            if ready():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout}s")


@dataclass
class Server:
    url: str
    process: subprocess.Popen | None
    stop_command: list[str] | None = None
    # Starts the server (again) and waits until it answers; returns its process, if it has one of ours.
    launch: Callable[[], subprocess.Popen | None] | None = None

    def start(self) -> None:
        """Start a stopped server again: same port, same data folder."""
        self.process = self.launch()

    def stop(self) -> None:
        if self.stop_command:
            subprocess.run(self.stop_command, capture_output=True, timeout=30)
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_redis(folder: Path, appendonly: bool = False) -> Server:
    """``appendonly``: persist every write (what production runs); off, a restart loses all messages."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = folder / "redis.log"
    url = f"redis://127.0.0.1:{port}/0"

    def ready() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def launch() -> subprocess.Popen:
        process = subprocess.Popen(
            [_which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
             "--save", "", "--appendonly", "yes" if appendonly else "no", "--maxmemory-policy", "noeviction",
             "--logfile", str(log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait(ready, "redis-server", process, log)
        return process

    return Server(url, launch(), launch=launch)


def start_postgres(folder: Path) -> Server:
    """PostgreSQL with trust auth on 127.0.0.1; as root it runs as the ``postgres`` user (it refuses root)."""
    folder.mkdir(parents=True, exist_ok=True)
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        # Every parent of the data folder must stay reachable by postgres (o+x) while it runs. Not under
        # pytest's temporary folders: each new pytest session resets /tmp/pytest-of-root to 0700, and the
        # server then can no longer read its own pg_hba.conf on a reload. A folder of its own in /tmp instead,
        # removed when this process ends (the server is stopped before that).
        own = Path(tempfile.mkdtemp(prefix="salient-postgres-"))
        own.chmod(0o711)
        atexit.register(shutil.rmtree, own, ignore_errors=True)
        (folder / "server").unlink(missing_ok=True)
        (folder / "server").symlink_to(own)  # where its log is, for whoever looks in the test's folder
        folder = own
        shutil.chown(folder, "postgres")
    data, sockets, log = folder / "data", folder / "sockets", folder / "postgres.log"
    sockets.mkdir(exist_ok=True)
    if as_user:
        shutil.chown(sockets, "postgres")
    if not data.exists():
        subprocess.run([*as_user, _which("initdb"), "-D", str(data), "--auth=trust", "-U", "postgres",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=120)
    port = free_port()
    options = (f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
               "-c full_page_writes=off -c max_connections=200")

    def launch() -> None:
        started = subprocess.run([*as_user, _which("pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w",
                                  "start"], capture_output=True, text=True, timeout=60)
        if started.returncode:
            raise RuntimeError(f"pg_ctl start failed: {started.stdout}{started.stderr}")

    launch()
    # fast: every connection is cut, committed work kept (immediate would be a crash, and with
    # synchronous_commit off a crash loses the last commits: not a restart)
    stop = [*as_user, _which("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]
    return Server(f"postgresql+psycopg://postgres@127.0.0.1:{port}", None, stop_command=stop, launch=launch)


def start_seaweedfs(folder: Path) -> Server:
    """``weed mini`` with an identities file, so S3 requests must be signed with the test key."""
    folder.mkdir(parents=True, exist_ok=True)
    identities = folder / "identities.json"
    identities.write_text(json.dumps({"identities": [{
        "name": "salient", "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {name: free_port() for name in (
        "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
        "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc", "s3.port.iceberg", "s3.port.lance")}
    log = folder / "weed.log"
    (folder / "data").mkdir(exist_ok=True)
    url = f"http://127.0.0.1:{ports['s3.port']}"
    client = s3_client(url)

    def launch() -> subprocess.Popen:
        process = subprocess.Popen(
            [_which("weed"), "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-s3.config={identities}", "-webdav=false", "-admin.ui=false",
             # every test's bucket is a collection with a volume of its own; left at 0, the volume
             # count is free disk / 128 MB, so a nearly full disk gives ~12 buckets and then
             # "no free volumes left" (CI failed so). Volumes are sparse files: a fixed count is safe.
             "-volume.max=4000", "-master.volumeSizeLimitMB=64",
             *(f"-{name}={port}" for name, port in ports.items())],
            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        _wait(lambda: client.list_buckets() is not None, "weed mini (S3)", process, log, timeout=60)
        return process

    return Server(url, launch(), launch=launch)


def s3_client(endpoint_url: str):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint_url, aws_access_key_id=S3_ACCESS_KEY,
                        aws_secret_access_key=S3_SECRET_KEY, region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard"}))
