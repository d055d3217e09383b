"""What every service app has: request ids, the error envelope, health, readiness and metrics.

``build_service_app`` is called by each service's own ``build_app``; a service passes a readiness
callable that says whether its models are loaded and its dependencies reachable.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from services.common.errors import install_error_handlers

REQUEST_ID_HEADER = "X-Request-ID"
ReadinessCheck = Callable[[], Awaitable[dict[str, Any]]]


class ServiceMetrics:
    """Per-app Prometheus registry (one per app, so tests can build many apps in one process)."""

    def __init__(self, service: str):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mmedrag_http_requests",
            "HTTP requests by route and status",
            ["service", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mmedrag_http_request_seconds",
            "HTTP request latency by route",
            ["service", "route"],
            registry=self.registry,
        )
        self.stage = Histogram(
            "mmedrag_stage_seconds",
            "Latency of one pipeline stage",
            ["service", "stage"],
            registry=self.registry,
        )
        self.service = service


def _route_name(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", "unmatched")


def build_service_app(
    *,
    name: str,
    title: str,
    version: str,
    readiness: ReadinessCheck,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
) -> FastAPI:
    """A FastAPI app with ``/healthz``, ``/readyz``, ``/metrics``, request ids and the error envelope."""
    app = FastAPI(title=title, version=version, lifespan=lifespan)
    app.state.metrics = ServiceMetrics(name)
    install_error_handlers(app)

    @app.middleware("http")
    async def _request_id_and_metrics(request: Request, call_next: Callable) -> Response:
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        request.state.request_id = request_id
        started = time.perf_counter()
        response = await call_next(request)
        response.headers[REQUEST_ID_HEADER] = request_id
        route = _route_name(request)
        metrics: ServiceMetrics = request.app.state.metrics
        metrics.requests.labels(name, route, str(response.status_code)).inc()
        metrics.latency.labels(name, route).observe(time.perf_counter() - started)
        return response

    @app.get("/healthz", tags=["health"], summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": name}

    @app.get("/readyz", tags=["health"], summary="Models loaded and dependencies reachable")
    async def readyz() -> JSONResponse:
        details = await readiness()
        ready = bool(details.get("ready"))
        return JSONResponse({"service": name, **details}, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics")
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
