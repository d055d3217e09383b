"""The circuit breaker: closed → open after N failures → half-open probe after the cooldown (fake clock)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from services.common.circuit import CircuitBreaker, CircuitOpen, CircuitState
from services.common.errors import DependencyTimeout, DependencyUnavailable
from services.common.http import DownstreamError, ServiceClient


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _breaker(clock: FakeClock, threshold: int = 3, cooldown_s: float = 30.0) -> CircuitBreaker:
    return CircuitBreaker("retriever", failure_threshold=threshold, cooldown_s=cooldown_s, clock=clock)


def _fail(breaker: CircuitBreaker, error: Exception | None = None) -> None:
    with pytest.raises(type(error or DependencyUnavailable("down"))), breaker.guard():
        raise error or DependencyUnavailable("down")


def _succeed(breaker: CircuitBreaker) -> None:
    with breaker.guard():
        pass


def test_opens_after_n_consecutive_failures_only(clock: FakeClock) -> None:
    breaker = _breaker(clock, threshold=3)
    _fail(breaker)
    _fail(breaker)
    _succeed(breaker)  # a success in between resets the count
    _fail(breaker)
    _fail(breaker, DependencyTimeout("slow"))
    assert breaker.state is CircuitState.CLOSED and breaker.consecutive_failures == 2
    _fail(breaker)
    assert breaker.state is CircuitState.OPEN and breaker.times_opened == 1


def test_open_circuit_fails_fast_with_503_and_the_remaining_cooldown(clock: FakeClock) -> None:
    breaker = _breaker(clock, threshold=1, cooldown_s=30)
    _fail(breaker)
    clock.advance(12.4)
    ran = []
    with pytest.raises(CircuitOpen) as refused, breaker.guard():
        ran.append(True)
    assert not ran, "an open circuit must not run the call"
    error = refused.value
    assert error.status_code == 503 and isinstance(error, DependencyUnavailable)
    assert error.headers == {"Retry-After": "18"}  # ceil(30 - 12.4)
    assert error.code == "retriever_unavailable" and "circuit open" in error.message
    assert breaker.retry_after_s() == pytest.approx(17.6)


def test_half_open_admits_one_probe_and_closes_when_it_succeeds(clock: FakeClock) -> None:
    breaker = _breaker(clock, threshold=1, cooldown_s=10)
    _fail(breaker)
    clock.advance(10)
    assert breaker.state is CircuitState.HALF_OPEN  # reported as soon as the cooldown is over
    probe = breaker.before_call()
    with pytest.raises(CircuitOpen) as second:
        breaker.before_call()  # only one probe at a time
    assert second.value.headers == {"Retry-After": "1"}
    breaker.record_success(probe)
    assert breaker.state is CircuitState.CLOSED and breaker.consecutive_failures == 0
    _succeed(breaker)


def test_failed_probe_reopens_for_a_fresh_cooldown(clock: FakeClock) -> None:
    breaker = _breaker(clock, threshold=2, cooldown_s=10)
    _fail(breaker)
    _fail(breaker)
    clock.advance(11)
    _fail(breaker)  # the probe
    assert breaker.state is CircuitState.OPEN and breaker.times_opened == 2
    assert breaker.retry_after_s() == pytest.approx(10)
    clock.advance(9)
    with pytest.raises(CircuitOpen):
        _succeed(breaker)


def test_a_client_error_is_an_answer_not_a_failure(clock: FakeClock) -> None:
    breaker = _breaker(clock, threshold=1)
    error = DownstreamError(400, "bad domain", code="invalid_input", error_type="x", param="domain")
    for _ in range(3):
        _fail(breaker, error)
    assert breaker.state is CircuitState.CLOSED


def test_a_cancelled_probe_frees_the_probe_slot(clock: FakeClock) -> None:
    breaker = _breaker(clock, threshold=1, cooldown_s=5)
    _fail(breaker)
    clock.advance(5)
    with pytest.raises(asyncio.CancelledError), breaker.guard():
        raise asyncio.CancelledError
    assert breaker.state is CircuitState.HALF_OPEN
    _succeed(breaker)  # a new probe is admitted, and closes it
    assert breaker.state is CircuitState.CLOSED


def test_outcomes_of_calls_from_before_a_state_change_are_ignored(clock: FakeClock) -> None:
    breaker = _breaker(clock, threshold=1, cooldown_s=5)
    slow_call = breaker.before_call()  # started while closed
    _fail(breaker)  # opens
    clock.advance(5)
    probe = breaker.before_call()
    breaker.record_success(slow_call)  # stale: must not close the circuit behind the probe's back
    assert breaker.state is CircuitState.HALF_OPEN
    breaker.record_failure(probe)
    assert breaker.state is CircuitState.OPEN


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker("x", failure_threshold=0)
    with pytest.raises(ValueError, match="cooldown_s"):
        CircuitBreaker("x", cooldown_s=0)


async def test_service_client_stops_calling_a_failing_dependency(clock: FakeClock) -> None:
    """One call with its retries counts once; while open nothing is sent; a good probe closes it."""
    sent: list[str] = []
    healthy = False

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        return httpx.Response(200, json={"ok": True}) if healthy else httpx.Response(503)

    breaker = _breaker(clock, threshold=2, cooldown_s=20)
    client = ServiceClient(
        "retriever",
        "http://retriever",
        timeout_s=1,
        retries=1,
        backoff_s=0,
        transport=httpx.MockTransport(handler),
        breaker=breaker,
    )
    for _ in range(2):
        with pytest.raises(DependencyUnavailable):
            await client.request("POST", "/retrieve")
    assert len(sent) == 4 and breaker.state is CircuitState.OPEN  # 2 calls × (1 + 1 retry)
    with pytest.raises(CircuitOpen):
        await client.request("POST", "/retrieve")
    assert len(sent) == 4, "an open circuit sends nothing"
    assert await client.ready() is False  # readiness checks bypass the breaker: they still go out
    assert len(sent) == 5
    healthy = True
    clock.advance(20)
    assert (await client.request("POST", "/retrieve")).json() == {"ok": True}
    assert breaker.state is CircuitState.CLOSED
    await client.aclose()
