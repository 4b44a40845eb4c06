"""One boto3 S3 client per endpoint, shared by the object store and the URI readers.

boto3 is imported only here and only when an ``s3://`` URL is used, so the embedded run never pays
for it. Credentials come from boto3's own chain (AWS_* variables, shared config, IAM role).
"""

from __future__ import annotations

import functools
import threading
from urllib.parse import urlparse

from .settings import Settings

_lock = threading.Lock()


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3://bucket[/key] URL: {url!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def s3_client(settings: Settings):
    """A thread-safe client for the configured endpoint (cached: creating one costs tens of ms)."""
    style = settings.s3_addressing_style
    if style == "auto":
        style = "path" if settings.s3_endpoint_url else "virtual"
    return _client(settings.s3_endpoint_url, settings.s3_region, style, settings.s3_max_attempts)


@functools.lru_cache(maxsize=8)
def _client(endpoint_url: str | None, region: str | None, addressing_style: str, max_attempts: int):
    import boto3
    from botocore.config import Config

    config = Config(
        s3={"addressing_style": addressing_style},
        # "standard" retries throttling, 5xx and connection errors with exponential backoff and jitter.
        retries={"mode": "standard", "max_attempts": max_attempts},
        max_pool_connections=32,
        connect_timeout=10,
        read_timeout=60,
    )
    with _lock:  # boto3's default session is not thread-safe while it creates clients
        session = boto3.session.Session()
        return session.client("s3", endpoint_url=endpoint_url, region_name=region or "us-east-1", config=config)
