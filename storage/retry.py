"""Backoff for errors that go away by themselves: a database restart, a deadlock victim, an S3 hiccup."""

from __future__ import annotations

import logging
import random
import time
from typing import Callable, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying; a bad image or a bug is not one of them."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    if isinstance(exc, OperationalError):  # connection lost, deadlock detected, database locked
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    module = type(exc).__module__
    if module.startswith(("botocore", "boto3", "urllib3")):
        response = getattr(exc, "response", None)
        if response is None:  # endpoint unreachable, read timeout, ...
            return True
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or status == 429
    return False


def backoff_delay(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Full-jitter exponential backoff: a random wait in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * 2 ** attempt))


def with_backoff(fn: Callable[[], T], attempts: int, what: str, base: float = 0.5) -> T:
    """Call ``fn``; on a transient error wait and call again, at most ``attempts`` more times."""
    for attempt in range(attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            delay = backoff_delay(attempt, base)
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(exc).__name__, exc,
                        attempt + 1, attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
