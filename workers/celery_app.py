"""The workers' Celery app, configured for long GPU tasks that must never be lost nor done twice.

- ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only after its images
  are written; a worker that dies leaves it to be redelivered (after the Redis visibility timeout).
- ``worker_prefetch_multiplier = 1``: a worker holds only the messages it is working on (one per pool
  thread), so the others stay in Redis for other workers.
- JSON only, tasks called by name (``salient.explain``): publishers need not be Python.
- Pool: threads (or solo), never prefork: a forked child cannot use CUDA once the parent touched it.
"""

from __future__ import annotations

from celery import Celery

from salient_maps.storage.messages import broker_config
from salient_maps.storage.settings import Settings


def make_app(settings: Settings) -> Celery:
    app = Celery("salient", include=["salient_maps.workers.tasks"])
    app.conf.update(
        broker_config(settings),
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_pool="threads",
        # A lost broker connection must not make running tasks be "cancelled" and run again elsewhere
        # while they are still writing; late ack plus idempotent writes cover a real loss.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
    )
    return app


app = make_app(Settings())
