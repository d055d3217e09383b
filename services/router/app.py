"""Build the router app: dependencies from settings, the pipeline on ``app.state``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from services.common.app import build_service_app
from services.common.http import ServiceClient
from services.router.api import router
from services.router.auth import APIKeyStore
from services.router.dependencies import ClassifierClient, GeneratorClient, RetrieverClient
from services.router.limits import InFlightLimiter, RateLimiter
from services.router.service import RAGPipeline
from services.router.settings import RouterSettings
from services.router.web import attach_web

VERSION = "0.1.0"
logger = logging.getLogger(__name__)


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


def _api_keys(settings: RouterSettings) -> APIKeyStore | None:
    """The key store, or None when auth is explicitly off; refuse to start open by accident."""
    if not settings.auth_enabled:
        logger.warning(
            "authentication is OFF (MMEDRAG_ROUTER_AUTH_ENABLED=false): anyone who can reach it may call"
        )
        return None
    store = APIKeyStore.from_settings(settings.api_keys, settings.api_keys_file)
    if not store.entries:
        raise ValueError(
            "authentication is on but no API keys are configured: create one with "
            "`mmedrag keys create --id NAME`, set MMEDRAG_ROUTER_API_KEYS or MMEDRAG_ROUTER_API_KEYS_FILE, "
            "or set MMEDRAG_ROUTER_AUTH_ENABLED=false on a loopback-only development setup"
        )
    return store


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
    app.state.api_keys = _api_keys(settings)
    app.state.in_flight = InFlightLimiter(settings.max_in_flight)
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)
    app.state.pipeline = pipeline or build_pipeline(settings)
    app.include_router(router)
    attach_web(app)
    return app
