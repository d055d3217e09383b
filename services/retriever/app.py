"""Build the retriever app: the service object on ``app.state``, loaded by the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
import torch
from fastapi import FastAPI

from services.common.app import build_service_app
from services.retriever.api import router
from services.retriever.service import RetrieverService
from services.retriever.settings import RetrieverSettings

VERSION = "0.1.0"


def build_app(settings: RetrieverSettings | None = None, service: RetrieverService | None = None) -> FastAPI:
    """The retriever app; tests pass a service (loaded, or not to test readiness).

    The lifespan loads the service unless it is loaded already: an inconsistent artifact or index
    stops start-up with an error naming the file or collection and the command that rebuilds it. A
    service built here is closed at shutdown (which releases the embedded store's file lock).
    """
    settings = settings or (service.settings if service is not None else RetrieverSettings())
    retriever = service or RetrieverService(settings)
    owned = service is None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads is not None:
            torch.set_num_threads(settings.torch_threads)
        if not retriever.ready:
            await anyio.to_thread.run_sync(retriever.load)
        try:
            yield
        finally:
            if owned:
                retriever.close()

    async def readiness() -> dict[str, Any]:
        return await retriever.readiness()

    app = build_service_app(
        name="retriever",
        title="MMed-RAG retriever",
        version=VERSION,
        readiness=readiness,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.retriever = retriever
    retriever.attach_metrics(app.state.metrics.registry)
    app.include_router(router)
    return app
