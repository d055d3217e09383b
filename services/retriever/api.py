"""Routes of the retriever service: thin wrappers around ``RetrieverService``."""

from __future__ import annotations

import time
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Depends, Form, Request

from services.common.app import ServiceMetrics
from services.common.errors import ErrorResponse, NotReady, ServiceError
from services.common.images import decode_image
from services.retriever.protocol import RetrieveForm, RetrieveResponse
from services.retriever.service import RetrieverService

router = APIRouter(tags=["retriever"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 422, 503, 504)}


def get_retriever(request: Request) -> RetrieverService:
    retriever: RetrieverService = request.app.state.retriever
    if not retriever.ready:
        raise NotReady("the retriever is still loading; retry when /readyz answers 200")
    return retriever


RetrieverDep = Annotated[RetrieverService, Depends(get_retriever)]


@router.post(
    "/retrieve",
    response_model=RetrieveResponse,
    responses=ERRORS,
    operation_id="retriever-retrieve",
    summary="Reports of the domain's corpus nearest to an image, and how many to keep",
)
async def retrieve(
    request: Request, retriever: RetrieverDep, form: Annotated[RetrieveForm, Form()]
) -> RetrieveResponse:
    """The ``k_max`` nearest reports, best first; the first ``k`` are kept by the selection strategy."""
    retriever.resolve(form)  # unknown domain or k_max above the ceiling: refuse before decoding
    limits = retriever.settings.image_limits()
    metrics: ServiceMetrics = request.app.state.metrics
    started = time.perf_counter()
    data = await form.image.read(limits.max_bytes + 1)  # one byte over is enough for a 413
    try:
        decoded = await anyio.to_thread.run_sync(decode_image, data, limits)
    except ServiceError as exc:
        exc.param = exc.param or "image"
        raise
    decoded_at = time.perf_counter()
    metrics.stage.labels(metrics.service, "decode").observe(decoded_at - started)
    response = await retriever.retrieve(decoded.image, form)
    metrics.stage.labels(metrics.service, "retrieve").observe(time.perf_counter() - decoded_at)
    return response
