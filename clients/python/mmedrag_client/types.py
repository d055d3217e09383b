"""Typed results of the API (plain dataclasses: the client depends on httpx only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class APIError(Exception):
    """A non-2xx answer: ``status``, machine ``code`` and human ``message`` from the error envelope."""

    def __init__(
        self, status: int, code: str, message: str, param: str | None = None, request_id: str | None = None
    ):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.request_id = request_id


@dataclass(frozen=True)
class DomainInfo:
    label: str
    probabilities: dict[str, float]
    source: str


@dataclass(frozen=True)
class Evidence:
    id: str
    text: str
    score: float
    rank: int
    source: str
    kept: bool


@dataclass(frozen=True)
class RetrievalInfo:
    mode: str
    k_max: int
    k: int
    gamma: float | None


@dataclass(frozen=True)
class Grounding:
    """Only with ``grounding_check=True`` on ``vqa``: does the answer depend on the image, on retrieval."""

    image_dependent: bool
    retrieval_changed_answer: bool | None
    noise_image_answer: str
    no_retrieval_answer: str | None


@dataclass(frozen=True)
class RAGResult:
    """What ``/vqa`` and ``/report`` return."""

    answer: str
    text: str
    domain: DomainInfo
    evidence: list[Evidence]
    retrieval: RetrievalInfo
    model: str
    timings_ms: dict[str, float]
    request_id: str
    warnings: list[str] = field(default_factory=list)
    grounding: Grounding | None = None
    disclaimer: str = ""

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> RAGResult:
        return cls(
            answer=body["answer"],
            text=body["text"],
            domain=DomainInfo(**body["domain"]),
            evidence=[Evidence(**item) for item in body["evidence"]],
            retrieval=RetrievalInfo(**body["retrieval"]),
            model=body["model"],
            timings_ms=dict(body["timings_ms"]),
            request_id=body["request_id"],
            warnings=list(body.get("warnings", [])),
            grounding=Grounding(**body["grounding"]) if body.get("grounding") else None,
            disclaimer=body.get("disclaimer", ""),
        )
