"""Types of the retriever service: the ``POST /retrieve`` form and response, and the artifact sidecar.

Static limits live on the fields (``k_max >= 1``, ``gamma >= 0``, ``ratio_threshold > 1``); limits that
depend on the running service (which domains are loaded, the ``k_max`` ceiling) are checked by the
service, which names the parameter in its error.
"""

from __future__ import annotations

import time
import uuid

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.retriever.selection import SelectionStrategy
from training.data.records import Domain

RETRIEVER_SIDECAR = "retriever.json"
# Characters of the retriever weights' sha256 shown in responses (enough to tell builds apart).
RETRIEVER_ID_CHARS = 12


class RetrieverSidecar(BaseModel):
    """``retrievers/<domain>/retriever.json``: what the service needs besides the open_clip files."""

    model_config = ConfigDict(extra="allow")  # calibration details etc. are kept, not interpreted

    domain: Domain = Field(description="The domain this retriever serves.")
    embed_dim: int = Field(ge=1, description="Embedding size; must equal the collection's vector size.")
    gamma: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="Calibrated threshold of the adaptive rule; None: the service's default_gamma.",
    )
    k_max_default: int = Field(10, ge=1, description="Contexts retrieved when a request does not say.")


class RetrieveParams(BaseModel):
    """The form fields of ``POST /retrieve`` (the image comes as the multipart file ``image``)."""

    model_config = ConfigDict(extra="forbid")

    domain: str = Field(min_length=1, max_length=64, description="Which domain's corpus to search.")
    k_max: int | None = Field(
        None, ge=1, description="Contexts to retrieve (at most the service's ceiling); default per domain."
    )
    strategy: SelectionStrategy | None = Field(
        None,
        description="How many contexts to keep: adaptive (paper rule), ratio (original repository's "
        "rule), fixed (all k_max) or off (none). Default: the service's default_strategy.",
    )
    gamma: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="Adaptive rule threshold; default per domain."
    )
    k_min: int | None = Field(None, ge=0, description="Keep at least this many (adaptive, ratio).")
    ratio_threshold: float | None = Field(
        None, gt=1, allow_inf_nan=False, description="Ratio rule: keep contexts with S_1 / S_i below this."
    )

    @model_validator(mode="after")
    def _k_min_within_k_max(self) -> RetrieveParams:
        if self.k_min is not None and self.k_max is not None and self.k_min > self.k_max:
            raise ValueError(f"k_min ({self.k_min}) must not exceed k_max ({self.k_max})")
        return self


class RetrieveForm(RetrieveParams):
    """The whole multipart body of ``POST /retrieve``: the parameters and the uploaded image.

    (FastAPI reads a form into one model only when the file is a field of that model.)
    """

    image: UploadFile = Field(description="The query image: PNG, JPEG, DICOM, ...")


class RetrievedContext(BaseModel):
    """One retrieved report, in rank order; ``kept`` says whether selection kept it for the prompt."""

    id: str = Field(description="Report id (the first one when several reports share this text).")
    text: str
    score: float = Field(description="Cosine similarity between the image and the report embeddings.")
    rank: int = Field(ge=1)
    source: str | None = Field(description="Dataset the report comes from.")
    kept: bool
    report_ids: list[str] = Field(default_factory=list, description="Every report id with this text.")


class RetrieveResponse(BaseModel):
    """All ``k_max`` hits, best first; the first ``k`` are the kept ones."""

    id: str = Field(default_factory=lambda: f"retr-{uuid.uuid4().hex}")
    created: int = Field(default_factory=lambda: int(time.time()))
    domain: Domain
    collection: str
    strategy: SelectionStrategy
    k_max: int
    k: int = Field(description="Number of contexts kept (a prefix of `contexts`).")
    k_min: int
    gamma: float | None = Field(description="Threshold used by the adaptive rule (None for others).")
    ratio_threshold: float | None = Field(description="Threshold used by the ratio rule (None for others).")
    retriever: str = Field(description="Prefix of the retriever weights' sha256.")
    contexts: list[RetrievedContext]

    @property
    def kept(self) -> list[RetrievedContext]:
        return self.contexts[: self.k]
