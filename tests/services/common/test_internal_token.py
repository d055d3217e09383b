"""The internal token: internal services refuse callers without it, the router's clients send it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from services.common.app import OPEN_PATHS, build_service_app
from services.common.http import ServiceClient
from services.common.settings import ServiceSettings

TOKEN = "internal-test-token-0123456789"


def _internal_app(token: str | None) -> Any:
    async def readiness() -> dict[str, Any]:
        return {"ready": True}

    app = build_service_app(name="classifier", title="c", version="0", readiness=readiness)
    app.state.settings = ServiceSettings(internal_token=token)

    @app.post("/classify")
    async def classify() -> dict[str, str]:
        return {"label": "radiology"}

    return app


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://internal")


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong-token"}, 401),
        ({"Authorization": f"Basic {TOKEN}"}, 401),
        ({"X-Internal-Token": "wrong"}, 401),
        ({"Authorization": f"Bearer {TOKEN}"}, 200),
        ({"authorization": f"bearer {TOKEN}"}, 200),
        ({"X-Internal-Token": TOKEN}, 200),
        ({"Authorization": "Bearer some-vllm-key", "X-Internal-Token": TOKEN}, 200),
    ],
)
async def test_internal_routes_require_the_token(headers: dict[str, str], status: int) -> None:
    async with _client(_internal_app(TOKEN)) as client:
        response = await client.post("/classify", headers=headers)
    assert response.status_code == status, response.text
    if status == 401:
        assert response.json()["error"]["code"] == "invalid_internal_token"
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert response.headers["X-Request-ID"]  # the refusal is a request like any other


async def test_probes_and_metrics_stay_open_and_unknown_routes_are_guarded() -> None:
    async with _client(_internal_app(TOKEN)) as client:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await client.get(path)).status_code == 200, path
        assert (await client.get("/docs")).status_code == 401
        assert (await client.get("/nope")).status_code == 401  # no route discovery without the token
        metrics = (await client.get("/metrics")).text
    assert 'route="unmatched",service="classifier",status="401"' in metrics
    assert {"/healthz", "/readyz", "/metrics", "/health"} == OPEN_PATHS


async def test_without_a_token_the_service_is_open_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    app = _internal_app(None)
    async with _client(app) as client:
        assert (await client.post("/classify")).status_code == 200
    with caplog.at_level(logging.INFO, logger="services.common.app"):
        async with app.router.lifespan_context(app):
            pass
    assert "MMEDRAG_INTERNAL_TOKEN unset" in caplog.text and "open" in caplog.text
    caplog.clear()
    guarded = _internal_app(TOKEN)
    with caplog.at_level(logging.INFO, logger="services.common.app"):
        async with guarded.router.lifespan_context(guarded):
            pass
    assert "internal token set" in caplog.text and TOKEN not in caplog.text


async def test_service_client_sends_the_token() -> None:
    app = _internal_app(TOKEN)
    client = ServiceClient(
        "classifier",
        "http://internal",
        timeout_s=5,
        transport=httpx.ASGITransport(app=app),
        internal_token=SecretStr(TOKEN),
    )
    response = await client.request("POST", "/classify", request_id="rid-1")
    assert response.json() == {"label": "radiology"}
    await client.aclose()


def test_the_token_is_one_shared_variable_and_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.common.settings_doc import _settings_classes, env_name

    monkeypatch.setenv("MMEDRAG_INTERNAL_TOKEN", TOKEN)
    for _, settings_cls in _settings_classes():
        assert env_name(settings_cls, "internal_token") == "MMEDRAG_INTERNAL_TOKEN"
        settings = settings_cls()
        assert settings.internal_token.get_secret_value() == TOKEN
        assert TOKEN not in repr(settings) and TOKEN not in str(settings.model_dump())


async def test_the_real_internal_services_enforce_it(tmp_path: Path) -> None:
    """Classifier and generator apps as built by their own ``build_app`` (models not loaded: 503 once in)."""
    from services.classifier.app import build_app as build_classifier
    from services.classifier.settings import ClassifierSettings
    from services.generator.app import build_app as build_generator
    from services.generator.settings import GeneratorSettings

    classifier = build_classifier(ClassifierSettings(artifacts=tmp_path, internal_token=TOKEN))
    async with _client(classifier) as client:
        refused = await client.post("/classify", files={"image": ("x.png", b"x", "image/png")})
        admitted = await client.post(
            "/classify",
            files={"image": ("x.png", b"x", "image/png")},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        probe = await client.get("/readyz")
    assert refused.status_code == 401 and admitted.status_code != 401 and probe.status_code == 503

    generator = build_generator(
        GeneratorSettings(model_dir=tmp_path, internal_token=TOKEN, api_key="vllm-key")
    )
    async with _client(generator) as client:
        no_token = await client.get("/v1/models", headers={"Authorization": "Bearer vllm-key"})
        both = await client.get(
            "/v1/models", headers={"Authorization": "Bearer vllm-key", "X-Internal-Token": TOKEN}
        )
        health = await client.get("/health")
    assert no_token.status_code == 401 and both.status_code == 503  # authorised, model not loaded
    assert health.status_code == 503  # the vLLM probe path is open (and says: loading)


async def test_generator_client_sends_the_token_as_key_and_header() -> None:
    """No separate generator key: the token is the bearer key (vLLM --api-key); always X-Internal-Token."""
    from services.router.dependencies import GeneratorClient

    seen: list[httpx.Headers] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers)
        model = {"id": "m", "object": "model", "created": 0, "owned_by": "test"}
        return httpx.Response(200, json={"object": "list", "data": [model]})

    for api_key in ("EMPTY", "separate-key"):
        client = GeneratorClient(
            "http://generator/v1",
            model="m",
            api_key=api_key,
            timeout_s=5,
            http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
            internal_token=SecretStr(TOKEN),
        )
        assert await client.ready()
        await client.aclose()
    assert seen[0]["authorization"] == f"Bearer {TOKEN}" and seen[0]["x-internal-token"] == TOKEN
    assert seen[1]["authorization"] == "Bearer separate-key" and seen[1]["x-internal-token"] == TOKEN


def test_router_pipeline_carries_the_token_to_every_dependency() -> None:
    from services.router.app import build_pipeline
    from services.router.settings import RouterSettings

    pipeline = build_pipeline(RouterSettings(internal_token=TOKEN, auth_enabled=False))
    assert pipeline.classifier.http.httpx_client.headers["authorization"] == f"Bearer {TOKEN}"
    assert pipeline.retriever.http.httpx_client.headers["authorization"] == f"Bearer {TOKEN}"
    assert pipeline.generator._client.api_key == TOKEN
    open_pipeline = build_pipeline(RouterSettings(auth_enabled=False))
    assert "authorization" not in open_pipeline.classifier.http.httpx_client.headers


def test_launcher_gives_every_process_one_fresh_token_and_the_log_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.launcher import service_environment

    monkeypatch.delenv("MMEDRAG_INTERNAL_TOKEN", raising=False)
    monkeypatch.delenv("MMEDRAG_LOG_FORMAT", raising=False)
    first = service_environment(tmp_path, "127.0.0.1", 9000)
    second = service_environment(tmp_path, "127.0.0.1", 9000, log_format="text")
    assert len(first["MMEDRAG_INTERNAL_TOKEN"]) >= 32
    assert first["MMEDRAG_INTERNAL_TOKEN"] != second["MMEDRAG_INTERNAL_TOKEN"], "a new token per run"
    assert (first["MMEDRAG_LOG_FORMAT"], second["MMEDRAG_LOG_FORMAT"]) == ("json", "text")
    monkeypatch.setenv("MMEDRAG_INTERNAL_TOKEN", "operator-chosen")
    assert service_environment(tmp_path, "127.0.0.1", 9000)["MMEDRAG_INTERNAL_TOKEN"] == "operator-chosen"
