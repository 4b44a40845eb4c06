"""Load test: many tiny synthetic images through submit -> Redis -> workers -> object store + PostgreSQL,
on loopback servers, with the cheapest explanation (Grad-CAM on mobilenet_v3_small, top-1).

What it measures:
- producer memory: the RSS of the `salient submit` process, sampled from /proc every 0.1 s while it lists,
  records and publishes the URIs; it must stay flat (quoted at 10 %, 50 % and 100 % of the URIs recorded);
- database consistency, during the run and after it: every few seconds, in one REPEATABLE READ snapshot,
  each job counter equals its count of item statuses; at the end also one image row and one explanation
  per done image, and the store holds exactly the objects the rows name;
- queue-to-done latency per image (p50/p95/p99): the time the image's item was done minus the time it was
  recorded, which is when it was published give or take one page (submit publishes every page of 1,000
  URIs right after recording it; record times come from polling max(items.id) every 50 ms);
- start-up against speed: when the first items were recorded and the first image was done, and the rate between
  the 10th and 90th percentile of the images' ends;
- no false alarm from the reconciler: it runs every 10 s with a pending timeout of 60 s, far shorter
  than the time most images wait in the queue, and must publish nothing again (``requeued_items``).

    .venv/bin/python bench/load.py [--uris 10000] [--workers 2] [--store s3|local] [--keep]

Default 10,000 URIs; --uris 100000 is the full load (see README for the times measured). Images are 16x16
PNGs, each different, read from a local folder (file:// URIs); the maps are 224x224 whatever the input.
Needs the servers (tests/servers/install.sh). Progress on stderr; the last line of stdout is JSON.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from pipeline import SALIENT, Stack, seconds_to_end  # noqa: E402  (also puts the repo and tests/servers on the path)

SPEC_ARGS = ["--model", "mobilenet_v3_small", "--methods", "gradcam", "--topk", "1", "--batch-size", "32"]


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_images(folder: Path, n: int) -> Path:
    """n distinct 16x16 PNGs in folders of 1,000, and a manifest naming them; returns the manifest."""
    import cv2

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    manifest = folder.parent / "uris.txt"
    with open(manifest, "w") as out:
        for i in range(n):
            sub = folder / f"{i // 1000:04d}"
            if i % 1000 == 0:
                sub.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
            path = sub / f"{i:07d}.png"
            path.write_bytes(cv2.imencode(".png", pixels)[1].tobytes())
            out.write(f"{path}\n")
    return manifest


class Sampler(threading.Thread):
    """Calls ``sample()`` every ``every`` seconds until stopped."""

    def __init__(self, sample, every: float):
        super().__init__(daemon=True)
        self._sample, self._every, self._halt = sample, every, threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self._sample()
            self._halt.wait(self._every)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def model_only_img_s(manifest: Path, workers: int, batches: int = 6) -> float:
    """The ceiling: images/s of the explainer alone on pre-decoded inputs of these images, the same batches and
    spec, on one torch thread (as each worker has) in this process, times the workers."""
    import torch

    from salient_maps.storage.job_options import job_spec
    from salient_maps.storage.settings import Settings
    from salient_maps.workers.explainers import load_setup
    from salient_maps.workers.images import decode_image, to_input

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = Settings().with_data_dir(Path(tempfile.mkdtemp(prefix="salient-load-model-")))
        explainer = load_setup(job_spec(model="mobilenet_v3_small", methods="gradcam", topk=1, batch_size=32),
                               settings, "cpu").explainer
        m = explainer.model
        paths = manifest.read_text().split()[:32 * (batches + 1)]
        xs = [to_input(decode_image(Path(p).read_bytes(), 1 << 20), m.resizing, m.mean, m.std) for p in paths]
        batch_list = [torch.stack(xs[i:i + 32]) for i in range(0, len(xs), 32)]
        explainer.explain(batch_list[0])  # warm
        start = time.perf_counter()
        for x in batch_list[1:]:
            result = explainer.explain(x)
            for out in result.outputs.values():
                out.maps.cpu()
        return workers * 32 * (len(batch_list) - 1) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def counters_match_statuses(db) -> list[str]:
    """Each job's counters against its item statuses, in one snapshot; returns the mismatches."""
    from sqlalchemy import func, select

    from salient_maps.storage.database import Item, Job

    problems = []
    with db.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
        jobs = conn.execute(select(Job.id, Job.total, Job.done, Job.failed, Job.skipped)).all()
        counts = conn.execute(select(Item.job_id, Item.status, func.count()).group_by(Item.job_id, Item.status)).all()
        conn.rollback()
    by_job: dict[str, dict[str, int]] = {}
    for job_id, status, n in counts:
        by_job.setdefault(job_id, {})[status] = n
    for job in jobs:
        seen = by_job.get(job.id, {})
        actual = (sum(seen.values()), seen.get("done", 0), seen.get("failed", 0), seen.get("skipped", 0))
        if actual != (job.total, job.done, job.failed, job.skipped):
            problems.append(f"job {job.id}: counters {(job.total, job.done, job.failed, job.skipped)} "
                            f"!= statuses {actual}")
    return problems


def stored_keys(env: dict[str, str]) -> list[str]:
    url = env["SALIENT_OBJECT_STORE_URL"]
    if url.startswith("file://"):
        base = Path(url.removeprefix("file://"))
        return [str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()]
    import launch

    bucket, prefix = url.removeprefix("s3://").split("/", 1)
    client = launch.s3_client(env["SALIENT_S3_ENDPOINT_URL"])
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        keys.extend(obj["Key"].removeprefix(prefix + "/") for obj in page.get("Contents", ()))
    return keys


def final_checks(db, env: dict[str, str]) -> dict:
    from sqlalchemy import select

    from salient_maps.storage.database import Explanation, Image, Item, Shard

    with db.connect() as conn:
        done = conn.execute(select(Item.sha256).where(Item.status == "done")).scalars().all()
        explanations = conn.execute(select(Explanation.sha256)).all()
        images = conn.execute(select(Image.sha256)).scalars().all()
        # the shards rows point to (a shard no row names: a batch redone after its worker died mid-write)
        expected = set(conn.execute(select(Shard.key).where(Shard.id.in_(
            select(Explanation.shard_id).distinct()))).scalars())
    keys = stored_keys(env)
    return {
        "explanation_per_done_image": sorted(e.sha256 for e in explanations) == sorted(done),
        "image_row_per_done_image": sorted(images) == sorted(done),
        "objects": len(keys), "objects_match_rows": len(keys) == len(set(keys)) and expected <= set(keys),
        "unnamed_shards": len(set(keys) - expected),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uris", type=int, default=10_000, help="synthetic image URIs to submit (default 10,000)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes, one torch thread each")
    parser.add_argument("--store", choices=["s3", "local"], default="s3",
                        help="object store for the results: SeaweedFS (S3) or a local folder")
    parser.add_argument("--keep", action="store_true", help="keep the servers' folder (printed) for a look after")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="messages each worker holds (default: salient worker's own default)")
    parser.add_argument("--chunk", type=int, default=32, help="URIs per message (default 32, submit's default)")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="salient-load-"))
    started = time.perf_counter()
    say(f"writing {args.uris} images into {folder}")
    manifest = write_images(folder / "images", args.uris)
    ceiling = model_only_img_s(manifest, args.workers)
    say(f"model only: {ceiling:.0f} img/s ({args.workers} x one torch thread, pre-decoded inputs)")
    stack = Stack(folder / "servers")
    try:
        env = stack.env()
        env["SALIENT_FILE_ROOTS"] = str(folder / "images")
        env.update(SALIENT_RECONCILE_INTERVAL="10", SALIENT_PENDING_TIMEOUT="60")
        if args.store == "local":
            env["SALIENT_OBJECT_STORE_URL"] = (folder / "objects").as_uri()
        os.environ.update(env)
        from salient_maps.storage.database import connect

        db = connect(env["SALIENT_DATABASE_URL"])
        concurrency = ["--concurrency", str(args.concurrency)] if args.concurrency else []
        stack.start_workers(env, args.workers, *concurrency, "--torch-threads", "1")
        say(f"{args.workers} workers ready; submitting")

        recorded: list[tuple[datetime, int]] = []  # (wall time, max item id) while submit runs
        rss: list[tuple[int, float]] = []  # (items recorded so far, producer RSS MiB)
        mismatches: list[str] = []
        checks = 0

        def poll_recorded() -> None:
            from sqlalchemy import func, select

            from salient_maps.storage.database import Item

            with db.connect() as conn:
                top = conn.execute(select(func.max(Item.id))).scalar() or 0
            if not recorded or top != recorded[-1][1]:
                recorded.append((datetime.now(timezone.utc), top))

        def check() -> None:
            nonlocal checks
            mismatches.extend(counters_match_statuses(db))
            checks += 1

        recorder, checker = Sampler(poll_recorded, 0.05), Sampler(check, 5.0)
        recorder.start(), checker.start()
        submit_start, submit_wall = time.perf_counter(), datetime.now(timezone.utc)
        producer = subprocess.Popen([SALIENT, "submit", str(manifest), *SPEC_ARGS, "--chunk", str(args.chunk)],
                                    env={**os.environ, **env}, stdout=subprocess.PIPE, text=True)
        memory = Sampler(lambda: (value := rss_mib(producer.pid)) and rss.append(
            (recorded[-1][1] if recorded else 0, value)), 0.1)
        memory.start()
        job_id = producer.communicate()[0].strip()
        memory.stop()
        assert producer.returncode == 0, "salient submit failed"
        submit_seconds = time.perf_counter() - submit_start
        say(f"submitted job {job_id} in {submit_seconds:.0f}s ({args.uris / submit_seconds:.0f} URIs/s)")
        poll_recorded()
        recorder.stop()

        from salient_maps.producer.jobs import get_job

        last_report = 0.0
        while (job := get_job(db, job_id)).finished_at is None:
            if time.perf_counter() - last_report > 30:
                elapsed = time.perf_counter() - submit_start
                say(f"  {elapsed:5.0f}s: {job.ended}/{job.total} ended ({job.ended / elapsed:.1f} img/s), "
                    f"failed {job.failed}")
                last_report = time.perf_counter()
            time.sleep(1)
        run_seconds = seconds_to_end(job, submit_wall)
        checker.stop()
        check()
        say(f"job over in {run_seconds:.0f}s: done {job.done}, failed {job.failed}, skipped {job.skipped}")

        from sqlalchemy import select

        from salient_maps.storage.database import Item

        with db.connect() as conn:
            rows = conn.execute(select(Item.id, Item.updated_at).where(Item.job_id == job_id)).all()
        ids = [top for _, top in recorded]
        latencies = []
        for item_id, ended_at in rows:
            # The first poll that saw this id recorded; it was recorded (and published) at most 50 ms before.
            seen = recorded[min(bisect.bisect_left(ids, item_id), len(recorded) - 1)][0]
            latencies.append((ended_at - seen).total_seconds())
        p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
        # start-up against speed: the first image's end, and the rate between the 10th and 90th percentile ends
        ends = np.sort([(ended_at - submit_wall).total_seconds() for _, ended_at in rows])
        first_s, (e10, e90) = ends[0], np.percentile(ends, [10, 90])
        recorded_s = (next(t for t, top in recorded if top) - submit_wall).total_seconds()
        steady = 0.8 * len(ends) / (e90 - e10)
        final = final_checks(db, env)
        requeued = sum(int(line.split("published ")[1].split()[0])
                       for log in (folder / "servers").glob("worker-*.log")
                       for line in log.read_text().splitlines() if "lost items of" in line)
        by_progress = {f"rss_mib_at_{int(frac * 100)}pct": next(v for n, v in rss if n >= frac * args.uris)
                       for frac in (0.1, 0.5, 1.0) if any(n >= frac * args.uris for n, _ in rss)}
        result = {
            "uris": args.uris, "workers": args.workers, "concurrency": args.concurrency, "chunk": args.chunk,
            "store": args.store, "job_id": job_id,
            "model": "mobilenet_v3_small", "method": "gradcam", "image_px": 16,
            "done": job.done, "failed": job.failed, "skipped": job.skipped,
            "submit_s": round(submit_seconds, 1), "run_s": round(run_seconds, 1),
            "img_per_s": round(job.done / run_seconds, 1), "model_only_img_s": round(ceiling, 1),
            "first_recorded_s": round(recorded_s, 2), "first_done_s": round(first_s, 2),
            "steady_img_per_s": round(steady, 1),
            "producer_rss_mib_peak": round(max(v for _, v in rss), 1), "producer_rss_samples": len(rss),
            **{k: round(v, 1) for k, v in by_progress.items()},
            "latency_s_p50": round(p50, 1), "latency_s_p95": round(p95, 1), "latency_s_p99": round(p99, 1),
            "requeued_items": requeued, "consistency_checks": checks, "counter_mismatches": mismatches[:5],
            "consistent": not mismatches and all(v for k, v in final.items() if k not in ("objects", "unnamed_shards")),
            **final, "wall_s": round(time.perf_counter() - started, 1),
        }
        say(f"producer RSS: {', '.join(f'{k} {v:.0f} MiB' for k, v in by_progress.items())}, "
            f"peak {result['producer_rss_mib_peak']:.0f} MiB")
        say(f"first items recorded {recorded_s:.1f}s, first image done {first_s:.1f}s after submit; "
            f"{steady:.0f} img/s between 10 % and 90 % done")
        say(f"latency queue->done: p50 {p50:.1f}s, p95 {p95:.1f}s, p99 {p99:.1f}s")
        say(f"consistent: {result['consistent']} ({checks} snapshots, {len(mismatches)} mismatches; {final})")
        print(json.dumps(result))
    finally:
        stack.stop()
        if args.keep:
            say(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
