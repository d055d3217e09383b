"""A circuit breaker per dependency: stop calling a service that keeps failing, and probe it to come back.

closed ──N consecutive failures──▶ open ──cooldown──▶ half-open ──probe succeeds──▶ closed
                                    ▲                     │
                                    └──probe fails────────┘

While open, calls fail at once with ``CircuitOpen`` (503, ``Retry-After`` = the rest of the cooldown)
instead of piling up behind timeouts. After the cooldown one call goes through as a probe; the others
keep failing fast until it has answered. Only failures of the dependency itself count (unreachable, 5xx,
timeout); a 4xx is an answer about the user's input and counts as a success.

Each outcome carries the epoch in which its call started, so a slow call that started before the
circuit changed state cannot close or re-open it afterwards.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum

from services.common.errors import DependencyTimeout, DependencyUnavailable

logger = logging.getLogger(__name__)

Clock = Callable[[], float]


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# The value of the Prometheus gauge ``mmedrag_circuit_state`` for each state.
STATE_VALUES = {CircuitState.CLOSED: 0, CircuitState.OPEN: 1, CircuitState.HALF_OPEN: 2}


class CircuitOpen(DependencyUnavailable):
    """503 without calling: the dependency failed repeatedly and is left alone for a while."""

    code = "circuit_open"

    def __init__(self, dependency: str, retry_after_s: float):
        seconds = max(1, math.ceil(retry_after_s))
        super().__init__(
            f"{dependency} is failing; calls to it are paused (circuit open), retry in {seconds}s",
            code=f"{dependency}_unavailable",
        )
        self.dependency = dependency
        self.retry_after_s = seconds
        self.headers = {"Retry-After": str(seconds)}


class CircuitBreaker:
    """Closed / open / half-open for one dependency; thread-safe, with an injectable clock for tests."""

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        cooldown_s: float = 30.0,
        clock: Clock = time.monotonic,
        failure_types: tuple[type[BaseException], ...] = (DependencyUnavailable, DependencyTimeout),
    ):
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if cooldown_s <= 0:
            raise ValueError("cooldown_s must be positive")
        self.name = name
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.failure_types = failure_types
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self._epoch = 0
        self.times_opened = 0

    @property
    def state(self) -> CircuitState:
        """The state as callers see it now: an open circuit whose cooldown is over reads half-open."""
        with self._lock:
            if self._state is CircuitState.OPEN and self._cooldown_left() <= 0:
                return CircuitState.HALF_OPEN
            return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_after_s(self) -> float:
        """Seconds until a call may go through again (0 when closed)."""
        with self._lock:
            if self._state is CircuitState.OPEN:
                return max(0.0, self._cooldown_left())
            return 0.0

    def _cooldown_left(self) -> float:
        return self._opened_at + self.cooldown_s - self._clock()

    def _move(self, state: CircuitState) -> None:
        if state is not self._state:
            logger.warning(
                "circuit %s: %s -> %s",
                self.name,
                self._state.value,
                state.value,
                extra={"dependency": self.name, "circuit": state.value},
            )
        self._state = state
        self._epoch += 1
        self._probing = False
        if state is CircuitState.OPEN:
            self._opened_at = self._clock()
            self.times_opened += 1
        if state is CircuitState.CLOSED:
            self._failures = 0

    def before_call(self) -> int:
        """Admit a call (returns its epoch) or raise ``CircuitOpen``; after the cooldown, admit one probe."""
        with self._lock:
            if self._state is CircuitState.OPEN:
                left = self._cooldown_left()
                if left > 0:
                    raise CircuitOpen(self.name, left)
                self._move(CircuitState.HALF_OPEN)
            if self._state is CircuitState.HALF_OPEN:
                if self._probing:
                    raise CircuitOpen(self.name, 1)
                self._probing = True
            return self._epoch

    def record_success(self, epoch: int) -> None:
        with self._lock:
            if epoch != self._epoch:
                return  # the call started before the last state change: its news is stale
            if self._state is CircuitState.HALF_OPEN:
                self._move(CircuitState.CLOSED)
            else:
                self._failures = 0

    def record_failure(self, epoch: int) -> None:
        with self._lock:
            if epoch != self._epoch:
                return
            if self._state is CircuitState.HALF_OPEN:
                self._move(CircuitState.OPEN)
                return
            self._failures += 1
            if self._state is CircuitState.CLOSED and self._failures >= self.failure_threshold:
                self._move(CircuitState.OPEN)

    def release(self, epoch: int) -> None:
        """The call ended without a verdict (cancelled): free the probe slot, change nothing else."""
        with self._lock:
            if epoch == self._epoch and self._state is CircuitState.HALF_OPEN:
                self._probing = False

    @contextmanager
    def guard(self) -> Iterator[None]:
        """``with breaker.guard(): await call()`` — admit, run, and record the outcome."""
        epoch = self.before_call()
        try:
            yield
        except self.failure_types:
            self.record_failure(epoch)
            raise
        except Exception:
            self.record_success(epoch)  # the dependency answered; the problem is the request
            raise
        except BaseException:
            self.release(epoch)  # cancelled: no news about the dependency
            raise
        else:
            self.record_success(epoch)
