"""Back-pressure for the public routes: a bound on requests in flight and a per-key rate limit.

Both answer at once instead of queueing (no unbounded queues): 503 with ``Retry-After`` when the router
is saturated, 429 with ``Retry-After`` when one key exceeds its rate.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from services.common.errors import ServiceError


class Overloaded(ServiceError):
    """503: too many requests in flight; retry shortly."""

    status_code = 503
    error_type = "service_unavailable"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1):
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}


class RateLimited(ServiceError):
    """429: this API key sent more requests than its rate allows."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int):
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}


class InFlightLimiter:
    """At most ``limit`` requests at once; the next one is refused, not queued."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.in_flight >= self.limit:
            raise Overloaded(f"the router is at its limit of {self.limit} requests in flight; retry shortly")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class RateLimiter:
    """Token bucket per key: ``per_minute`` sustained, bursts up to ``burst``; 0 turns it off."""

    per_minute: float
    burst: int
    buckets: dict[str, _Bucket] = field(default_factory=dict)

    def check(self, key_id: str, now: float | None = None) -> None:
        if self.per_minute <= 0:
            return
        now = time.monotonic() if now is None else now
        rate = self.per_minute / 60.0
        bucket = self.buckets.get(key_id) or _Bucket(tokens=float(self.burst), updated=now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        self.buckets[key_id] = bucket
        if bucket.tokens < 1.0:
            wait = math.ceil((1.0 - bucket.tokens) / rate)
            raise RateLimited(
                f"rate limit of {self.per_minute:g} requests per minute exceeded for key '{key_id}'",
                retry_after_s=max(1, wait),
            )
        bucket.tokens -= 1.0
