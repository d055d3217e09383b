"""Public routes: thin wrappers that validate the form and hand it to the pipeline."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Form, Request, UploadFile
from pydantic import BaseModel, Field

from services.common.errors import ErrorResponse, InvalidInput, PayloadTooLarge
from services.router.auth import require_api_key
from services.router.protocol import RAGResponse, RetrievalMode
from services.router.service import RAGPipeline, RAGRequest

router = APIRouter(tags=["rag"])
DomainName = Literal["radiology", "ophthalmology", "pathology"]
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 429, 503, 504)}


class ReportForm(BaseModel):
    """Multipart form of ``/report``: the image file and the options."""

    image: UploadFile = Field(description="PNG, JPEG or DICOM file.")
    domain: DomainName | None = Field(None, description="Skip the classifier and use this domain.")
    retrieval: RetrievalMode = Field(
        "adaptive", description="adaptive (paper rule), fixed (keep k_max) or off."
    )
    k_max: int | None = Field(None, ge=1, description="Retrieved candidates (default and ceiling: settings).")
    gamma: float | None = Field(None, ge=0, description="Adaptive-selection threshold (default: calibrated).")
    max_tokens: int | None = Field(None, ge=1, description="Longest answer in tokens.")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy.")


class VQAForm(ReportForm):
    """Options of ``/vqa``: the report options plus the question."""

    question: str = Field(min_length=1, description="A closed (yes/no) question about the image.")


def get_pipeline(request: Request) -> RAGPipeline:
    return request.app.state.pipeline


PipelineDep = Annotated[RAGPipeline, Depends(get_pipeline)]
KeyIdDep = Annotated[str, Depends(require_api_key)]


async def _guarded(request: Request, key_id: str, run: Callable[[], Awaitable[RAGResponse]]) -> RAGResponse:
    """Per-key rate limit, then a bounded number of requests in flight (429 / 503, never a queue)."""
    request.app.state.rate_limiter.check(key_id)
    async with request.app.state.in_flight.slot():
        response = await run()
    stage_seconds = request.app.state.metrics.stage
    for stage, milliseconds in response.timings_ms.items():
        stage_seconds.labels("router", stage).observe(milliseconds / 1000)
    return response


async def read_upload(image: UploadFile, pipeline: RAGPipeline) -> bytes:
    limit = pipeline.settings.max_image_bytes
    data = await image.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"image is larger than {limit} bytes", param="image")
    if not data:
        raise InvalidInput("image is an empty file", param="image")
    return data


@router.post(
    "/vqa", response_model=RAGResponse, responses=ERRORS, summary="Answer a yes/no question about an image"
)
async def vqa(
    request: Request,
    pipeline: PipelineDep,
    key_id: KeyIdDep,
    form: Annotated[VQAForm, Form()],
) -> RAGResponse:
    """Closed visual question answering with domain-aware retrieval."""
    data = await read_upload(form.image, pipeline)
    options = form.model_dump(exclude={"image"})
    rag = RAGRequest(task="vqa", image=data, request_id=request.state.request_id, **options)
    return await _guarded(request, key_id, lambda: pipeline.run(rag))


@router.post("/report", response_model=RAGResponse, responses=ERRORS, summary="Write a report for an image")
async def report(
    request: Request,
    pipeline: PipelineDep,
    key_id: KeyIdDep,
    form: Annotated[ReportForm, Form()],
) -> RAGResponse:
    """Report generation with domain-aware retrieval."""
    data = await read_upload(form.image, pipeline)
    options = form.model_dump(exclude={"image"})
    rag = RAGRequest(task="report", image=data, request_id=request.state.request_id, **options)
    return await _guarded(request, key_id, lambda: pipeline.run(rag))
