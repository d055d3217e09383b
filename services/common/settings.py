"""Settings shared by every service; each service subclasses with its own env prefix.

Values come from environment variables (and an optional ``.env`` file), validated at start-up. Every
field is documented here, which is also where ``.env.example`` and the deployment files take them from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

ARTIFACTS_ENV = "MMEDRAG_ARTIFACTS"
# Shared by every service (one value for the whole stack), hence no per-service prefix.
INTERNAL_TOKEN_ENV = "MMEDRAG_INTERNAL_TOKEN"
LOG_FORMAT_ENV = "MMEDRAG_LOG_FORMAT"
OTEL_ENABLED_ENV = "MMEDRAG_OTEL_ENABLED"
OTEL_ENDPOINT_ENV = "MMEDRAG_OTEL_ENDPOINT"


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
    log_format: Literal["json", "text"] = Field(
        "json",
        description="Log lines: one JSON object each (ts, level, logger, service, request_id, message, …) "
        "or plain text for a terminal.",
        validation_alias=LOG_FORMAT_ENV,
    )
    internal_token: SecretStr | None = Field(
        None,
        description="Shared secret between the router and the internal services: they require it "
        "('Authorization: Bearer <token>') on every route but /healthz, /readyz, /metrics and /health; the "
        "router sends it. Unset = internal services are open (said at start-up). `mmedrag up` sets a random "
        "one per run.",
        validation_alias=INTERNAL_TOKEN_ENV,
    )
    otel_enabled: bool = Field(
        False,
        description="OpenTelemetry tracing of requests and of the calls between services (needs the "
        "'otel' extra).",
        validation_alias=OTEL_ENABLED_ENV,
    )
    otel_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP traces endpoint, e.g. http://otel-collector:4318/v1/traces; unset = the "
        "standard OTEL_EXPORTER_OTLP_* variables.",
        validation_alias=OTEL_ENDPOINT_ENV,
    )
