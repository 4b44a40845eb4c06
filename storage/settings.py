"""The one settings object for the whole system: env vars ``SALIENT_*`` over an optional TOML file
(``SALIENT_CONFIG_FILE``) over defaults.

Credentials never live here: S3 keys come from the standard AWS variables or an IAM role (boto3 reads
them itself), and a password inside a URL is masked whenever the settings are printed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, IPvAnyNetwork, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

_URL_PASSWORD = re.compile(r"(://[^:/@]*:)[^@/]*@")


def mask_url(url: str | None) -> str | None:
    """``redis://user:secret@host`` -> ``redis://user:***@host``; for logs and reprs."""
    return None if url is None else _URL_PASSWORD.sub(r"\1***@", url)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SALIENT_", env_file=None, extra="ignore")

    data_dir: Path = Field(Path("salient-data"), description="embedded store: DIR/salient.db and DIR/objects/")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///DATA_DIR/salient.db")
    object_store_url: str | None = Field(None,
                                         description="file:///path or s3://bucket/prefix; default DATA_DIR/objects")

    max_image_pixels: int = 40_000_000
    max_image_bytes: int = 64 * 1024 * 1024
    overlay_max_side: int = 1024

    # Queue (producer and workers)
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker (Redis)")
    queue: str = Field("salient", description="queue the producer publishes to and workers consume")
    chunk_size: int = Field(32, ge=1, description="image URIs per message")
    visibility_timeout: int = Field(
        3600, ge=1, description="seconds before an unacknowledged message is handed to another worker; "
                                "keep a chunk's work far below it")
    unacked_restore_interval: float = Field(
        30, gt=0, description="seconds between a worker's sweeps for messages of dead workers")
    max_deliveries: int = Field(3, ge=1, description="an image started this many times without finishing fails")
    retry_seconds: float = Field(
        300, ge=0, description="seconds a storage or database error is retried with backoff before the work "
                               "in hand gives up (keep it longer than the outages to ride out)")
    image_time_limit: float = Field(
        300, gt=0, description="seconds one image may spend being decoded or in the model (a batch: this times "
                               "its size); past it the image fails and the worker process exits to be restarted")
    host_nice: int = Field(
        19, ge=0, le=19, description="nice value (Linux) of a worker's threads that read, decode and store images, "
                                     "so that they run where the model leaves the cores idle; 0: the model's own")
    reconcile_interval: float = Field(
        60, gt=0, description="seconds between a worker's reconciliations (job counters, lost messages)")
    orphan_grace: float = Field(
        86400, ge=0, description="seconds `salient gc` leaves a shard that no result names (a worker died "
                                 "between its upload and its rows) before deleting it; keep it far above the "
                                 "visibility timeout")
    pending_timeout: float = Field(
        900, gt=0, description="seconds an item may stay pending untouched, in no message Redis holds, "
                               "before the reconciler publishes it again")

    # S3 (any S3 API: AWS, MinIO, Ceph, SeaweedFS)
    s3_endpoint_url: str | None = Field(None, description="e.g. http://127.0.0.1:8333; None = AWS")
    s3_region: str | None = None
    s3_addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="auto = path-style with a custom endpoint, virtual-hosted on AWS")
    s3_multipart_threshold: int = Field(8 * 1024 * 1024, ge=5 * 1024 * 1024)
    s3_max_attempts: int = Field(5, ge=1, description="botocore attempts per request (standard retry mode)")

    # Schedules (`salient beat`) and the HTTP API (`salient api`)
    beat_interval: float = Field(30, gt=0, description="seconds between beat's checks for due schedules")
    schedule_retry: float = Field(
        300, gt=0, description="seconds before a scheduled run that could not be submitted is tried again")
    api_tokens: SecretStr | None = Field(
        None, description="comma-separated bearer tokens the API accepts; none: the API refuses to start")
    api_max_body_bytes: int = Field(1024 * 1024, ge=1024, description="larger request bodies get 413 unread")
    api_max_manifest_bytes: int = Field(256 * 1024 * 1024, ge=1, description="largest manifest POST /jobs reads")

    # What image URIs may reach (storage/uri_policy.py); lists are comma-separated in the environment
    file_roots: Annotated[list[Path], NoDecode] = Field(
        [], description="folders whose files file:// URIs and paths from messages, manifests and the API may name "
                        "(real path, after .. and symlinks); none by default. `salient run` adds its command line's")
    allow_private_networks: bool = Field(
        False, description="let http(s):// reach loopback, private, shared and reserved addresses (not link-local)")
    allowed_networks: Annotated[list[IPvAnyNetwork], NoDecode] = Field(
        [], description="CIDRs http(s):// may reach although not public, e.g. 10.1.0.0/16 (link-local too)")
    s3_buckets: Annotated[list[str], NoDecode] = Field(
        [], description="the only buckets s3:// image URIs may name; none listed: any the credentials reach")
    http_timeout: float = Field(30, gt=0, description="seconds an http(s):// image may take, connect to last "
                                                     "byte; other downloads: the longest wait for their next bytes")
    http_max_redirects: int = Field(5, ge=0, description="redirects followed (each target checked again)")

    # Code a message may name as its model (workers/factories.py)
    model_factories: Annotated[list[str], NoDecode] = Field(
        [], description="model factories queue workers may run: module:function or file.py:function (exactly that "
                        "function), or a file or folder (every function of the .py files at or under it, real "
                        "path); none by default. `salient run` adds the one its command line names")

    @field_validator("file_roots", "allowed_networks", "s3_buckets", "model_factories", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource):
        sources = [init_settings, env_settings]
        config_file = os.environ.get("SALIENT_CONFIG_FILE")
        if config_file:
            if not Path(config_file).is_file():
                raise FileNotFoundError(f"SALIENT_CONFIG_FILE={config_file} is not a file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    def __repr_args__(self):
        for name, value in super().__repr_args__():
            yield name, mask_url(value) if name.endswith("_url") else value

    def with_data_dir(self, data_dir: Path | str | None) -> "Settings":
        if data_dir is None:
            return self
        return self.model_copy(update={"data_dir": Path(data_dir)})

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'salient.db').resolve()}"

    @property
    def resolved_object_store_url(self) -> str:
        return self.object_store_url or (self.data_dir / "objects").resolve().as_uri()
