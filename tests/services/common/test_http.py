"""Calls between services: retries for idempotent calls, request ids, error translation."""

from __future__ import annotations

import httpx
import pytest

from services.common.errors import DependencyTimeout, DependencyUnavailable
from services.common.http import DownstreamError, ServiceClient


def _client(handler, **kwargs) -> ServiceClient:
    return ServiceClient(
        "retriever",
        "http://retriever",
        timeout_s=1,
        backoff_s=0,
        transport=httpx.MockTransport(handler),
        **kwargs,
    )


async def test_idempotent_call_is_retried_until_it_succeeds() -> None:
    answers = iter([httpx.Response(503), httpx.Response(502), httpx.Response(200, json={"ok": True})])
    client = _client(lambda request: next(answers), retries=2)
    response = await client.request("POST", "/retrieve")
    assert response.json() == {"ok": True}


async def test_retries_are_bounded() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(503, json={"error": {"message": "loading", "type": "x", "code": "not_ready"}})

    with pytest.raises(DependencyUnavailable, match="retriever answered 503: loading"):
        await _client(handler, retries=2).request("POST", "/retrieve")
    assert len(calls) == 3


async def test_non_idempotent_call_is_not_retried() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(503)

    with pytest.raises(DependencyUnavailable):
        await _client(handler, retries=3).request("POST", "/generate", idempotent=False)
    assert len(calls) == 1


async def test_request_id_is_passed_along() -> None:
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.update(request.headers)
        return httpx.Response(200)

    await _client(handler).request("GET", "/x", request_id="abc123")
    assert seen["x-request-id"] == "abc123"


async def test_timeout_becomes_504_class() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(DependencyTimeout, match="did not answer"):
        await _client(handler).request("GET", "/x")


async def test_connection_refused_is_503_with_the_service_name() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(DependencyUnavailable, match="cannot reach retriever") as error:
        await _client(handler, retries=1).request("GET", "/x")
    assert error.value.code == "retriever_unavailable"


async def test_client_error_is_passed_on_with_its_status_and_message() -> None:
    body = {
        "error": {
            "message": "unknown domain 'x'",
            "type": "invalid_request_error",
            "param": "domain",
            "code": "invalid_input",
        }
    }
    with pytest.raises(DownstreamError) as error:
        await _client(lambda request: httpx.Response(400, json=body)).request("POST", "/retrieve")
    assert (
        error.value.status_code == 400
        and error.value.param == "domain"
        and "unknown domain" in error.value.message
    )


async def test_ready_never_raises() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    assert await _client(handler).ready() is False
