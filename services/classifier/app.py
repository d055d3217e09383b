"""Build the classifier app: the service object on ``app.state``, loaded by the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
import torch
from fastapi import FastAPI

from services.classifier.api import router
from services.classifier.service import DomainClassifier
from services.classifier.settings import ClassifierSettings
from services.common.app import build_service_app

VERSION = "0.1.0"


def build_app(settings: ClassifierSettings | None = None, service: DomainClassifier | None = None) -> FastAPI:
    """The classifier app; tests pass a service (loaded, or not to test readiness).

    The lifespan loads the service from ``settings.artifacts`` unless it is loaded already; a missing
    or broken artifact stops start-up with an ``ArtifactError`` naming the file.
    """
    settings = settings or ClassifierSettings()
    classifier = service or DomainClassifier(
        threshold=settings.threshold,
        batch_size=settings.batch_size,
        max_batch=settings.max_batch,
        max_wait_s=settings.max_wait_ms / 1000,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads is not None:
            torch.set_num_threads(settings.torch_threads)
        if not classifier.ready:
            await anyio.to_thread.run_sync(classifier.load, settings.artifacts)
        yield
        if service is None:  # this app made the classifier: stop its batching thread with it
            await anyio.to_thread.run_sync(classifier.batcher.close)

    async def readiness() -> dict[str, Any]:
        if not classifier.ready:
            return {"ready": False}
        return {"ready": True, "model": classifier.model_id, "labels": classifier.labels}

    app = build_service_app(
        name="classifier",
        title="MMed-RAG domain classifier",
        version=VERSION,
        readiness=readiness,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.classifier = classifier
    classifier.attach_metrics(app.state.metrics.registry)
    app.include_router(router)
    return app
