"""Build the router app: dependencies from settings, the pipeline on ``app.state``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from services.common.app import build_service_app
from services.common.http import ServiceClient
from services.router.api import router
from services.router.dependencies import ClassifierClient, GeneratorClient, RetrieverClient
from services.router.service import RAGPipeline
from services.router.settings import RouterSettings
from services.router.web import attach_web

VERSION = "0.1.0"


def build_pipeline(settings: RouterSettings) -> RAGPipeline:
    """Clients for the three dependencies, as the settings place them."""
    classifier = ServiceClient(
        "classifier",
        settings.classifier_url,
        timeout_s=settings.classifier_timeout_s,
        retries=settings.retries,
    )
    retriever = ServiceClient(
        "retriever", settings.retriever_url, timeout_s=settings.retriever_timeout_s, retries=settings.retries
    )
    generator = GeneratorClient(
        settings.generator_url,
        model=settings.generator_model,
        api_key=settings.generator_api_key,
        timeout_s=settings.generator_timeout_s,
    )
    return RAGPipeline(settings, ClassifierClient(classifier), RetrieverClient(retriever), generator)


def build_app(settings: RouterSettings | None = None, pipeline: RAGPipeline | None = None) -> FastAPI:
    """The public app; tests pass a pipeline whose clients point at in-process services."""
    settings = settings or RouterSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        current: RAGPipeline = app.state.pipeline
        await current.classifier.http.aclose()
        await current.retriever.http.aclose()
        await current.generator.aclose()

    async def readiness() -> dict[str, Any]:
        checks = await app.state.pipeline.readiness()
        return {"ready": all(checks.values()), "dependencies": checks}

    app = build_service_app(
        name="router", title="MMed-RAG Serve", version=VERSION, readiness=readiness, lifespan=lifespan
    )
    app.state.settings = settings
    app.state.pipeline = pipeline or build_pipeline(settings)
    app.include_router(router)
    attach_web(app)
    return app
