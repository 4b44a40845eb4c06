"""``salient beat``: Celery beat with one entry that fires the due schedules every ``beat_interval`` seconds.

The entry runs in the beat process itself rather than going through the broker: a tick is one indexed
SELECT (plus a submit when a schedule is due), so no worker has to carry producer code, and the workers'
queue holds images only. Schedules and their next run times live in the database, not in a beat
schedule file, so beats can restart or run side by side (``producer.schedules.claim`` is the lock).
"""

from __future__ import annotations

import logging

from celery import Celery
from celery.beat import Scheduler

from salient_maps.storage.database import connect
from salient_maps.storage.settings import Settings

from .queue import celery_client
from .schedules import fire_due

log = logging.getLogger(__name__)
TICK_TASK = "salient.fire_schedules"


class InProcessScheduler(Scheduler):
    """Celery beat scheduler that calls a due entry's task in this process instead of publishing it."""

    def apply_entry(self, entry, producer=None):
        # Without Celery's "Sending due task" line: at a tick every few seconds it would drown the firings.
        self.apply_async(entry, advance=False)

    def apply_async(self, entry, producer=None, advance=True, **kwargs):
        entry = self.reserve(entry) if advance else entry
        try:
            return self.app.tasks[entry.task](*entry.args, **entry.kwargs)
        except Exception as exc:  # the database may be down: the next tick tries again
            log.error("%s failed: %s: %s", entry.task, type(exc).__name__, exc)
            return None

    @property
    def producer(self):
        return None  # nothing is published, so no broker connection is held for the ticks


def beat_app(settings: Settings) -> Celery:
    """A Celery app whose beat schedule is the one tick entry."""
    app = celery_client(settings)
    db = connect(settings.resolved_database_url)

    @app.task(name=TICK_TASK)
    def fire_schedules() -> list[dict]:
        return [vars(firing) for firing in fire_due(db, settings)]

    app.conf.beat_schedule = {TICK_TASK: {"task": TICK_TASK, "schedule": settings.beat_interval}}
    return app


def run_beat(settings: Settings, loglevel: str = "INFO") -> None:
    """Tick until SIGTERM or SIGINT."""
    app = beat_app(settings)
    app.Beat(scheduler=InProcessScheduler, loglevel=loglevel, max_interval=settings.beat_interval).run()
