"""Routes of the classifier service: thin wrappers around ``DomainClassifier``."""

from __future__ import annotations

import time
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Depends, File, Request, UploadFile

from services.classifier.protocol import ClassifyResponse
from services.classifier.service import DomainClassifier
from services.common.app import ServiceMetrics
from services.common.errors import ErrorResponse, NotReady, ServiceError
from services.common.images import ImageLimits, decode_image

router = APIRouter(tags=["classifier"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 503)}


def get_classifier(request: Request) -> DomainClassifier:
    classifier: DomainClassifier = request.app.state.classifier
    if not classifier.ready:
        raise NotReady("the classifier is still loading; retry when /readyz answers 200")
    return classifier


ClassifierDep = Annotated[DomainClassifier, Depends(get_classifier)]


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=ERRORS,
    summary="Which domain an image belongs to",
)
async def classify(
    request: Request,
    classifier: ClassifierDep,
    image: Annotated[UploadFile, File(description="The image: PNG, JPEG, DICOM, ...")],
) -> ClassifyResponse:
    """Domain of one uploaded image, with the probability of every known domain."""
    limits = ImageLimits(max_bytes=request.app.state.settings.max_image_bytes)
    metrics: ServiceMetrics = request.app.state.metrics
    started = time.perf_counter()
    # One byte over the limit is enough for decode_image to refuse the upload (413).
    data = await image.read(limits.max_bytes + 1)
    try:
        decoded = await anyio.to_thread.run_sync(decode_image, data, limits)
    except ServiceError as exc:
        exc.param = exc.param or "image"
        raise
    decoded_at = time.perf_counter()
    metrics.stage.labels(metrics.service, "decode").observe(decoded_at - started)
    result = await classifier.aclassify(decoded.image)
    metrics.stage.labels(metrics.service, "classify").observe(time.perf_counter() - decoded_at)
    return ClassifyResponse(
        label=result.label,
        probabilities=result.probabilities,
        confidence=result.confidence,
        confident=result.confident,
        threshold=classifier.threshold,
        model=classifier.model_id,
    )
