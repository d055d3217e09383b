"""Generator settings (env prefix ``MMEDRAG_GENERATOR_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from services.common.artifacts import GENERATOR_DIR
from services.common.settings import ServiceSettings


class GeneratorSettings(ServiceSettings):
    """Which model folder to serve, under what name, and the limits a request must respect."""

    model_config = SettingsConfigDict(
        env_prefix="MMEDRAG_GENERATOR_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    port: int = Field(8003, ge=1, le=65535, description="TCP port of the OpenAI-compatible API.")
    model_dir: Path | None = Field(
        None,
        description="Hugging Face LLaVA folder to serve; default <artifacts>/generator.",
    )
    served_model_name: str = Field(
        "mmedrag-llava",
        min_length=1,
        description="Model name clients send and responses carry (vLLM --served-model-name).",
    )
    max_tokens_ceiling: int = Field(
        1024, ge=1, description="Largest max_tokens a request may ask for (longer asks get 400)."
    )
    api_key: SecretStr | None = Field(
        None,
        description="When set, /v1 routes require 'Authorization: Bearer <key>' (vLLM --api-key).",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Weights dtype on the CPU: float32 is fastest, bfloat16 halves the memory."
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="Intra-op CPU threads while generating (default: torch's choice); 1 suits tiny models.",
    )
    max_batch: int = Field(
        8,
        ge=1,
        le=256,
        description="Static batching: most waiting requests (same sampling parameters) run as one generate "
        "call (1 = off: one request at a time).",
    )
    max_wait_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description="Static batching: how long a request waits for others before its batch starts anyway.",
    )

    @property
    def model_folder(self) -> Path:
        """The folder to load: ``model_dir`` when given, else the artifacts' generator folder."""
        return self.model_dir if self.model_dir is not None else self.artifacts / GENERATOR_DIR
