"""Calls between services: per-call timeout, bounded retries for idempotent calls, request-id propagation,
the internal token, and a circuit breaker per dependency.

Failures are translated once, here, into the error envelope's classes: a dependency that cannot be
reached or answers 5xx becomes ``DependencyUnavailable`` (503), one that does not answer in time
``DependencyTimeout`` (504). A 401/403 refuses the router itself (its internal token), not the user:
``DependencyMisconfigured`` (503 ``<name>_unavailable``, naming the setting to check, without the
dependency's body). Any other 4xx is passed on with its own status and message, because it is about the
user's input (e.g. an image the retriever cannot decode).

With a breaker, a dependency that failed ``failure_threshold`` calls in a row is not called at all for a
cooldown (``CircuitOpen``, 503 with ``Retry-After``); one call with all its retries counts once. A
misconfiguration does not count: the dependency answered at once, so there is no pile-up of slow calls to
cut short, and an open circuit would replace the message that says what to fix with "circuit open".
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
from pydantic import SecretStr

from services.common.app import REQUEST_ID_HEADER, internal_auth_headers
from services.common.circuit import CircuitBreaker
from services.common.errors import DependencyTimeout, DependencyUnavailable, ServiceError

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({502, 503, 504})
REFUSED_CREDENTIALS = frozenset({401, 403})
T = TypeVar("T")


class DownstreamError(ServiceError):
    """A dependency refused the request (4xx): its status and message are passed on unchanged."""

    def __init__(self, status_code: int, message: str, *, code: str, error_type: str, param: str | None):
        super().__init__(message, param=param, code=code)
        self.status_code = status_code
        self.error_type = error_type


class DependencyMisconfigured(DependencyUnavailable):
    """503: a dependency refuses the router's own credentials (or, for the generator, does not know the
    model it is asked for): a deployment setting is wrong, and the message says which to check."""


async def through_breaker(breaker: CircuitBreaker | None, call: Callable[[], Awaitable[T]]) -> T:
    """Run ``call`` through ``breaker`` (when there is one); ``DependencyMisconfigured`` is an answer, not a
    failure of the dependency, so it neither counts towards opening the circuit nor fails a probe."""
    if breaker is None:
        return await call()
    with breaker.guard():
        try:
            return await call()
        except DependencyMisconfigured as error:
            misconfigured = error
    raise misconfigured


class ServiceClient:
    """One dependency (classifier, retriever …) reached over HTTP."""

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        timeout_s: float,
        retries: int = 2,
        backoff_s: float = 0.1,
        transport: httpx.AsyncBaseTransport | None = None,
        internal_token: SecretStr | str | None = None,
        breaker: CircuitBreaker | None = None,
    ):
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff_s = backoff_s
        self.breaker = breaker
        # Sent on every call, readiness checks included (they pass without it, but it does no harm).
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=timeout_s,
            transport=transport,
            headers=internal_auth_headers(internal_token),
        )

    @property
    def httpx_client(self) -> httpx.AsyncClient:
        """The underlying client (e.g. to instrument it for tracing)."""
        return self._client

    async def aclose(self) -> None:
        await self._client.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        request_id: str | None = None,
        idempotent: bool = True,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send; retry connection failures and 502/503/504 (idempotent calls only, with jitter).

        With a breaker the whole call, retries included, is one outcome; while the circuit is open it
        raises ``CircuitOpen`` without sending anything.
        """
        return await through_breaker(
            self.breaker,
            lambda: self._send(method, path, request_id=request_id, idempotent=idempotent, **kwargs),
        )

    async def _send(
        self, method: str, path: str, *, request_id: str | None, idempotent: bool, **kwargs: Any
    ) -> httpx.Response:
        headers = dict(kwargs.pop("headers", None) or {})
        if request_id:
            headers[REQUEST_ID_HEADER] = request_id
        attempts = 1 + (self.retries if idempotent else 0)
        last_problem = ""
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self.backoff_s * (2 ** (attempt - 1)) * (0.5 + random.random()))
            try:
                response = await self._client.request(method, path, headers=headers, **kwargs)
            except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:  # never reached it: unreachable, retry
                last_problem = f"cannot reach {self.name} at {self.base_url} ({type(exc).__name__})"
                logger.warning("%s (attempt %d/%d)", last_problem, attempt + 1, attempts)
                continue
            except httpx.TimeoutException as exc:
                raise DependencyTimeout(
                    f"{self.name} did not answer within {self._client.timeout.read}s"
                ) from exc
            except httpx.TransportError as exc:
                last_problem = f"cannot reach {self.name} at {self.base_url} ({type(exc).__name__})"
                logger.warning("%s (attempt %d/%d)", last_problem, attempt + 1, attempts)
                continue
            if response.status_code in RETRYABLE_STATUS:
                last_problem = f"{self.name} answered {response.status_code}: {_message(response)}"
                logger.warning("%s (attempt %d/%d)", last_problem, attempt + 1, attempts)
                continue
            if response.status_code >= 500:
                raise DependencyUnavailable(
                    f"{self.name} failed ({response.status_code}): {_message(response)}",
                    code=f"{self.name}_unavailable",
                )
            if response.status_code in REFUSED_CREDENTIALS:
                raise self._refused(response)
            if response.status_code >= 400:
                raise _downstream_error(response)
            return response
        raise DependencyUnavailable(last_problem, code=f"{self.name}_unavailable")

    def _refused(self, response: httpx.Response) -> DependencyMisconfigured:
        # The dependency's own words go to the log only: they are about our deployment, not the client.
        logger.error(
            "%s refused the router (%d %s): check MMEDRAG_INTERNAL_TOKEN",
            self.name,
            response.status_code,
            _code(response),
        )
        return DependencyMisconfigured(
            f"{self.name} refused the router's credentials ({response.status_code}): internal token "
            f"mismatch: check MMEDRAG_INTERNAL_TOKEN (the same value on the router and the {self.name})",
            code=f"{self.name}_unavailable",
        )

    async def ready(self, path: str = "/readyz") -> bool:
        """True when the dependency says it can serve; never raises, and bypasses the breaker."""
        try:
            response = await self._client.get(path, timeout=2.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def _code(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "-"


def _downstream_error(response: httpx.Response) -> DownstreamError:
    try:
        error = response.json()["error"]
        return DownstreamError(
            response.status_code,
            str(error["message"]),
            code=str(error.get("code") or "invalid_input"),
            error_type=str(error.get("type") or "invalid_request_error"),
            param=error.get("param"),
        )
    except (ValueError, KeyError, TypeError):
        return DownstreamError(
            response.status_code,
            response.text[:200],
            code="invalid_input",
            error_type="invalid_request_error",
            param=None,
        )
