"""Submit a job to the queue: list the sources as a stream, record one item per distinct URI, and
publish the new items in chunks of N as ``salient.explain`` messages.

Memory stays flat for any number of URIs: the database dedupes (insert-or-ignore returning the new
rows), so nothing here keeps a set of seen URIs, and at most one page of items waits to be sent.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any, Iterable
from urllib.parse import urlparse

from sqlalchemy.engine import Engine

from salient_maps.storage.database import cancel_job, close_listing, connect, create_job, record_items
from salient_maps.storage.job_options import job_spec
from salient_maps.storage.messages import chunk_message
from salient_maps.storage.settings import Settings
from salient_maps.storage.sources import file_sha256, iter_entries

from .queue import Publisher


def build_spec(*, weights: str | Path | None = None, labels: str | Path | None = None,
               **options: Any) -> dict[str, Any]:
    """The ``spec`` of every message of a job (what to explain and how): ``storage.job_options.job_spec``
    of the same keyword arguments as ``salient run`` (``model``, ``methods``, ``topk``, ``classes``, ``score``,
    ``steps``, ``metrics``, ``colormap``, ``localize``, ...), with ``weights`` and ``labels`` made readable
    by the workers.

    A local ``weights`` file is named by its absolute path plus its sha256; workers must be able to
    read that path (shared filesystem or the same image), or give an ``s3://``/``http(s)://`` URI.
    """
    spec = job_spec(**options)
    if weights is not None:
        spec["weights"] = _shared_location(weights)
        if not _is_remote(spec["weights"]):
            spec["weights_sha256"] = file_sha256(Path(spec["weights"]))
    if labels is not None:
        spec["labels"] = _shared_location(labels)
    return spec


def _is_remote(location: str) -> bool:
    return urlparse(location).scheme in ("s3", "http", "https")


def _shared_location(location: str | Path) -> str:
    """An s3:// or http(s):// URI as is; a local file as its absolute path (workers must see the same path)."""
    location = str(location)
    if _is_remote(location):
        return location
    path = Path(urlparse(location).path if location.startswith("file://") else location).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return str(path)


def submit(sources: Iterable[str | Path], spec: dict[str, Any] | None = None, *, name: str | None = None,
           chunk: int | None = None, settings: Settings | None = None, stdin: IO[str] | None = None,
           db: Engine | None = None, **spec_options: Any) -> str:
    """Create a job for the images in ``sources`` and queue them; returns the job id at once (workers do the rest).

    ``spec`` from ``build_spec``, or its keyword arguments here: ``submit(["s3://b/photos"], model="resnet50",
    methods="gradcam", topk=1)``. If listing or publishing fails, the job is cancelled (items already queued
    are skipped) and the error is raised. ``db``: the caller's engine (the API and the scheduler submit many
    jobs); without it one is made for this call and disposed of after it.
    """
    settings = settings or Settings()
    if spec is None:
        spec = build_spec(**spec_options)
    elif spec_options:
        raise TypeError("give either spec or its keyword arguments, not both")
    chunk = chunk or settings.chunk_size
    uris = [str(s) for s in sources]
    own_engine = db is None
    db = db or connect(settings.resolved_database_url)
    try:
        return _submit(db, settings, uris, spec, name, chunk, stdin)
    finally:
        if own_engine:
            db.dispose()


def _submit(db: Engine, settings: Settings, sources: list[str], spec: dict[str, Any], name: str | None,
            chunk: int, stdin: IO[str] | None) -> str:
    job_id = create_job(db, {**spec, "sources": sources, "chunk": chunk}, name=name)
    try:
        with Publisher(settings) as publisher:
            waiting: list[tuple[int, str]] = []
            for new_items in record_items(db, job_id, iter_entries(sources, settings, stdin)):
                waiting.extend(new_items)
                while len(waiting) >= chunk:
                    publisher.publish(chunk_message(job_id, waiting[:chunk], spec))
                    del waiting[:chunk]
            if waiting:
                publisher.publish(chunk_message(job_id, waiting, spec))
    except BaseException:
        cancel_job(db, job_id)
        raise
    close_listing(db, job_id)
    return job_id
