"""A dependency that refuses the router itself: 503 naming the setting to check, never its own status.

``GeneratorClient`` is driven over an ``httpx.MockTransport`` standing in for vLLM; the router-level cases
go through the real app over the fakes of ``tests/router_fakes.py``.
"""

from __future__ import annotations

import httpx
import pytest
from image_factories import make_png
from router_fakes import FakeStack, build_router

from services.common.circuit import CircuitBreaker, CircuitState
from services.common.errors import DependencyUnavailable
from services.common.http import DependencyMisconfigured, DownstreamError
from services.router.dependencies import GeneratorClient

SECRET_BODY = {"error": {"message": "downstream secret detail", "type": "auth", "code": "denied"}}


def _generator(
    status: int, *, api_key: str = "EMPTY", token: str | None = None, breaker: CircuitBreaker | None = None
) -> tuple[GeneratorClient, list[httpx.Request]]:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(status, json=SECRET_BODY)

    client = GeneratorClient(
        "http://generator/v1",
        model="mmedrag-llava",
        api_key=api_key,
        timeout_s=5,
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
        internal_token=token,
        breaker=breaker,
    )
    return client, sent


async def _generate(client: GeneratorClient) -> None:
    await client.generate("prompt", "data:image/png;base64,AA==", max_tokens=4, temperature=0, request_id="r")


@pytest.mark.parametrize(
    ("status", "api_key", "token", "names"),
    [
        (401, "EMPTY", "t0ken", ["MMEDRAG_INTERNAL_TOKEN", "MMEDRAG_ROUTER_GENERATOR_API_KEY"]),
        (403, "EMPTY", "t0ken", ["MMEDRAG_INTERNAL_TOKEN"]),
        (401, "vllm-key", "t0ken", ["MMEDRAG_ROUTER_GENERATOR_API_KEY", "VLLM_API_KEY"]),
        (401, "EMPTY", None, ["MMEDRAG_ROUTER_GENERATOR_API_KEY", "MMEDRAG_INTERNAL_TOKEN"]),
        (404, "EMPTY", None, ["MMEDRAG_ROUTER_GENERATOR_MODEL", "'mmedrag-llava'", "--served-model-name"]),
    ],
    ids=["401-token", "403-token", "401-own-key", "401-no-key", "404-model"],
)
async def test_generator_refusing_the_router_is_503_naming_the_setting(
    status: int, api_key: str, token: str | None, names: list[str]
) -> None:
    client, sent = _generator(status, api_key=api_key, token=token)
    with pytest.raises(DependencyMisconfigured) as caught:
        await _generate(client)
    error = caught.value
    assert (error.status_code, error.code, error.error_type) == (
        503,
        "generator_unavailable",
        "service_unavailable",
    )
    assert error.message.startswith(f"the generator cannot be used ({status})")
    for name in names:
        assert name in error.message
    assert "downstream secret detail" not in error.message
    assert len(sent) == 1
    expected_key = token if api_key == "EMPTY" and token else api_key
    assert sent[0].headers["authorization"] == f"Bearer {expected_key}"


async def test_generator_misconfiguration_does_not_trip_the_breaker() -> None:
    breaker = CircuitBreaker("generator", failure_threshold=1, cooldown_s=30)
    client, sent = _generator(401, token="t0ken", breaker=breaker)
    for _ in range(3):
        with pytest.raises(DependencyMisconfigured):
            await _generate(client)
    assert breaker.state is CircuitState.CLOSED and len(sent) == 3
    failing, _ = _generator(500, breaker=breaker)
    with pytest.raises(DependencyUnavailable):
        await _generate(failing)
    assert breaker.state is CircuitState.OPEN, "the control: a 5xx at this threshold opens it"


async def test_other_generator_4xx_is_still_the_requests_problem() -> None:
    """A 400 (e.g. the prompt is too long for the context) stays a 400 about the request."""
    client, _ = _generator(400)
    with pytest.raises(DownstreamError) as caught:
        await _generate(client)
    assert caught.value.status_code == 400 and caught.value.code == "generator_rejected"


@pytest.mark.parametrize(
    ("dependency", "status", "code"),
    [
        ("classifier", 401, "classifier_unavailable"),
        ("retriever", 403, "retrieval_unavailable"),
        ("generator", 401, "generator_unavailable"),
        ("generator", 404, "generator_unavailable"),
    ],
)
async def test_the_client_gets_503_and_no_downstream_words(dependency: str, status: int, code: str) -> None:
    stack = FakeStack()
    stack.fail[dependency] = lambda: httpx.Response(status, json=SECRET_BODY)
    async with build_router(stack) as client:
        response = await client.post(
            "/vqa", files={"image": ("x.png", make_png(), "image/png")}, data={"question": "Q?"}
        )
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "service_unavailable"
    assert "MMEDRAG_" in error["message"] and "downstream secret detail" not in response.text
    assert "WWW-Authenticate" not in response.headers
