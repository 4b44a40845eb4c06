"""``salient worker``: a Celery worker for the ``salient.explain`` queue, one process per device."""

from __future__ import annotations

import os
import socket

import click


@click.command()
@click.option("--device", default="auto", show_default=True,
              help="cpu, cuda, cuda:N or auto. Run one worker process per GPU.")
@click.option("--queues", default=None, help="Comma-separated queues to consume (default SALIENT_QUEUE: salient).")
@click.option("--concurrency", type=click.IntRange(1), default=4, show_default=True,
              help="Messages held at once (threads); their images share the device's batches. Two more than the "
                   "lanes: the next messages are read and decoded while one batch runs and one is stored.")
@click.option("--torch-threads", type=click.IntRange(1), default=None,
              help="CPU threads torch may use (default: torch's choice).")
@click.option("--decode-threads", type=click.IntRange(1), default=None,
              help="Threads reading and decoding images ahead of the model (default: as many as --torch-threads, "
                   "else one per core).")
@click.option("--events", is_flag=True, help="Send task events (for Flower's task views).")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--hostname", "-n", default=None, help="Celery node name (default salient-PID@HOST).")
def worker(device, queues, concurrency, torch_threads, decode_threads, events, loglevel, hostname):
    """Explain queued images: consume `salient submit` messages until stopped.

    Settings come from SALIENT_* variables (broker, database, object store). SIGTERM is a warm
    shutdown: the batch in hand finishes and unstarted messages go back to the queue.
    """
    import torch

    from . import tasks
    from .celery_app import app
    from .runtime import keep_freed_memory

    keep_freed_memory()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    tasks.options.device = device
    # A worker given N threads for torch is one of several sharing the cores: its host pool gets N too. More
    # threads than its share only contend for the GIL and the cores (bench/load.py, 2 workers of one torch
    # thread on 2 cores: 221-233 img/s with one decode thread each, 198-216 with two; 3 interleaved pairs).
    tasks.options.decode_threads = decode_threads or torch_threads
    argv = ["worker", "--pool=threads", f"--concurrency={concurrency}", f"--loglevel={loglevel}",
            # Neither is needed (no broadcast commands, no revokes): they only slow start-up.
            "--without-gossip", "--without-mingle",
            f"--hostname={hostname or f'salient-{os.getpid()}@{socket.gethostname()}'}"]
    if queues:
        argv.append(f"--queues={queues}")
    if events:
        argv.append("--task-events")
    app.worker_main(argv)
