"""Settings shared by every service; each service subclasses with its own env prefix.

Values come from environment variables (and an optional ``.env`` file), validated at start-up. Every
field is documented here, which is also where ``.env.example`` and the deployment files take them from.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ARTIFACTS_ENV = "MMEDRAG_ARTIFACTS"


class ServiceSettings(BaseSettings):
    """Fields every service has. Subclasses set ``env_prefix`` (e.g. ``MMEDRAG_RETRIEVER_``)."""

    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", env_ignore_empty=True, populate_by_name=True
    )

    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on.")
    artifacts: Path = Field(
        Path("artifacts"),
        description="Artifacts folder (built by `mmedrag artifacts tiny` or `mmedrag bootstrap`).",
        validation_alias=ARTIFACTS_ENV,
    )
    log_level: str = Field("info", description="Log level: debug, info, warning, error.")
