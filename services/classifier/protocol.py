"""Wire types of the classifier service (no I/O)."""

from __future__ import annotations

import time
import uuid

from pydantic import BaseModel, Field


class ClassifyResponse(BaseModel):
    """The domain of one uploaded image, with the full distribution so callers can reject or warn."""

    id: str = Field(default_factory=lambda: f"cls-{uuid.uuid4().hex}", description="Response id.")
    created: int = Field(default_factory=lambda: int(time.time()), description="Unix time of the answer.")
    label: str = Field(description="The most probable domain (argmax of `probabilities`).")
    probabilities: dict[str, float] = Field(description="Probability of each known domain; sums to 1.")
    confidence: float = Field(ge=0.0, le=1.0, description="Probability of `label`.")
    confident: bool = Field(
        description="confidence >= threshold; false means the image may be of none of the known domains."
    )
    threshold: float = Field(ge=0.0, le=1.0, description="The confidence threshold applied.")
    model: str = Field(description="Identifier of the classifier weights (sha256 prefix).")
