"""Publishing chunks: a Celery client that sends ``salient.explain`` by name, so the producer never
imports the workers (nor torch)."""

from __future__ import annotations

from celery import Celery

from salient_maps.storage.messages import TASK_NAME, broker_config
from salient_maps.storage.settings import Settings


def celery_client(settings: Settings) -> Celery:
    app = Celery("salient-producer", set_as_current=False)
    app.conf.update(broker_config(settings))
    return app


class Publisher:
    """Sends chunk messages over one pooled broker connection; use as a context manager."""

    def __init__(self, settings: Settings):
        self.queue = settings.queue
        self.app = celery_client(settings)

    def __enter__(self) -> "Publisher":
        self._acquired = self.app.producer_or_acquire()
        self._producer = self._acquired.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._acquired.__exit__(*exc_info)
        self.app.close()

    def publish(self, message: dict) -> None:
        self.app.send_task(TASK_NAME, kwargs=message, queue=self.queue, producer=self._producer)
