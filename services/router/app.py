"""Build the router app: dependencies from settings, the pipeline on ``app.state``.

Besides the routes, the app owns what is about the whole request: one audit record per request (logger
``mmedrag.audit``: key id, route, status, domain, k, latency, request id; never the question, the image
or a key), a circuit breaker per dependency (state on ``/metrics`` and ``/readyz``), the internal token
sent to the dependencies, and tracing when it is switched on.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from prometheus_client import Gauge

from services.common.app import (
    OPEN_PATHS,
    RequestRecord,
    build_service_app,
    instrument_app,
    instrument_http_client,
)
from services.common.circuit import STATE_VALUES, CircuitBreaker, CircuitState
from services.common.http import ServiceClient
from services.common.logging import AUDIT_LOGGER
from services.router.api import RAGMetrics, router
from services.router.auth import APIKeyStore
from services.router.dependencies import ClassifierClient, GeneratorClient, RetrieverClient
from services.router.limits import InFlightLimiter, RateLimiter
from services.router.service import RAGPipeline
from services.router.settings import RouterSettings
from services.router.web import attach_web

VERSION = "0.1.0"
logger = logging.getLogger(__name__)
audit_logger = logging.getLogger(AUDIT_LOGGER)


def _breaker(name: str, settings: RouterSettings) -> CircuitBreaker | None:
    if settings.circuit_failure_threshold == 0:
        return None
    return CircuitBreaker(
        name, failure_threshold=settings.circuit_failure_threshold, cooldown_s=settings.circuit_cooldown_s
    )


def build_pipeline(settings: RouterSettings) -> RAGPipeline:
    """Clients for the three dependencies, as the settings place them."""
    classifier = ServiceClient(
        "classifier",
        settings.classifier_url,
        timeout_s=settings.classifier_timeout_s,
        retries=settings.retries,
        internal_token=settings.internal_token,
        breaker=_breaker("classifier", settings),
    )
    retriever = ServiceClient(
        "retriever",
        settings.retriever_url,
        timeout_s=settings.retriever_timeout_s,
        retries=settings.retries,
        internal_token=settings.internal_token,
        breaker=_breaker("retriever", settings),
    )
    generator = GeneratorClient(
        settings.generator_url,
        model=settings.generator_model,
        api_key=settings.generator_api_key,
        timeout_s=settings.generator_timeout_s,
        internal_token=settings.internal_token,
        breaker=_breaker("generator", settings),
    )
    return RAGPipeline(settings, ClassifierClient(classifier), RetrieverClient(retriever), generator)


def breakers(pipeline: RAGPipeline) -> dict[str, CircuitBreaker]:
    """The pipeline's circuit breakers by dependency (a pipeline built by a test may have none)."""
    found = {
        "classifier": getattr(pipeline.classifier.http, "breaker", None),
        "retriever": getattr(pipeline.retriever.http, "breaker", None),
        "generator": getattr(pipeline.generator, "breaker", None),
    }
    return {name: breaker for name, breaker in found.items() if breaker is not None}


def _httpx_clients(pipeline: RAGPipeline) -> list[Any]:
    candidates = [
        getattr(pipeline.classifier.http, "httpx_client", None),
        getattr(pipeline.retriever.http, "httpx_client", None),
        getattr(pipeline.generator, "httpx_client", None),
    ]
    return [client for client in candidates if client is not None]


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


def write_audit(record: RequestRecord) -> None:
    """One audit line per request to the API (not for probes, metrics or the page's static files)."""
    if record.path in OPEN_PATHS or record.path.startswith("/static/"):
        return
    noted = record.state.get("audit", {})
    audit_logger.info(
        "%s %s %d",
        record.method,
        record.route,
        record.status,
        extra={
            "audit": True,
            "request_id": record.request_id,
            "key_id": record.state.get("key_id"),
            "method": record.method,
            "route": record.route,
            "status": record.status,
            "task": noted.get("task"),
            "domain": noted.get("domain"),
            "k": noted.get("k"),
            "latency_ms": record.latency_ms,
            **{k: v for k, v in noted.items() if k not in ("task", "domain", "k")},
        },
    )


def _circuit_gauge(app: FastAPI, pipeline: RAGPipeline) -> None:
    gauge = Gauge(
        "mmedrag_circuit_state",
        "Circuit breaker of each dependency: 0 closed, 1 open (calls refused), 2 half-open (probing)",
        ["service", "dependency"],
        registry=app.state.metrics.registry,
    )
    for name, breaker in breakers(pipeline).items():
        gauge.labels("router", name).set_function(lambda b=breaker: STATE_VALUES[b.state])


def build_app(
    settings: RouterSettings | None = None,
    pipeline: RAGPipeline | None = None,
    *,
    tracer_provider: Any = None,
) -> FastAPI:
    """The public app; tests pass a pipeline whose clients point at in-process services.

    With ``settings.otel_enabled`` the routes and the calls to the dependencies are traced, with
    ``tracer_provider`` (default: the process's global one).
    """
    settings = settings or RouterSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.internal_token is None:
            logger.warning(
                "no internal token (MMEDRAG_INTERNAL_TOKEN unset): the classifier, retriever and generator "
                "are called without one, so they must be open"
            )
        else:
            logger.info("calling the classifier, retriever and generator with the internal token")
        yield
        current: RAGPipeline = app.state.pipeline
        await current.classifier.http.aclose()
        await current.retriever.http.aclose()
        await current.generator.aclose()

    async def readiness() -> dict[str, Any]:
        checks = await app.state.pipeline.readiness()
        circuits = {name: b.state.value for name, b in breakers(app.state.pipeline).items()}
        no_open_circuit = CircuitState.OPEN.value not in circuits.values()
        return {
            "ready": all(checks.values()) and no_open_circuit,
            "dependencies": checks,
            "circuits": circuits,
        }

    app = build_service_app(
        name="router",
        title="MMed-RAG Serve",
        version=VERSION,
        readiness=readiness,
        lifespan=lifespan,
        internal=False,  # the public face: API keys (services.router.auth), not the internal token
        on_request=write_audit,
    )
    app.state.settings = settings
    app.state.api_keys = _api_keys(settings)
    app.state.in_flight = InFlightLimiter(settings.max_in_flight)
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)
    app.state.pipeline = pipeline or build_pipeline(settings)
    app.state.rag_metrics = RAGMetrics(app.state.metrics.registry)
    _circuit_gauge(app, app.state.pipeline)
    if settings.otel_enabled:
        instrument_app(app, tracer_provider)
        for client in _httpx_clients(app.state.pipeline):
            instrument_http_client(client, tracer_provider)
    app.include_router(router)
    attach_web(app)
    return app
