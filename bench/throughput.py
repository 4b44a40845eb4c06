"""End-to-end throughput against the model's own speed, and what each image costs on the host and in storage.

For resnet18 Grad-CAM top-3 and Score-CAM top-1 at 224 px on distinct 640×480 JPEGs, side by side in
every round (interleaved, fresh images or a fresh database each time, so nothing is skipped as explained):

- model only: salient's ``Explainer`` on pre-decoded input tensors, the same batches and precision;
- ``salient run``: ``explain_sources``, the command's own in-process code path (SQLite + a local folder);
- the queue pipeline: submit -> Redis -> one worker (its default concurrency) -> SeaweedFS S3 -> PostgreSQL,
  all on loopback (tests/servers/launch.py), timed from submit to the job's end.

Each end-to-end images/s is divided by the model-only images/s of the same round (target on the 2-core
CPU machine: >= 0.85 in-process and >= 0.8 through the queue for Grad-CAM, >= 0.95 for Score-CAM); beside
it the same ratio of CPU seconds per image (the processing's, or the worker process's), which a machine
busy with other work moves far less than it moves wall-clock speed. Also:
host CPU-ms per image by stage of the in-process run (the processor's ``cpu_seconds`` clock: read, decode,
preprocess, encode, upload, database; the model's from the model-only run; null where the processor keeps
no clock for a stage), objects and bytes per image in the store (listed), bytes per explanation row
(PostgreSQL ``pg_column_size``), and SQL statements per image (counted in the in-process run: the whole job,
schema creation excluded, and its processing alone).

    .venv/bin/python bench/throughput.py [--images 512] [--scorecam-images N] [--rounds 3] [--device cuda]
    .venv/bin/python bench/throughput.py --quick     # ~2-3 minutes here: 64 + 2 images, one round (a check)

Score-CAM runs ~512 masked passes per image (~5 s on this CPU), so on the CPU it gets 32 images unless
``--scorecam-images`` says otherwise: its host share per image is the same at any count. Needs the servers
(tests/servers/install.sh). Progress on stdout; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from pipeline import Stack, timed_job, with_env  # noqa: E402  (also puts tests/servers on the path)

STAGES = ("read", "decode", "preprocess", "model", "encode", "upload", "database")
SCENARIOS = {"gradcam": dict(methods="gradcam", topk=3), "scorecam": dict(methods="scorecam", topk=1)}
WARMUP = 1  # image per scenario, run once each way before the rounds: model loads, the worker's first batch


def write_jpegs(folder: Path, n: int, seed: int, width: int = 640, height: int = 480) -> Path:
    """n distinct 640×480 JPEGs (quality 90) with photo-like content: smooth gradients, edges and noise."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(n):
        phase, freq = rng.uniform(0, 2 * np.pi, 3), rng.uniform(20, 80, 3)
        pixels = np.stack([120 + 90 * np.sin(xx / freq[c] + yy / (freq[c] * 1.7) + phase[c]) for c in range(3)], -1)
        for _ in range(6):  # a few solid shapes give the JPEG the edges photos have
            x0, y0 = rng.integers(0, width - 80), rng.integers(0, height - 80)
            pixels[y0:y0 + rng.integers(20, 120), x0:x0 + rng.integers(20, 160)] = rng.uniform(0, 255, 3)
        pixels += rng.normal(0, 6, pixels.shape)
        bgr = cv2.cvtColor(pixels.clip(0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(folder / f"img{i:04d}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return folder


def spec(args, scenario: str) -> dict:
    options = {"max_channels": args.scorecam_max_channels} if scenario == "scorecam" else {}
    return dict(model=args.model, batch_size=args.batch_size, precision=args.precision, **SCENARIOS[scenario],
                **options)


# --- model only -------------------------------------------------------------------------------------------------


def load_explainer(args, scenario: str):
    from salient_maps.storage.job_options import job_spec
    from salient_maps.storage.settings import Settings
    from salient_maps.workers.explainers import load_setup

    settings = Settings().with_data_dir(Path(tempfile.mkdtemp(prefix="salient-bench-model-")))
    return load_setup(job_spec(**spec(args, scenario)), settings, args.device).explainer


def decoded_batches(folder: Path, explainer, batch_size: int) -> list:
    """The set's images as model inputs, in run order: decoded at full size (the pipeline decodes a JPEG
    reduced by M/8) and made as the model's own preprocessing says (resize, crop, filter). Score-CAM's cost follows the
    content: it runs one pass per channel that varies over the image, so a reference on other pixels (the
    whole image squashed, not the centre crop) is no reference."""
    import torch

    from salient_maps.workers.images import decode_image, to_input

    m = explainer.model
    xs = [to_input(decode_image(p.read_bytes(), 1 << 30), m.resizing, m.mean, m.std)
          for p in sorted(folder.glob("*.jpg"))]
    return [torch.stack(xs[i:i + batch_size]) for i in range(0, len(xs), batch_size)]


def model_only(explainer, batches: list) -> tuple[float, float]:
    """(seconds, host CPU seconds) of the explainer over the batches, results brought to the host as
    the pipeline does (maps and probabilities), so the GPU's queue is drained inside the timing.

    Runs on a thread of its own, so the figure does not depend on what ran before it in this process:
    while ``to_input`` still normalised with torch on the decode threads, the main thread's model calls
    after a `salient run` took 3-4x the CPU of a fresh thread's (the decode threads' OpenMP teams)."""
    out: list = []

    def work() -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        for x in batches:
            result = explainer.explain(x)
            for method in result.outputs.values():
                method.maps.cpu()
            result.probs.cpu()
        out.append((time.perf_counter() - wall, time.process_time() - cpu))

    thread = threading.Thread(target=work, name="bench-model-only")
    thread.start()
    thread.join()
    if not out:
        raise RuntimeError("the model-only run failed (its traceback is above)")
    return out[0]


# --- salient run, in-process -------------------------------------------------------------------------------------


@contextmanager
def watching_processor():
    """Catch the ItemProcessor that ``explain_sources`` builds, and count the SQL statements of the whole job
    (creating it, listing, explaining; not creating the schema) and those of its processing alone."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from salient_maps.storage import database
    from salient_maps.workers.process import ItemProcessor

    seen: dict = {"processor": None, "statements": 0, "processing_statements": 0, "cpu_s": 0.0}
    state = {"job": True, "processing": False}
    real_run, real_schema = ItemProcessor.run, database.ensure_schema

    def run(self, *a, **k):
        seen["processor"] = self
        state["processing"] = True
        cpu = time.process_time()
        try:
            return real_run(self, *a, **k)
        finally:
            state["processing"] = False
            seen["cpu_s"] = time.process_time() - cpu

    def ensure_schema(engine):
        state["job"] = False
        try:
            return real_schema(engine)
        finally:
            state["job"] = True

    def count(*_a):
        seen["statements"] += state["job"]
        seen["processing_statements"] += state["processing"]

    ItemProcessor.run = run
    database.ensure_schema = ensure_schema
    event.listen(Engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        ItemProcessor.run, database.ensure_schema = real_run, real_schema
        event.remove(Engine, "before_cursor_execute", count)


def in_process(args, scenario: str, folder: Path, data_dir: Path) -> dict:
    from salient_maps.workers.cli import explain_sources

    with watching_processor() as seen:
        _, counts, seconds, _ = explain_sources(
            [str(folder)], weights=None, layer=None, classes=None, device=args.device, data_dir=data_dir,
            show_progress=False, **spec(args, scenario))
    cpu = seen["cpu_s"]  # the processing's own (all threads), not loading the model or listing the images
    n = counts["done"]
    assert n == len(list(folder.glob("*.jpg"))) and not counts["failed"], counts
    clock = getattr(seen["processor"], "cpu_seconds", None)
    stages = dict(clock.seconds) if clock is not None else {}
    objects = [p for p in (data_dir / "objects").rglob("*") if p.is_file()]
    return {"seconds": seconds, "images": n, "cpu_s": cpu, "stages": stages,
            "statements_per_image": seen["statements"] / n,
            "processing_statements_per_image": seen["processing_statements"] / n,
            "objects_per_image": len(objects) / n, "bytes_per_image": sum(p.stat().st_size for p in objects) / n}


# --- the queue pipeline -------------------------------------------------------------------------------------------


def store_listing(env: dict[str, str]) -> tuple[int, int]:
    """(objects, bytes) in the run's bucket prefix."""
    import launch

    bucket, prefix = env["SALIENT_OBJECT_STORE_URL"].removeprefix("s3://").split("/", 1)
    client = launch.s3_client(env["SALIENT_S3_ENDPOINT_URL"])
    count = size = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", ()):
            count, size = count + 1, size + obj["Size"]
    return count, size


def explanation_row_bytes(env: dict[str, str]) -> dict:
    import sqlalchemy as sa

    from salient_maps.storage.database import Explanation

    engine = sa.create_engine(env["SALIENT_DATABASE_URL"])  # postgresql+psycopg:// (tests/servers/launch.py)
    table = Explanation.__table__.name
    with engine.connect() as conn:
        rows, avg = conn.execute(sa.text(f"SELECT count(*), avg(pg_column_size(t.*)) FROM {table} t")).one()
    engine.dispose()
    return {"rows": rows, "bytes_per_row": float(avg) if avg is not None else None}


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat: utime, stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pipeline_round(args, scenario: str, folder: Path, stack: Stack) -> tuple[float, float]:
    """(seconds from submit to the job's end, the worker's CPU seconds in that time)."""
    pid = stack.workers[0].pid
    cpu = process_cpu_seconds(pid)
    seconds = timed_job(folder, spec(args, scenario))
    return seconds, process_cpu_seconds(pid) - cpu


# --- the run ------------------------------------------------------------------------------------------------------


def per_image_ms(seconds: float | None, n: int) -> float | None:
    return None if seconds is None else 1000 * seconds / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="Grad-CAM images per set (default 512)")
    parser.add_argument("--scorecam-images", type=int, default=None,
                        help="Score-CAM images per set (default: 32 on the CPU, --images on CUDA)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--scorecam-max-channels", type=int, default=None,
                        help="Score-CAM on the N strongest channels only (default: all, the method as measured)")
    parser.add_argument("--quick", action="store_true",
                        help="a check that it runs: 64 Grad-CAM and 2 Score-CAM images (64 channels), one round")
    parser.add_argument("--skip-pipeline", action="store_true", help="model only and in-process (no servers)")
    args = parser.parse_args()
    if args.quick:
        args.images, args.scorecam_images, args.rounds, args.scorecam_max_channels = 64, 2, 1, 64
    counts = {"gradcam": args.images,
              "scorecam": args.scorecam_images or (args.images if args.device.startswith("cuda") else 32)}

    import torch

    import launch
    from salient_maps.workers.runtime import keep_freed_memory

    keep_freed_memory()  # as `salient run` and the worker do
    torch.use_deterministic_algorithms(True, warn_only=True)
    if not args.skip_pipeline and launch.missing():
        sys.exit(f"missing {launch.missing()}: run tests/servers/install.sh")
    folder = Path(tempfile.mkdtemp(prefix="salient-throughput-"))
    print(f"images in {folder}: Grad-CAM {counts['gradcam']}, Score-CAM {counts['scorecam']} per set, "
          f"{args.rounds} round(s), {args.device}, {args.precision}, batch {args.batch_size}", flush=True)
    sets = {(s, r): write_jpegs(folder / f"{s}-{r}", counts[s], seed=100 * r + i)
            for i, s in enumerate(SCENARIOS) for r in range(args.rounds)}
    warmup = {s: write_jpegs(folder / f"warmup-{s}", WARMUP, seed=9000 + i) for i, s in enumerate(SCENARIOS)}

    stack = env = None
    if not args.skip_pipeline:
        stack = Stack(folder)  # its file roots (SALIENT_FILE_ROOTS) are this folder: the images are in it
        env = stack.env()
    saved = dict(os.environ)
    measured: dict = {s: {"model": [], "model_cpu": [], "local": [], "piped": [], "piped_cpu": []} for s in SCENARIOS}
    try:
        start = time.perf_counter()
        for s in SCENARIOS:  # warm: model loads, allocator pools, the worker's first batch
            explainer = load_explainer(args, s)
            model_only(explainer, decoded_batches(warmup[s], explainer, args.batch_size))
            in_process(args, s, warmup[s], folder / f"local-warmup-{s}")
        if stack is not None:
            with_env(env)
            stack.start_workers(env, 1, "--device", args.device)  # the last --device counts; default concurrency
            for s in SCENARIOS:
                pipeline_round(args, s, warmup[s], stack)
            os.environ.clear(), os.environ.update(saved)
        print(f"  warm after {time.perf_counter() - start:.0f}s", flush=True)
        for r in range(args.rounds):
            for s in SCENARIOS:
                images, m = sets[s, r], measured[s]
                n = counts[s]

                def run_model_only() -> None:
                    # A fresh explainer, warmed on the first batch, as each `salient run` loads its own.
                    explainer = load_explainer(args, s)
                    batches = decoded_batches(images, explainer, args.batch_size)
                    model_only(explainer, batches[:1])
                    seconds, cpu = model_only(explainer, batches)
                    m["model"].append(n / seconds)
                    m["model_cpu"].append(cpu / n)

                def run_in_process() -> None:
                    m["local"].append(in_process(args, s, images, folder / f"local-{s}-{r}-{uuid.uuid4().hex[:6]}"))

                def run_queued() -> None:
                    if stack is None:
                        return
                    with_env(env)
                    piped, worker_cpu = pipeline_round(args, s, images, stack)
                    os.environ.clear(), os.environ.update(saved)
                    m["piped"].append(n / piped)
                    m["piped_cpu"].append(worker_cpu / n)

                # Model-only runs between the two it is the measure of, so each is timed next to it (first
                # model-only, then `salient run`, then the queue had put the queue ~40 s from its reference:
                # 0.64 in one round against 0.90 in the next, while `salient run` gave 0.82 and 0.90); odd rounds
                # run in the reverse order, so a drift in the machine's speed favours neither side.
                steps = [run_in_process, run_model_only, run_queued]
                for step in steps if r % 2 == 0 else reversed(steps):
                    step()
                line = (f"  round {r} {s}: model only {m['model'][-1]:.1f} img/s, salient run "
                        f"{n / m['local'][-1]['seconds']:.1f} img/s "
                        f"({n / m['local'][-1]['seconds'] / m['model'][-1]:.2f})")
                if m["piped"]:
                    line += f", queue {m['piped'][-1]:.1f} img/s ({m['piped'][-1] / m['model'][-1]:.2f})"
                print(line + f" [{time.perf_counter() - start:.0f}s]", flush=True)
        result: dict = {"device": args.device, "model": args.model, "precision": args.precision,
                        "batch_size": args.batch_size, "rounds": args.rounds, "quick": args.quick,
                        "scorecam_max_channels": args.scorecam_max_channels,
                        "torch_threads": torch.get_num_threads()}
        for s in SCENARIOS:
            m, n = measured[s], counts[s]
            locals_ = m["local"]
            ratios_local = [(n / lo["seconds"]) / mo for lo, mo in zip(locals_, m["model"])]
            last = locals_[-1]
            stages = {name: per_image_ms(last["stages"].get(name), n) for name in STAGES}
            stages["model"] = 1000 * statistics.median(m["model_cpu"])
            result[s] = {
                "images": n,
                "model_only_img_s": statistics.median(m["model"]),
                "salient_run_img_s": statistics.median(n / lo["seconds"] for lo in locals_),
                "salient_run_ratio": statistics.median(ratios_local),
                "salient_run_cpu_ms_per_image": 1000 * statistics.median(lo["cpu_s"] / n for lo in locals_),
                # CPU per image of the model alone over that of the whole run: a busy machine moves it less
                "salient_run_cpu_ratio": statistics.median(mo / (lo["cpu_s"] / n)
                                                           for lo, mo in zip(locals_, m["model_cpu"])),
                "cpu_ms_per_image_by_stage": stages,
                # the whole job's (schema creation excluded), and those of explaining alone
                "sql_statements_per_image": last["statements_per_image"],
                "sql_statements_per_image_processing": last["processing_statements_per_image"],
                "objects_per_image_local": last["objects_per_image"],
                "bytes_per_image_local": last["bytes_per_image"],
            }
            if m["piped"]:
                result[s]["queue_img_s"] = statistics.median(m["piped"])
                result[s]["queue_ratio"] = statistics.median(p / mo for p, mo in zip(m["piped"], m["model"]))
                result[s]["queue_worker_cpu_ms_per_image"] = 1000 * statistics.median(m["piped_cpu"])
                result[s]["queue_cpu_ratio"] = statistics.median(
                    mo / c for c, mo in zip(m["piped_cpu"], m["model_cpu"]))
        if stack is not None:
            total = sum(counts[s] * args.rounds + WARMUP for s in SCENARIOS)
            objects, size = store_listing(env)
            result["queue_store"] = {"objects_per_image": objects / total, "bytes_per_image": size / total}
            result["queue_store"].update(explanation_row_bytes(env))
    finally:
        os.environ.clear(), os.environ.update(saved)
        if stack is not None:
            stack.stop()
    for s in SCENARIOS:
        r = result[s]
        print(f"{s}: model only {r['model_only_img_s']:.1f} img/s; salient run {r['salient_run_img_s']:.1f} img/s "
              f"= {r['salient_run_ratio']:.3f} of it" + (f"; queue {r['queue_img_s']:.1f} img/s = "
                                                         f"{r['queue_ratio']:.3f}" if "queue_img_s" in r else ""),
              flush=True)
        print(f"  CPU per image, model only / end to end: salient run {r['salient_run_cpu_ratio']:.3f}"
              + (f", queue worker {r['queue_cpu_ratio']:.3f}" if "queue_cpu_ratio" in r else ""), flush=True)
        print("  host CPU-ms per image: " + ", ".join(
            f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in r["cpu_ms_per_image_by_stage"].items()), flush=True)
    print(json.dumps(_rounded(result)))


def _rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


if __name__ == "__main__":
    main()
