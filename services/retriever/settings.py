"""Settings of the retriever service (environment variables ``MMEDRAG_RETRIEVER_*``)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from services.common.images import ImageLimits
from services.common.settings import ServiceSettings
from services.retriever.selection import (
    DEFAULT_GAMMA,
    DEFAULT_RATIO_THRESHOLD,
    SelectionStrategy,
)
from services.retriever.store import ExactIndexMode
from training.data.records import DOMAINS, Domain


class RetrieverSettings(ServiceSettings):
    """Retriever service settings; ``artifacts`` comes from ``MMEDRAG_ARTIFACTS`` like every service's."""

    model_config = SettingsConfigDict(
        env_prefix="MMEDRAG_RETRIEVER_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    port: int = Field(8002, ge=1, le=65535, description="TCP port to listen on.")
    qdrant_url: str | None = Field(
        None,
        description="Qdrant server URL (e.g. http://qdrant:6333); unset = the embedded store in "
        "<artifacts>/index, which this service then owns exclusively (file lock: one process only).",
    )
    qdrant_api_key: SecretStr | None = Field(None, description="API key of the Qdrant server, if any.")
    qdrant_timeout_s: float = Field(10.0, gt=0, description="Deadline of one Qdrant server call.")
    qdrant_wait_s: float = Field(
        30.0, ge=0, description="At start-up, how long to wait for the Qdrant server to become reachable."
    )
    exact_index: ExactIndexMode = Field(
        "auto",
        description="Search through an in-memory exact index (float32 matrix loaded from the collection; "
        "same results as Qdrant's exact search, recall 1.0): auto = for the embedded store only (a server "
        "keeps its HNSW index), on = also for a server, off = always ask Qdrant.",
    )
    domains: Annotated[tuple[Domain, ...], NoDecode] = Field(
        DOMAINS,
        description="Domains to serve, comma-separated (each needs retrievers/<domain> and its collection).",
    )
    k_max_default: int | None = Field(
        None,
        ge=1,
        description="Contexts retrieved when a request gives no k_max; unset = each retriever's "
        "retriever.json k_max_default (10 unless the trainer chose otherwise).",
    )
    k_max_ceiling: int = Field(50, ge=1, description="Largest k_max a request may ask for.")
    k_min_default: int = Field(1, ge=0, description="Contexts kept at least (adaptive, ratio) by default.")
    default_strategy: SelectionStrategy = Field("adaptive", description="Selection rule when unspecified.")
    default_gamma: float = Field(
        DEFAULT_GAMMA,
        ge=0,
        allow_inf_nan=False,
        description="Adaptive-rule threshold for a retriever whose retriever.json has no calibrated gamma "
        "(0.05: a 5% drop between neighbouring similarities is a cliff).",
    )
    ratio_threshold: float = Field(
        DEFAULT_RATIO_THRESHOLD, gt=1, allow_inf_nan=False, description="Ratio rule default threshold."
    )
    max_image_bytes: int = Field(
        20 * 1024 * 1024, ge=1, description="Largest accepted upload, in bytes (larger: 413)."
    )
    batch_size: int = Field(
        16, ge=1, le=1024, description="Largest batch of concurrent queries per forward pass."
    )
    batch_wait_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="How long a query waits for others to share its forward pass (0: none; queries "
        "arriving while a batch runs still form the next batch).",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads (torch.set_num_threads); unset = torch's default."
    )

    @field_validator("domains", mode="before")
    @classmethod
    def _split_domains(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @model_validator(mode="after")
    def _check(self) -> RetrieverSettings:
        if not self.domains:
            raise ValueError("domains must name at least one domain")
        if len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains are repeated: {', '.join(self.domains)}")
        if self.k_max_default is not None and self.k_max_default > self.k_max_ceiling:
            raise ValueError(
                f"k_max_default ({self.k_max_default}) must not exceed k_max_ceiling ({self.k_max_ceiling})"
            )
        if self.k_min_default > self.k_max_ceiling:
            raise ValueError(
                f"k_min_default ({self.k_min_default}) exceeds k_max_ceiling ({self.k_max_ceiling})"
            )
        return self

    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_image_bytes)
