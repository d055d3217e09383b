"""Calls between services: retries for idempotent calls, request ids, error translation, the breaker."""

from __future__ import annotations

import httpx
import pytest

from services.common.circuit import CircuitBreaker, CircuitState
from services.common.errors import DependencyTimeout, DependencyUnavailable
from services.common.http import DependencyMisconfigured, DownstreamError, ServiceClient, through_breaker


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


async def test_connect_timeout_is_an_unreachable_dependency_retried_then_503() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ConnectTimeout("no route", request=request)
        return httpx.Response(200, json={"ok": True})

    assert (await _client(handler, retries=1).request("GET", "/x")).json() == {"ok": True}

    def never(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("no route", request=request)

    with pytest.raises(DependencyUnavailable, match="cannot reach retriever") as error:
        await _client(never, retries=1).request("GET", "/x")
    assert error.value.code == "retriever_unavailable"


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


# -------------------------------------------------------------------------------- refused credentials


@pytest.mark.parametrize("status", [401, 403])
async def test_refused_credentials_are_503_naming_the_token_not_the_downstream_body(status: int) -> None:
    """A 401/403 refuses the router itself: 503 ``<name>_unavailable``, not the client's problem."""
    calls = []
    body = {"error": {"message": "downstream secret detail", "type": "authentication_error", "code": "x"}}

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(status, json=body)

    with pytest.raises(DependencyMisconfigured) as error:
        await _client(handler, retries=2).request("POST", "/retrieve")
    assert error.value.status_code == 503 and error.value.code == "retriever_unavailable"
    assert "internal token mismatch: check MMEDRAG_INTERNAL_TOKEN" in error.value.message
    assert "downstream secret detail" not in error.value.message
    assert len(calls) == 1, "a configuration error is not retried"


async def test_refused_credentials_do_not_open_the_circuit() -> None:
    """Configuration errors answer at once: they neither trip the breaker nor count towards it."""
    breaker = CircuitBreaker("retriever", failure_threshold=1, cooldown_s=30)
    client = _client(lambda request: httpx.Response(401), breaker=breaker)
    for _ in range(3):
        with pytest.raises(DependencyMisconfigured):
            await client.request("POST", "/retrieve")
    assert breaker.state is CircuitState.CLOSED and breaker.consecutive_failures == 0
    # the control: one real failure opens it at this threshold
    failing = _client(lambda request: httpx.Response(500), breaker=breaker)
    with pytest.raises(DependencyUnavailable):
        await failing.request("POST", "/retrieve")
    assert breaker.state is CircuitState.OPEN


async def test_through_breaker_passes_results_and_counts_real_failures() -> None:
    breaker = CircuitBreaker("generator", failure_threshold=2, cooldown_s=30)

    async def ok() -> str:
        return "answer"

    async def down() -> str:
        raise DependencyUnavailable("down")

    assert await through_breaker(None, ok) == "answer"
    assert await through_breaker(breaker, ok) == "answer"
    with pytest.raises(DependencyUnavailable):
        await through_breaker(breaker, down)
    assert breaker.consecutive_failures == 1


async def test_a_server_error_names_the_dependency_in_its_code() -> None:
    with pytest.raises(DependencyUnavailable) as error:
        await _client(lambda request: httpx.Response(500, json={"error": {"message": "bug"}})).request(
            "POST", "/retrieve"
        )
    assert (
        error.value.code == "retriever_unavailable" and "retriever failed (500): bug" in error.value.message
    )
