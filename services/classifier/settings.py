"""Settings of the classifier service (environment variables ``MMEDRAG_CLASSIFIER_*``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class ClassifierSettings(ServiceSettings):
    """Classifier service settings; ``artifacts`` comes from ``MMEDRAG_ARTIFACTS`` like every service's."""

    model_config = SettingsConfigDict(
        env_prefix="MMEDRAG_CLASSIFIER_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    port: int = Field(8001, ge=1, le=65535, description="TCP port to listen on.")
    threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Confidence under which an image is 'none of the known domains'; "
        "unset = the threshold stored in the classifier artifact.",
    )
    max_image_bytes: int = Field(
        20 * 1024 * 1024, ge=1, description="Largest accepted upload, in bytes (larger: 413)."
    )
    batch_size: int = Field(32, ge=1, le=1024, description="Images per forward pass of the image tower.")
    max_batch: int = Field(
        16,
        ge=1,
        le=1024,
        description="Micro-batching: most concurrent requests gathered into one forward pass "
        "(1 = off: every request runs its own).",
    )
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="Micro-batching: how long a request waits for others to share its forward pass (0: "
        "none; requests arriving while a batch runs still form the next batch).",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads (torch.set_num_threads); unset = torch's default."
    )
