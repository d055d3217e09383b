"""Public routes: thin wrappers that validate the form and hand it to the pipeline.

Each answered request also feeds the router's own metrics (which domain, how many reports were kept, how
similar the best one was) and leaves lengths, hashes and ids on ``request.state.audit`` for the audit
record that the app writes once the response is out (``services.router.app``): never the question or
the image itself.

Forms are read as browsers and clients send them: text fields must decode as text (``StrictFormRoute``,
``services.router.forms``: no silent Latin-1 fallback), and a field sent empty, as an HTML form sends an
input left blank, counts as not sent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Form, Request, UploadFile
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import BaseModel, Field, model_validator

from services.common.circuit import CircuitOpen
from services.common.errors import (
    DependencyUnavailable,
    ErrorResponse,
    InvalidInput,
    PayloadTooLarge,
    UnprocessableImage,
    UnsupportedMediaType,
)
from services.common.logging import fingerprint
from services.router.auth import require_api_key
from services.router.forms import StrictFormRoute
from services.router.protocol import RAGResponse, RetrievalMode
from services.router.service import RAGPipeline, RAGRequest


class AuthenticatedFormRoute(StrictFormRoute):
    """The API key is checked before the form is read: a caller without one gets 401, not a form error."""

    checks_before_body = (require_api_key,)


router = APIRouter(tags=["rag"], route_class=AuthenticatedFormRoute)
DomainName = Literal["radiology", "ophthalmology", "pathology"]
MULTIPART = "multipart/form-data"  # a file upload: FastAPI would otherwise document a url-encoded form
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 429, 503, 504)}


class ReportForm(BaseModel):
    """Multipart form of ``/report``: the image file and the options."""

    image: UploadFile = Field(description="PNG, JPEG or DICOM file.")
    domain: DomainName | None = Field(None, description="Skip the classifier and use this domain.")
    retrieval: RetrievalMode = Field(
        "adaptive", description="adaptive (paper rule), fixed (keep k_max) or off."
    )
    k_max: int | None = Field(None, ge=1, description="Retrieved candidates (default and ceiling: settings).")
    gamma: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="Adaptive-selection threshold (default: calibrated)."
    )
    max_tokens: int | None = Field(None, ge=1, description="Longest answer in tokens.")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy.")

    @model_validator(mode="before")
    @classmethod
    def _empty_is_absent(cls, data: Any) -> Any:
        """An empty field is what an HTML form sends for an input left blank: the option's default applies
        (and a required field is reported missing rather than invalid)."""
        if isinstance(data, dict):
            return {name: value for name, value in data.items() if value != ""}
        return data


class VQAForm(ReportForm):
    """Options of ``/vqa``: the report options plus the question."""

    question: str = Field(min_length=1, description="A closed (yes/no) question about the image.")
    grounding_check: bool = Field(
        False,
        description="Also answer with a noise image and without the references (one generator batch, "
        "about 3x the generation cost) and report whether the answer depends on the image and on retrieval; "
        "all three generations are greedy.",
    )


class RAGMetrics:
    """What the answers look like: domains routed to, reports kept (k), best retrieval score."""

    K_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50)
    # No negative bucket: Prometheus drops a histogram's _sum when it has one; scores <= 0 land in le="0".
    SCORE_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)

    def __init__(self, registry: CollectorRegistry):
        self.domains = Counter(
            "mmedrag_router_domain_requests",
            "Answered requests by task, domain and who chose the domain (classifier or client)",
            ["task", "domain", "source"],
            registry=registry,
        )
        self.kept = Histogram(
            "mmedrag_router_retrieval_kept",
            "Retrieved reports kept and put into the prompt (k), per answered request with retrieval",
            ["domain"],
            buckets=self.K_BUCKETS,
            registry=registry,
        )
        self.top_score = Histogram(
            "mmedrag_router_retrieval_top_score",
            "Similarity of the best retrieved report, per answered request with evidence",
            ["domain"],
            buckets=self.SCORE_BUCKETS,
            registry=registry,
        )

    def observe(self, task: str, response: RAGResponse) -> None:
        domain = response.domain.label
        self.domains.labels(task, domain, response.domain.source).inc()
        if response.retrieval.mode != "off":
            self.kept.labels(domain).observe(response.retrieval.k)
        if response.evidence:
            self.top_score.labels(domain).observe(max(e.score for e in response.evidence))


async def get_pipeline(request: Request) -> RAGPipeline:
    """The app's pipeline. ``async`` on purpose: FastAPI runs a plain ``def`` dependency in its thread pool,
    a thread hop per request for a dictionary lookup."""
    return request.app.state.pipeline


PipelineDep = Annotated[RAGPipeline, Depends(get_pipeline)]
KeyIdDep = Annotated[str, Depends(require_api_key)]
# What decoding an upload may raise (services.common.images); the router answers them with param "image".
IMAGE_ERRORS = (InvalidInput, PayloadTooLarge, UnsupportedMediaType, UnprocessableImage)


def note_for_audit(request: Request, **fields: Any) -> None:
    """Add fields to this request's audit record (lengths, hashes, ids: never payloads)."""
    request.state.audit = {**getattr(request.state, "audit", {}), **fields}


async def _guarded(
    request: Request, key_id: str, task: str, run: Callable[[], Awaitable[RAGResponse]]
) -> RAGResponse:
    """Per-key rate limit, then a bounded number of requests in flight (429 / 503, never a queue)."""
    request.app.state.rate_limiter.check(key_id)
    try:
        async with request.app.state.in_flight.slot():
            response = await run()
    except IMAGE_ERRORS as error:
        # The image gate's errors carry no field; every other client error of the pipeline names its own.
        error.param = error.param or "image"
        raise
    except DependencyUnavailable as error:
        # A wrapped open circuit (e.g. retrieval_unavailable) keeps telling the client when to retry.
        if not getattr(error, "headers", None) and isinstance(error.__cause__, CircuitOpen):
            error.headers = error.__cause__.headers
        raise
    stage_seconds = request.app.state.metrics.stage
    for stage, milliseconds in response.timings_ms.items():
        stage_seconds.labels("router", stage).observe(milliseconds / 1000)
    request.app.state.rag_metrics.observe(task, response)
    note_for_audit(request, domain=response.domain.label, k=response.retrieval.k)
    return response


async def read_upload(image: UploadFile, pipeline: RAGPipeline, request: Request | None = None) -> bytes:
    """The upload's bytes, refused before decoding when empty or too large (same codes as the image gate)."""
    limit = pipeline.settings.max_image_bytes
    data = await image.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"image is larger than {limit} bytes", param="image", code="file_too_large")
    if not data:
        raise InvalidInput("image is an empty file", param="image", code="empty_file")
    if request is not None:
        note_for_audit(request, image_bytes=len(data), image_sha256=fingerprint(data))
    return data


@router.post(
    "/vqa", response_model=RAGResponse, responses=ERRORS, summary="Answer a yes/no question about an image"
)
async def vqa(
    request: Request,
    pipeline: PipelineDep,
    key_id: KeyIdDep,
    form: Annotated[VQAForm, Form(media_type=MULTIPART)],
) -> RAGResponse:
    """Closed visual question answering with domain-aware retrieval."""
    note_for_audit(request, task="vqa", domain=form.domain, question_chars=len(form.question))
    data = await read_upload(form.image, pipeline, request)
    options = form.model_dump(exclude={"image"})
    rag = RAGRequest(task="vqa", image=data, request_id=request.state.request_id, **options)
    return await _guarded(request, key_id, "vqa", lambda: pipeline.run(rag))


@router.post("/report", response_model=RAGResponse, responses=ERRORS, summary="Write a report for an image")
async def report(
    request: Request,
    pipeline: PipelineDep,
    key_id: KeyIdDep,
    form: Annotated[ReportForm, Form(media_type=MULTIPART)],
) -> RAGResponse:
    """Report generation with domain-aware retrieval."""
    note_for_audit(request, task="report", domain=form.domain)
    data = await read_upload(form.image, pipeline, request)
    options = form.model_dump(exclude={"image"})
    rag = RAGRequest(task="report", image=data, request_id=request.state.request_id, **options)
    return await _guarded(request, key_id, "report", lambda: pipeline.run(rag))
