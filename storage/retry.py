"""Backoff for errors that go away by themselves: a database restart, a deadlock victim, an S3 outage.

Retries are bounded by time, not by a count (``SALIENT_RETRY_SECONDS``): an outage is measured in
seconds, and a budget longer than the outage means nothing fails because of it.
"""

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


def with_backoff(fn: Callable[[], T], budget: float, what: str, base: float = 0.5, cap: float = 10.0) -> T:
    """Call ``fn``; on a transient error wait and call again, for at most ``budget`` seconds in all.

    The last error is raised once the budget is spent (the last call comes at its end), and at once
    for an error that is not transient. Waits are capped at ``cap`` seconds, so the end of an outage
    is noticed soon.
    """
    deadline = time.monotonic() + budget
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            left = deadline - time.monotonic()
            if not is_transient(exc) or left <= 0:
                raise
            delay = min(backoff_delay(attempt, base, cap), left)
            attempt += 1
            log.warning("%s failed (%s: %s); retry %d in %.1fs (%.0fs of the %.0fs retry budget left)", what,
                        type(exc).__name__, exc, attempt, delay, left, budget)
            time.sleep(delay)
