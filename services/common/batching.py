"""Micro-batching: concurrent requests share one forward pass, and each caller gets its own row back.

A model that embeds or classifies one image per call spends most of a small call on fixed costs (Python
dispatch, thread hops, kernel launches); sixteen images in one call cost little more than one. A
``MicroBatcher`` queues items from any number of callers, event-loop coroutines (``await submit(x)``) or
worker threads (``submit_blocking([x, ...])``), and one worker thread per batcher runs them in batches:

- a batch starts when it holds ``max_batch`` items, or ``max_wait_s`` after its oldest item arrived;
- while a batch runs, new items queue, so under load the next batch is all that waited (up to
  ``max_batch``), which is how batch sizes grow with the load and stay at 1 when there is none;
- ``key`` (optional) keeps incompatible items apart: a batch only holds items of its first item's key
  (the generator groups requests by sampling parameters this way); a key equal to nothing else, such as
  a fresh ``object()``, makes an item run alone;
- ``max_batch=1`` turns batching off: each call runs ``run_batch([item])`` itself, in its caller's
  thread (a worker thread from async code), exactly the unbatched path, with no queue and no worker.

Metrics (``BatchMetrics``, on the app's registry): a histogram of batch sizes, a histogram of the time
items waited before their batch started, and a gauge of the items queued now, labelled by service and
batcher name.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio.to_thread
from prometheus_client import CollectorRegistry, Gauge, Histogram

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
WAIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

__all__ = ["BatchMetrics", "ImageBatcher", "MicroBatcher"]


class BatchMetrics:
    """Batch sizes, queue waits and queue depth of a service's batchers, on one Prometheus registry.

    Use ``BatchMetrics.on(registry, service=...)``: it returns the one instance of a registry, so
    attaching batchers twice (or several services' batchers) never registers a metric twice.
    """

    _by_registry: weakref.WeakKeyDictionary[CollectorRegistry, BatchMetrics] = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self, registry: CollectorRegistry, *, service: str):
        labels = ["service", "batcher"]
        self.service = service
        self.batch_size = Histogram(
            "mmedrag_batch_size",
            "Items per batched model call (1 = ran alone)",
            labels,
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.wait = Histogram(
            "mmedrag_batch_wait_seconds",
            "Time an item waited in the queue before its batch started",
            labels,
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "mmedrag_batch_queue_depth", "Items waiting to join a batch", labels, registry=registry
        )

    @classmethod
    def on(cls, registry: CollectorRegistry, *, service: str) -> BatchMetrics:
        """The registry's batch metrics, created on first use."""
        with cls._lock:
            metrics = cls._by_registry.get(registry)
            if metrics is None:
                metrics = cls(registry, service=service)
                cls._by_registry[registry] = metrics
            return metrics

    def observe(self, batcher: str, size: int, waits: Sequence[float]) -> None:
        self.batch_size.labels(self.service, batcher).observe(size)
        wait = self.wait.labels(self.service, batcher)
        for seconds in waits:
            wait.observe(seconds)

    def track_queue(self, batcher: str, depth: Callable[[], int]) -> None:
        """Read the queue depth at scrape time (no bookkeeping on the request path)."""
        self.queue_depth.labels(self.service, batcher).set_function(depth)


@dataclass
class _Pending(Generic[T, R]):
    item: T
    key: Hashable
    future: Future[R] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher(Generic[T, R]):
    """Gathers concurrent items into calls of ``run_batch(items) -> one result per item, in order``.

    Args:
        run_batch: the batched function (blocking; it runs in the batcher's worker thread, or in the
            caller's thread when batching is off). An exception fails every item of its batch.
        max_batch: most items per call; 1 turns batching off.
        max_wait_s: how long the oldest queued item waits for others before its batch starts anyway.
        name: the ``batcher`` label of the metrics (e.g. the retriever's domain).
        key: items with different keys never share a batch (None: all items are compatible).
        metrics: where to record sizes and waits; can also be attached later (``attach_metrics``).

    Example::

        batcher = MicroBatcher(model.encode_images, max_batch=16, max_wait_s=0.002)
        vector = await batcher.submit(image)                  # from a coroutine
        [vector] = batcher.submit_blocking([image])           # from a worker thread
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        *,
        max_batch: int = 16,
        max_wait_s: float = 0.002,
        name: str = "default",
        key: Callable[[T], Hashable] | None = None,
        metrics: BatchMetrics | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1 (1 = no batching), got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must not be negative, got {max_wait_s}")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.name = name
        self._key = key
        self._metrics: BatchMetrics | None = None
        self._pending: deque[_Pending[T, R]] = deque()
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closed = False
        if metrics is not None:
            self.attach_metrics(metrics)

    @property
    def enabled(self) -> bool:
        """Whether items are batched (``max_batch > 1``)."""
        return self.max_batch > 1

    @property
    def queue_depth(self) -> int:
        """Items queued and not yet in a running batch."""
        return len(self._pending)

    def attach_metrics(self, metrics: BatchMetrics) -> None:
        """Record into ``metrics`` from now on (a later call replaces an earlier one: the newest app wins)."""
        self._metrics = metrics
        metrics.track_queue(self.name, lambda: len(self._pending))

    # ------------------------------------------------------------------------------------------ callers

    async def submit(self, item: T) -> R:
        """The item's result; awaits its batch without blocking the event loop."""
        if not self.enabled:
            return await anyio.to_thread.run_sync(self._run_alone, item)
        [pending] = self._enqueue([item])
        # A cancelled caller (client gone) cancels its future; the worker then skips the item.
        return await asyncio.wrap_future(pending.future)

    def submit_blocking(self, items: Sequence[T]) -> list[R]:
        """The items' results, in order; blocks the calling (worker) thread until they are done."""
        if not self.enabled:
            return [self._run_alone(item) for item in items]
        return [pending.future.result() for pending in self._enqueue(items)]

    def close(self, timeout_s: float | None = 10.0) -> None:
        """Run what is queued, then stop the worker thread; later submissions raise ``RuntimeError``."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout_s)

    # ------------------------------------------------------------------------------------------ internals

    def _run_alone(self, item: T) -> R:
        if self._metrics is not None:
            self._metrics.observe(self.name, 1, (0.0,))
        [result] = self._checked(self._run_batch([item]), 1)
        return result

    def _enqueue(self, items: Sequence[T]) -> list[_Pending[T, R]]:
        pending = [_Pending(item, self._key(item) if self._key else None) for item in items]
        with self._cond:
            if self._closed:
                raise RuntimeError(f"batcher {self.name!r} is closed")
            self._pending.extend(pending)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name=f"batcher-{self.name}", daemon=True)
                self._worker.start()
            self._cond.notify()
        return pending

    def _compatible(self, key: Hashable) -> int:
        if self._key is None:
            return len(self._pending)
        return sum(1 for pending in self._pending if pending.key == key)

    def _next_batch(self) -> list[_Pending[T, R]] | None:
        """Block until a batch is due; None when closed and drained."""
        with self._cond:
            while not self._pending:
                if self._closed:
                    return None
                self._cond.wait()
            first = self._pending[0]
            deadline = first.enqueued + self.max_wait_s
            while not self._closed and self._compatible(first.key) < self.max_batch:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._key is None:
                count = min(self.max_batch, len(self._pending))
                return [self._pending.popleft() for _ in range(count)]
            batch: list[_Pending[T, R]] = []
            rest: deque[_Pending[T, R]] = deque()
            for pending in self._pending:  # keep the others in arrival order
                if len(batch) < self.max_batch and pending.key == first.key:
                    batch.append(pending)
                else:
                    rest.append(pending)
            self._pending = rest
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._execute(batch)

    def _execute(self, batch: list[_Pending[T, R]]) -> None:
        # set_running_or_notify_cancel is False for an item whose caller has gone: skip it.
        live = [pending for pending in batch if pending.future.set_running_or_notify_cancel()]
        if not live:
            return
        started = time.perf_counter()
        if self._metrics is not None:
            self._metrics.observe(self.name, len(live), [started - pending.enqueued for pending in live])
        try:
            results = self._checked(self._run_batch([pending.item for pending in live]), len(live))
        except BaseException as exc:  # every waiter gets the error (the worker lives on); handlers log it
            for pending in live:
                pending.future.set_exception(exc)
            return
        for pending, result in zip(live, results, strict=True):
            pending.future.set_result(result)

    def _checked(self, results: Sequence[R], expected: int) -> Sequence[R]:
        if len(results) != expected:
            raise RuntimeError(
                f"batcher {self.name!r}: run_batch returned {len(results)} results for {expected} items"
            )
        return results


class ImageBatcher(MicroBatcher[Any, Any]):
    """A ``MicroBatcher`` of images: ``await encode(image)`` is one row of ``encode_images(images)``."""

    def __init__(
        self,
        encode_images: Callable[[list[Any]], Sequence[Any]],
        *,
        max_batch: int = 16,
        max_wait_s: float = 0.002,
        name: str = "images",
        metrics: BatchMetrics | None = None,
    ):
        super().__init__(
            encode_images, max_batch=max_batch, max_wait_s=max_wait_s, name=name, metrics=metrics
        )

    async def encode(self, image: Any) -> Any:
        """The image's row (e.g. its embedding)."""
        return await self.submit(image)
