"""The one settings object for the whole system (env vars ``SALIENT_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SALIENT_", env_file=None, extra="ignore")

    data_dir: Path = Field(Path("salient-data"), description="embedded store: DIR/salient.db and DIR/objects/")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///DATA_DIR/salient.db")
    object_store_url: str | None = Field(None, description="file:///path or s3://bucket/prefix; default DATA_DIR/objects")

    max_image_pixels: int = 40_000_000
    max_image_bytes: int = 64 * 1024 * 1024
    overlay_max_side: int = 1024

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
