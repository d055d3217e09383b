"""The router's observability: audit records, request ids in logs, RAG metrics, circuit breakers, tracing.

The router runs in-process over the HTTP-level fakes of ``tests/router_fakes.py``; logs are captured as
the JSON lines a deployment writes.
"""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from image_factories import make_png
from prometheus_client.parser import text_string_to_metric_families
from router_fakes import FakeStack

from services.common.app import build_service_app, instrument_app
from services.common.circuit import CircuitBreaker
from services.common.http import ServiceClient
from services.common.logging import AUDIT_LOGGER, make_handler
from services.router.app import build_app
from services.router.auth import hash_key
from services.router.dependencies import ClassifierClient, GeneratorClient, RetrieverClient
from services.router.service import RAGPipeline
from services.router.settings import RouterSettings

KEY = "mmr_observability-key-123456"
QUESTION = "Is there a small left pleural effusion behind the heart?"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _pipeline(
    stack: FakeStack,
    settings: RouterSettings,
    *,
    clock: FakeClock | None = None,
    classifier_transport: httpx.AsyncBaseTransport | None = None,
) -> RAGPipeline:
    """Like ``router_fakes.build_router_app``, with a breaker per dependency on a fake clock."""

    def breaker(name: str) -> CircuitBreaker | None:
        if clock is None:
            return None
        return CircuitBreaker(name, failure_threshold=2, cooldown_s=30, clock=clock)

    def service(name: str, handler: Any, transport: httpx.AsyncBaseTransport | None = None) -> ServiceClient:
        return ServiceClient(
            name,
            f"http://{name}",
            timeout_s=5,
            retries=1,
            backoff_s=0,
            transport=transport or httpx.MockTransport(handler),
            breaker=breaker(name),
        )

    return RAGPipeline(
        settings,
        ClassifierClient(service("classifier", stack.classifier, classifier_transport)),
        RetrieverClient(service("retriever", stack.retriever)),
        GeneratorClient(
            "http://generator/v1",
            model="mmedrag-llava",
            api_key="EMPTY",
            timeout_s=5,
            http_client=httpx.AsyncClient(transport=httpx.MockTransport(stack.generator)),
            breaker=breaker("generator"),
        ),
    )


class SeparateContextTransport(httpx.AsyncBaseTransport):
    """An in-process app reached as if it ran elsewhere: in a fresh context (no shared current span)."""

    def __init__(self, app: Any):
        self.inner = httpx.ASGITransport(app=app)
        self.sent: list[httpx.Headers] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request.headers)
        call = self.inner.handle_async_request(request)
        return await asyncio.create_task(call, context=contextvars.Context())


def _router(stack: FakeStack, clock: FakeClock | None = None, **overrides: Any) -> Any:
    overrides.setdefault("auth_enabled", True)
    overrides.setdefault("api_keys", f"clinic-7:{hash_key(KEY)}")
    settings = RouterSettings(retries=1, **overrides)
    return build_app(settings, _pipeline(stack, settings, clock=clock))


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router")


async def _vqa(client: httpx.AsyncClient, key: str | None = KEY, **form: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return await client.post(
        "/vqa",
        files={"image": ("x.png", make_png(), "image/png")},
        data={"question": QUESTION, **form},
        headers=headers,
    )


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """Everything logged, as the JSON lines the router writes."""
    stream = io.StringIO()
    handler = make_handler("router", "json", stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def _audits(stream: io.StringIO) -> list[dict[str, Any]]:
    return [line for line in _lines(stream) if line["logger"] == AUDIT_LOGGER]


async def test_audit_record_of_an_answered_request(logs: io.StringIO) -> None:
    async with _client(_router(FakeStack())) as client:
        response = await _vqa(client)
        await client.get("/healthz")
        await client.get("/metrics")
    assert response.status_code == 200
    (audit,) = _audits(logs)  # probes and metrics are not audited
    assert audit["request_id"] == response.headers["X-Request-ID"] == response.json()["request_id"]
    assert audit["key_id"] == "clinic-7" and audit["route"] == "/vqa" and audit["method"] == "POST"
    assert audit["status"] == 200 and audit["task"] == "vqa"
    assert audit["domain"] == "radiology" and audit["k"] == 1
    assert audit["latency_ms"] > 0 and audit["service"] == "router"
    assert audit["question_chars"] == len(QUESTION)
    assert audit["image_bytes"] == len(make_png()) and len(audit["image_sha256"]) == 16


@pytest.mark.parametrize(
    ("key", "form", "status", "key_id", "domain"),
    [
        (None, {}, 401, None, None),  # refused before the key is known
        (KEY, {"question": " "}, 400, "clinic-7", None),
        (KEY, {"domain": "pathology", "k_max": "999"}, 400, "clinic-7", "pathology"),
    ],
)
async def test_audit_record_of_a_refused_request(
    logs: io.StringIO,
    key: str | None,
    form: dict[str, str],
    status: int,
    key_id: str | None,
    domain: str | None,
) -> None:
    async with _client(_router(FakeStack())) as client:
        response = await _vqa(client, key, **form)
    assert response.status_code == status
    (audit,) = _audits(logs)
    assert (audit["status"], audit["key_id"], audit["domain"], audit["k"]) == (status, key_id, domain, None)
    assert audit["route"] == "/vqa" and audit["request_id"] == response.headers["X-Request-ID"]


async def test_audit_record_when_a_dependency_fails(logs: io.StringIO) -> None:
    stack = FakeStack()
    stack.fail["generator"] = lambda: httpx.Response(500, json={"error": {"message": "oom"}})
    async with _client(_router(stack)) as client:
        response = await _vqa(client)
    assert response.status_code == 503
    (audit,) = _audits(logs)
    assert audit["status"] == 503 and audit["key_id"] == "clinic-7" and audit["task"] == "vqa"


async def test_unexpected_error_is_audited_and_its_traceback_carries_the_request_id(
    logs: io.StringIO,
) -> None:
    stack = FakeStack()
    stack.fail["classifier"] = lambda: httpx.Response(200, json={"unexpected": "shape"})  # a bug, not 4xx/5xx
    app = _router(stack)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        response = await _vqa(client)
    assert response.status_code == 500
    (audit,) = _audits(logs)
    assert audit["status"] == 500 and audit["route"] == "/vqa"
    crash = next(line for line in _lines(logs) if line["message"].startswith("unhandled error"))
    assert crash["request_id"] == audit["request_id"] is not None and "KeyError" in crash["exception"]
    assert audit["key_id"] == "clinic-7"


async def test_every_line_of_a_request_carries_its_id_and_no_payload(logs: io.StringIO) -> None:
    stack = FakeStack()
    answers = iter([httpx.Response(503), None])  # the retriever fails once: a retry warning is logged
    original = stack.retriever

    def flaky(request: httpx.Request) -> httpx.Response:
        return next(answers, None) or original(request)

    stack.retriever = flaky
    async with _client(_router(stack)) as client:
        first = await _vqa(client)
        second = await _vqa(client)
    assert first.status_code == second.status_code == 200
    lines = [line for line in _lines(logs) if line["request_id"] is not None]
    first_id = first.headers["X-Request-ID"]
    first_lines = [line for line in lines if line["request_id"] == first_id]
    assert {line["logger"] for line in first_lines} >= {"services.common.http", AUDIT_LOGGER}
    assert all(line["request_id"] in {first_id, second.headers["X-Request-ID"]} for line in lines)
    everything = logs.getvalue()
    assert QUESTION not in everything and "effusion" not in everything.lower()
    assert KEY not in everything and "base64" not in everything


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


async def test_domain_k_and_top_score_metrics(logs: io.StringIO) -> None:
    async with _client(_router(FakeStack())) as client:
        await _vqa(client)  # classifier: radiology, adaptive: k = 1, top score 0.9
        await _vqa(client, domain="pathology", retrieval="fixed", k_max="2")  # k = 2
        await _vqa(client, domain="pathology", retrieval="off")  # no retrieval: no k, no score
        text = (await client.get("/metrics")).text
    samples = _samples(text)
    domains = "mmedrag_router_domain_requests_total"
    assert samples[(domains, (("domain", "radiology"), ("source", "classifier"), ("task", "vqa")))] == 1
    assert samples[(domains, (("domain", "pathology"), ("source", "client"), ("task", "vqa")))] == 2
    kept = "mmedrag_router_retrieval_kept"
    assert samples[(f"{kept}_count", (("domain", "pathology"),))] == 1
    assert samples[(f"{kept}_sum", (("domain", "pathology"),))] == 2
    assert samples[(f"{kept}_bucket", (("domain", "radiology"), ("le", "1.0")))] == 1
    assert samples[(f"{kept}_bucket", (("domain", "radiology"), ("le", "0.0")))] == 0
    score = "mmedrag_router_retrieval_top_score"
    assert samples[(f"{score}_sum", (("domain", "radiology"),))] == pytest.approx(0.9)
    assert samples[(f"{score}_bucket", (("domain", "radiology"), ("le", "0.8")))] == 0
    assert samples[(f"{score}_bucket", (("domain", "radiology"), ("le", "0.9")))] == 1


async def test_open_circuit_fails_fast_and_shows_in_readyz_and_metrics(logs: io.StringIO) -> None:
    stack, clock = FakeStack(), FakeClock()
    stack.fail["generator"] = lambda: httpx.Response(502)
    async with _client(_router(stack, clock)) as client:
        for _ in range(2):
            assert (await _vqa(client)).status_code == 503
        calls_before = len(stack.generator_bodies)
        stack.fail.pop("generator")  # recovered, but the breaker does not know yet
        refused = await _vqa(client)
        calls_after = len(stack.generator_bodies)
        ready = await client.get("/readyz")
        gauge = _samples((await client.get("/metrics")).text)
        clock.now += 30  # cooldown over: /readyz recovers and the next request probes
        ready_again = await client.get("/readyz")
        probe = await _vqa(client)
    assert refused.status_code == 503 and calls_after == calls_before
    assert refused.json()["error"]["code"] == "generator_unavailable"
    assert refused.headers["Retry-After"] == "30"
    assert ready.status_code == 503 and ready.json()["circuits"]["generator"] == "open"
    assert ready.json()["dependencies"]["generator"] is True  # reachable again, yet the circuit is open
    state = "mmedrag_circuit_state"
    assert gauge[(state, (("dependency", "generator"), ("service", "router")))] == 1
    assert gauge[(state, (("dependency", "classifier"), ("service", "router")))] == 0
    assert ready_again.status_code == 200 and ready_again.json()["circuits"]["generator"] == "half_open"
    assert probe.status_code == 200
    assert any(line["message"] == "circuit generator: closed -> open" for line in _lines(logs))


async def test_open_retriever_circuit_keeps_retry_after_through_retrieval_unavailable() -> None:
    stack, clock = FakeStack(), FakeClock()
    stack.fail["retriever"] = lambda: httpx.Response(503)
    async with _client(_router(stack, clock)) as client:
        for _ in range(2):
            await _vqa(client)
        clock.now += 10
        refused = await _vqa(client)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "retrieval_unavailable"
    assert refused.headers["Retry-After"] == "20"


def test_breakers_come_from_the_settings() -> None:
    from services.router.app import breakers, build_pipeline

    on = build_pipeline(RouterSettings(circuit_failure_threshold=3, circuit_cooldown_s=7, auth_enabled=False))
    assert {name: (b.failure_threshold, b.cooldown_s) for name, b in breakers(on).items()} == {
        "classifier": (3, 7),
        "retriever": (3, 7),
        "generator": (3, 7),
    }
    assert breakers(build_pipeline(RouterSettings(circuit_failure_threshold=0, auth_enabled=False))) == {}


async def test_tracing_follows_a_request_from_the_router_into_a_dependency(logs: io.StringIO) -> None:
    """Two apps in-process: the classifier's server span is a child of the router's client span."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from services.common.app import make_tracer_provider

    exporter = InMemorySpanExporter()
    provider = make_tracer_provider("test", exporter=exporter)
    stack = FakeStack()

    async def readiness() -> dict[str, Any]:
        return {"ready": True}

    classifier = build_service_app(name="classifier", title="c", version="0", readiness=readiness)

    @classifier.post("/classify")
    async def classify() -> dict[str, Any]:
        probabilities = {"radiology": 0.9, "ophthalmology": 0.05, "pathology": 0.05}
        return {"label": "radiology", "probabilities": probabilities, "confidence": 0.9, "confident": True}

    instrument_app(classifier, provider)
    settings = RouterSettings(retries=1, auth_enabled=False, otel_enabled=True)
    transport = SeparateContextTransport(classifier)
    pipeline = _pipeline(stack, settings, classifier_transport=transport)
    router = build_app(settings, pipeline, tracer_provider=provider)
    async with _client(router) as client:
        response = await _vqa(client, key=None)
        await client.get("/healthz")  # probes are not traced
    assert response.status_code == 200
    spans = exporter.get_finished_spans()
    servers = [s for s in spans if s.kind.name == "SERVER"]
    router_server = next(s for s in servers if s.name == "POST /vqa")
    classifier_server = next(s for s in servers if s.name == "POST /classify")
    clients = [s for s in spans if s.kind.name == "CLIENT"]
    assert len(clients) == 3  # classifier, retriever, generator
    to_classifier = next(s for s in clients if str(s.attributes.get("http.url")).endswith("/classify"))
    trace_id = router_server.context.trace_id
    assert {s.context.trace_id for s in [*clients, classifier_server]} == {trace_id}
    assert to_classifier.parent.span_id == router_server.context.span_id
    # Only the headers connect the two apps: the classifier ran in a fresh context, as in its own process.
    assert classifier_server.parent.is_remote
    assert classifier_server.parent.span_id == to_classifier.context.span_id
    assert transport.sent[0]["traceparent"].split("-")[1] == format(trace_id, "032x")
    assert not any("healthz" in s.name for s in spans)
    (audit,) = _audits(logs)  # log lines name the trace they belong to
    assert audit["trace_id"] == format(trace_id, "032x")
