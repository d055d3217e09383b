"""What every service app has: request ids, the internal token, the error envelope, health, readiness,
metrics, and (when switched on) tracing.

``build_service_app`` is called by each service's own ``build_app``; a service passes a readiness
callable that says whether its models are loaded and its dependencies reachable.

Internal services (classifier, retriever, our generator) are not a side door: when the process has an
internal token (``MMEDRAG_INTERNAL_TOKEN``, on ``app.state.settings``) every route but the probes and
``/metrics`` requires it, as ``Authorization: Bearer <token>`` (the header vLLM's ``--api-key`` reads, so
one scheme serves vLLM and ours) or ``X-Internal-Token: <token>``. The router sends it; the public router
itself checks API keys instead (``internal=False``).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import SecretStr
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.errors import error_body, install_error_handlers
from services.common.logging import request_id_var

REQUEST_ID_HEADER = "X-Request-ID"
INTERNAL_TOKEN_HEADER = "X-Internal-Token"
# Probes and scraping stay open: kubelets, compose health checks and Prometheus carry no token.
# ``/health`` is vLLM's probe path, which our generator answers too.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/health"})
JSON = "application/json"
CLIENT_CLOSED_REQUEST = 499  # recorded (not sent) when the caller went away mid-request (nginx's code)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
ReadinessCheck = Callable[[], Awaitable[dict[str, Any]]]
logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class RequestRecord:
    """What the middleware knows once a request is answered; handed to the app's ``on_request`` hook."""

    request_id: str
    method: str
    path: str
    route: str  # the route template ("/vqa"), or "unmatched"
    status: int
    latency_ms: float
    state: dict[str, Any]  # request.state, as the handlers left it (e.g. the router's key id)


RequestHook = Callable[[RequestRecord], None]


def token_value(token: SecretStr | str | None) -> str | None:
    if token is None:
        return None
    value = token.get_secret_value() if isinstance(token, SecretStr) else token
    return value or None


def internal_auth_headers(token: SecretStr | str | None) -> dict[str, str]:
    """Headers a caller sends so an internal service accepts it (none when there is no token)."""
    value = token_value(token)
    return {"Authorization": f"Bearer {value}"} if value else {}


def _presented_tokens(headers: Headers) -> list[str]:
    found = []
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        found.append(credentials.strip())
    if headers.get(INTERNAL_TOKEN_HEADER):
        found.append(headers[INTERNAL_TOKEN_HEADER].strip())
    return found


def token_matches(headers: Headers, expected: str) -> bool:
    """Constant-time comparison of each presented token with the expected one."""
    wanted = expected.encode("utf-8")
    matched = False
    for candidate in _presented_tokens(headers):
        matched |= hmac.compare_digest(candidate.encode("utf-8"), wanted)
    return matched


def _configured_token(app: Any) -> str | None:
    settings = getattr(app.state, "settings", None)
    return token_value(getattr(settings, "internal_token", None))


class RequestContextMiddleware:
    """Request id (header in and out, context variable for the logs), internal token, metrics and hook.

    Plain ASGI rather than ``@app.middleware("http")``: the context variable stays set while uvicorn
    writes its access line, and nothing buffers the response.
    """

    def __init__(
        self, app: ASGIApp, *, service: str, internal: bool, on_request: RequestHook | None = None
    ) -> None:
        self.app = app
        self.service = service
        self.internal = internal
        self.on_request = on_request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get(REQUEST_ID_HEADER, "")
        # A caller's id is kept when it looks like one; anything else (huge, odd characters) is replaced.
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        failed = False
        try:
            if self.internal and not self._authorized(scope, headers):
                await self._refuse(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            failed, status = True, CLIENT_CLOSED_REQUEST
            raise
        except BaseException:
            # The 500 is answered outside this middleware (ServerErrorMiddleware), which logs the
            # traceback: the request id stays set for that line.
            failed, status = True, 500
            raise
        finally:
            self._record(scope, request_id, status, started)
            if not failed:
                request_id_var.reset(token)

    def _authorized(self, scope: Scope, headers: Headers) -> bool:
        if scope["path"] in OPEN_PATHS:
            return True
        expected = _configured_token(scope["app"]) if "app" in scope else None
        return expected is None or token_matches(headers, expected)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        logger.warning(
            "refused %s %s: missing or wrong internal token",
            scope["method"],
            scope["path"],
            extra={"client": (scope.get("client") or ("?",))[0]},
        )
        body = error_body(
            "this is an internal service: send the internal token as 'Authorization: Bearer <token>'",
            code="invalid_internal_token",
            error_type="authentication_error",
        )
        response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _record(self, scope: Scope, request_id: str, status: int, started: float) -> None:
        elapsed = time.perf_counter() - started
        route = getattr(scope.get("route"), "path", "unmatched")
        app_state = getattr(scope.get("app"), "state", None)
        metrics: ServiceMetrics | None = getattr(app_state, "metrics", None)
        if metrics is not None:
            metrics.requests.labels(self.service, route, str(status)).inc()
            metrics.latency.labels(self.service, route).observe(elapsed)
        if self.on_request is not None:
            record = RequestRecord(
                request_id=request_id,
                method=scope["method"],
                path=scope["path"],
                route=route,
                status=status,
                latency_ms=round(elapsed * 1000, 2),
                state=dict(scope.get("state") or {}),
            )
            try:
                self.on_request(record)
            except Exception:  # a broken hook must not turn an answered request into an error
                logger.exception("request hook failed")


def _log_internal_auth(app: FastAPI, name: str) -> None:
    if _configured_token(app) is not None:
        logger.info("internal token set: every route but the probes and /metrics requires it")
    else:
        logger.warning(
            "no internal token (MMEDRAG_INTERNAL_TOKEN unset): the %s API is open to anyone who can "
            "reach its port; set one on every service in production",
            name,
        )


def build_service_app(
    *,
    name: str,
    title: str,
    version: str,
    readiness: ReadinessCheck,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
    internal: bool = True,
    on_request: RequestHook | None = None,
) -> FastAPI:
    """A FastAPI app with ``/healthz``, ``/readyz``, ``/metrics``, request ids and the error envelope.

    ``internal``: require the internal token from ``app.state.settings.internal_token`` when one is set
    (the public router passes False). ``on_request``: called once per answered request (the router's
    audit record).
    """

    @asynccontextmanager
    async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
        if internal:
            _log_internal_auth(app, name)
        if lifespan is None:
            yield
        else:
            async with lifespan(app):
                yield

    app = FastAPI(title=title, version=version, lifespan=_lifespan)
    app.state.metrics = ServiceMetrics(name)
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, service=name, internal=internal, on_request=on_request)

    @app.get("/healthz", tags=["health"], summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": name}

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Models loaded and dependencies reachable",
        responses={
            503: {"description": "Not ready; the body says which check failed", "content": {JSON: {}}}
        },
    )
    async def readyz() -> JSONResponse:
        details = await readiness()
        ready = bool(details.get("ready"))
        return JSONResponse({"service": name, **details}, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


# ------------------------------------------------------------------------------------ tracing (optional)

_TRACING_MISSING = (
    "tracing is on (MMEDRAG_OTEL_ENABLED=true) but OpenTelemetry is not installed: "
    "pip install 'mmed-rag[otel]'"
)
_UNTRACED_URLS = "/healthz$,/readyz$,/metrics$,/health$"


def make_tracer_provider(service: str, *, endpoint: str | None = None, exporter: Any = None) -> Any:
    """An OpenTelemetry ``TracerProvider`` for one service, exporting over OTLP/HTTP (or to ``exporter``).

    ``endpoint`` unset: the exporter follows the standard ``OTEL_EXPORTER_OTLP_*`` variables.
    """
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as exc:
        raise RuntimeError(_TRACING_MISSING) from exc
    provider = TracerProvider(resource=Resource.create({"service.name": f"mmedrag-{service}"}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        return provider
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise RuntimeError(_TRACING_MISSING) from exc
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


def instrument_app(app: FastAPI, tracer_provider: Any = None) -> None:
    """Server spans for every route but the probes; trace context is read from incoming headers (W3C).

    Instrumenting twice is harmless (the second call does nothing).
    """
    try:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    except ImportError as exc:
        raise RuntimeError(_TRACING_MISSING) from exc
    if getattr(app, "_is_instrumented_by_opentelemetry", False):
        return
    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=tracer_provider,
        excluded_urls=_UNTRACED_URLS,
        exclude_spans=["receive", "send"],
    )


def instrument_http_client(client: Any, tracer_provider: Any = None) -> None:
    """Client spans for an ``httpx.AsyncClient``; the trace context is injected into each request."""
    try:
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    except ImportError as exc:
        raise RuntimeError(_TRACING_MISSING) from exc
    HTTPXClientInstrumentor.instrument_client(client, tracer_provider=tracer_provider)
