"""Router settings (env prefix ``MMEDRAG_ROUTER_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class RouterSettings(ServiceSettings):
    """The public service: where its dependencies are, and the limits it enforces on every request."""

    model_config = SettingsConfigDict(env_prefix="MMEDRAG_ROUTER_", env_file=".env", extra="ignore")

    port: int = Field(8000, ge=1, le=65535, description="TCP port of the public API.")
    classifier_url: str = Field("http://127.0.0.1:8001", description="Base URL of the classifier service.")
    retriever_url: str = Field("http://127.0.0.1:8002", description="Base URL of the retriever service.")
    generator_url: str = Field(
        "http://127.0.0.1:8003/v1",
        description="OpenAI-compatible base URL of the generator: vLLM in production, ours off-GPU.",
    )
    generator_model: str = Field("mmedrag-llava", description="Model name the generator serves.")
    generator_api_key: str = Field(
        "EMPTY",
        description="API key sent to the generator (vLLM --api-key); EMPTY = send the internal token "
        "(MMEDRAG_INTERNAL_TOKEN) when one is set.",
    )
    classifier_timeout_s: float = Field(10.0, gt=0, description="Deadline of one classifier call.")
    retriever_timeout_s: float = Field(10.0, gt=0, description="Deadline of one retriever call.")
    generator_timeout_s: float = Field(120.0, gt=0, description="Deadline of one generation.")
    retries: int = Field(2, ge=0, le=5, description="Retries of idempotent calls (classify, retrieve).")
    min_domain_confidence: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Classifier confidence under which the image counts as of no known domain; unset = the "
        "threshold calibrated with the classifier (on out-of-domain negatives).",
    )
    low_confidence_action: Literal["warn", "refuse"] = Field(
        "warn", description="What to do under min_domain_confidence: add a warning, or refuse with 422."
    )
    k_max_default: int = Field(10, ge=1, description="Retrieved candidates when the request does not say.")
    k_max_ceiling: int = Field(50, ge=1, description="Largest k_max a request may ask for.")
    max_tokens_vqa: int = Field(32, ge=1, description="Default max_tokens for /vqa.")
    max_tokens_report: int = Field(256, ge=1, description="Default max_tokens for /report.")
    max_tokens_ceiling: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")
    temperature_default: float = Field(
        0.0, ge=0, le=2, description="Default temperature (0 = greedy, reproducible answers)."
    )
    normalised_max_side: int = Field(
        512,
        ge=64,
        le=4096,
        description="Longest side (px) of the image sent to the classifier, retriever and generator: the "
        "upload is decoded once and downscaled to fit, aspect ratio kept.",
    )
    max_question_chars: int = Field(2000, ge=1, description="Longest accepted question.")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Largest accepted upload.")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Largest accepted width × height.")
    auth_enabled: bool = Field(
        True,
        description="Require an API key on /vqa, /report and /preview. Turn off only on loopback development "
        "setups (`mmedrag up` does, and says so).",
    )
    api_keys: str | None = Field(
        None,
        description="API keys as 'id:sha256hex' pairs, comma-separated (`mmedrag keys create` makes them).",
    )
    api_keys_file: Path | None = Field(
        None, description="File of 'id:sha256hex' lines (e.g. a mounted Kubernetes Secret)."
    )
    max_in_flight: int = Field(
        32, ge=1, description="Requests processed at once; more are refused with 503 and Retry-After."
    )
    rate_limit_per_minute: float = Field(
        0, ge=0, description="Sustained requests per minute per API key (0 = no limit); over it: 429."
    )
    rate_limit_burst: int = Field(
        10, ge=1, description="Requests a key may send at once before the rate applies."
    )
    retrieval_failure: Literal["fail", "degrade"] = Field(
        "fail",
        description="When the retriever or Qdrant is down: fail with 503 retrieval_unavailable, or answer "
        "without retrieval and add a 'degraded' warning.",
    )
    circuit_failure_threshold: int = Field(
        5,
        ge=0,
        description="Consecutive failed calls (unreachable, 5xx, timeout) after which a dependency's circuit "
        "opens: calls then fail at once with 503 and Retry-After, and /readyz reports it. 0 = no breaker.",
    )
    circuit_cooldown_s: float = Field(
        30.0, gt=0, description="How long an open circuit refuses calls before one probe call may go through."
    )
